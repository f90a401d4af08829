"""Progressive-shrinking training: schedule, sampling, distillation, BN calibration, channel sorting, the loop."""
from .bn import calibrate_bn
from .data import DataConfig, EpochSampler, SeededDataset, build_datasets
from .distill import KD_KINDS, alpha_divergence, classification_loss, distillation_loss
from .evaluate import SubnetEvaluator, evaluate_subnet
from .init import zero_init_residual
from .sampling import StepSampler, applicable_stages, restrict_space, space_dimensions
from .schedule import PRESETS, Recipe, Schedule, Stage, build_schedule, load_schedule
from .sorting import band_permutation, rank_before_stage, sort_channels
from .step import (
    NonFiniteLossError, ShrinkingConfig, distills_from_teacher, shrinking_step, stage_scheduler, teacher_logits)
from .trainer import TrainConfig, Trainer, TrainingInterrupted, load_checkpoint, save_checkpoint

__all__ = [
    'calibrate_bn', 'DataConfig', 'EpochSampler', 'SeededDataset', 'build_datasets', 'classification_loss',
    'distillation_loss', 'KD_KINDS', 'alpha_divergence', 'evaluate_subnet', 'SubnetEvaluator', 'StepSampler',
    'applicable_stages', 'restrict_space',
    'space_dimensions', 'PRESETS', 'Recipe', 'Schedule', 'Stage', 'build_schedule', 'load_schedule',
    'band_permutation', 'rank_before_stage', 'sort_channels', 'zero_init_residual',
    'NonFiniteLossError', 'ShrinkingConfig', 'distills_from_teacher', 'shrinking_step', 'stage_scheduler',
    'teacher_logits', 'TrainConfig',
    'Trainer', 'TrainingInterrupted', 'load_checkpoint', 'save_checkpoint',
]
