"""Progressive-shrinking training: schedule, sampling, distillation, BN calibration, channel sorting, the loop."""
from .bn import calibrate_bn
from .data import DataConfig, EpochSampler, SeededDataset, build_datasets
from .digits import make_digits_dataset
from .distill import classification_loss, distillation_loss
from .evaluate import evaluate_subnet
from .init import zero_init_residual
from .sampling import StepSampler, restrict_space, space_dimensions
from .schedule import DIMENSIONS, PRESETS, Schedule, Stage, load_schedule
from .sorting import band_permutation, sort_channels
from .synthetic import SHAPES, make_shapes_dataset
from .step import NonFiniteLossError, ShrinkingConfig, shrinking_step, stage_scheduler, teacher_logits
from .trainer import TrainConfig, Trainer, TrainingInterrupted, load_checkpoint, save_checkpoint

__all__ = [
    'calibrate_bn', 'DataConfig', 'EpochSampler', 'SeededDataset', 'build_datasets', 'classification_loss',
    'distillation_loss', 'evaluate_subnet', 'StepSampler', 'restrict_space', 'space_dimensions', 'DIMENSIONS',
    'PRESETS', 'Schedule', 'Stage', 'load_schedule', 'band_permutation', 'sort_channels', 'SHAPES',
    'make_shapes_dataset', 'make_digits_dataset', 'zero_init_residual',
    'NonFiniteLossError', 'ShrinkingConfig', 'shrinking_step', 'stage_scheduler', 'teacher_logits', 'TrainConfig',
    'Trainer', 'TrainingInterrupted', 'load_checkpoint', 'save_checkpoint',
]
