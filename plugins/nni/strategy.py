"""OFA progressive shrinking as an NNI one-shot strategy.

The strategy runs ofa_timm's training pieces: the schedule and its stages, the per-step subnet sampler, the
progressive-shrinking step (``ofa_timm.training.step``: teacher, distillation, finite-loss check), the per-stage
learning rate, channel sorting and BN recalibration. NNI's Lightning evaluator supplies the data, the optimizer and
the base loss (e.g. ``Classification``); this module keeps only what Lightning requires around the shared step.
"""
import itertools
import math
from dataclasses import fields, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ._shims import quiet_nni_import

with quiet_nni_import():
    from nni.nas.oneshot.pytorch.base_lightning import BaseOneShotLightningModule
    from nni.nas.oneshot.pytorch.strategy import OneShotStrategy

from ofa_timm._rng import preserved_rng
from ofa_timm.space import Subnet
from ofa_timm.training.data import resize_to
from ofa_timm.training.evaluate import evaluate_subnet
from ofa_timm.training.report import source_check_lines, source_check_subnets
from ofa_timm.training.sampling import StepSampler, applicable_stages
from ofa_timm.training.schedule import Schedule, ScheduleLike, Stage, build_schedule
from ofa_timm.training.sorting import rank_before_stage
from ofa_timm.training.step import (
    ShrinkingConfig, distills_from_teacher, shrinking_step, stage_scheduler, teacher_logits)

from .space import SupernetSpace

__all__ = ['OFAProgressiveShrinking', 'ProgressiveShrinkingModule']


def _stage_epochs(schedule: Schedule) -> List[int]:
    # Lightning counts whole epochs: every stage lasts at least one.
    return [max(1, round(schedule.stage_epochs(s))) for s in schedule.stages]


class ProgressiveShrinkingModule(BaseOneShotLightningModule):
    """The Lightning module of :class:`OFAProgressiveShrinking` (wraps the evaluator's module).

    Args:
        training_module: The evaluator's Lightning module (NNI gives it the model space before training).
        space: The model space being trained.
        schedule: The progressive-shrinking schedule (already reduced to the stages that apply).
        config: Seed, distillation, BN-recalibration and learning-rate settings.
        manage_lr: Drive the evaluator's optimizer with each stage's learning-rate schedule.
        grid_every_epoch: Evaluate the BN-recalibrated subnet grid after every epoch, not only at stage ends.
        check_source: Before the first step, validate the max subnet (a pretrained start's source) at the space's
            resolutions and warn where it scores far below its own, as ``ofa-timm train`` does
            (``source_check``).
    """

    def __init__(
            self,
            training_module: Any,
            space: SupernetSpace,
            schedule: Schedule,
            config: ShrinkingConfig,
            manage_lr: bool = True,
            grid_every_epoch: bool = False,
            check_source: bool = False,
    ):
        super().__init__(training_module)
        self.schedule = schedule
        self.stage_epochs = _stage_epochs(schedule)
        self.config = config
        self.manage_lr = manage_lr
        self.grid_every_epoch = grid_every_epoch
        self.check_source = check_source
        self.source_check: Optional[Dict[Optional[int], float]] = None  # top-1 by resolution, once checked
        # Always present, so that Lightning checkpoints restore it; refreshed from the supernet when the first
        # distillation stage starts.
        self.teacher = space.supernet.extract('max').eval().requires_grad_(False)
        self._teacher_ready = False
        self._stage_index = -1
        self._sampler: Optional[StepSampler] = None
        self._scheduler: Any = None
        self._step_in_stage = 0
        self.sampled: List[Tuple[str, Subnet]] = []
        self.last_validation: List[Dict[str, Any]] = []

    @property
    def supernet(self) -> nn.Module:
        return self.model.supernet

    @property
    def automatic_optimization(self) -> bool:
        return False

    # --- stages ---------------------------------------------------------------------------------------------------
    def stage_at(self, epoch: int) -> int:
        """Index of the stage that trains during ``epoch``; epochs past the schedule stay in the last stage."""
        end = 0
        for i, n in enumerate(self.stage_epochs):
            end += n
            if epoch < end:
                return i
        return len(self.stage_epochs) - 1

    @property
    def stage(self) -> Stage:
        return self.schedule.stages[self._stage_index]

    def on_train_start(self) -> None:
        if (self.check_source and self.trainer.global_step == 0 and self.source_check is None
                and self.trainer.val_dataloaders is not None):  # an evaluator without validation data has none
            with preserved_rng(self.device):  # extraction draws init weights: keep training's numbers
                self.source_check = {subnet.resolution: self.evaluate_subnet(subnet)
                                     for subnet in source_check_subnets(self.supernet.space)}
            if self.trainer.is_global_zero:
                for line in source_check_lines(self.source_check, self.supernet.num_classes):
                    print(line, flush=True)
        return self.training_module.on_train_start()

    def on_train_epoch_start(self) -> None:
        index = self.stage_at(self.current_epoch)
        if index != self._stage_index:
            self._enter_stage(index)
        return self.training_module.on_train_epoch_start()

    def _enter_stage(self, index: int) -> None:
        stage = self.schedule.stages[index]
        first_epoch = sum(self.stage_epochs[:index])
        entering = self.current_epoch == first_epoch  # not when resuming mid-stage from a checkpoint
        if entering:
            rank_before_stage(self.supernet, self.schedule, index)
        if distills_from_teacher(stage) and not self._teacher_ready:
            if entering:
                self.teacher.load_state_dict(self.supernet.extract('max').state_dict())
            self._teacher_ready = True
        self._stage_index = index
        self._sampler = StepSampler(self.supernet.space, stage, self.config.seed)
        batches = self.trainer.num_training_batches
        batches = int(batches) if math.isfinite(batches) else 0
        self._step_in_stage = (self.current_epoch - first_epoch) * batches
        if self.manage_lr:
            self._scheduler, _ = stage_scheduler(
                self.optimizers(), self.schedule, stage, max(1, batches), self.config,
                total_steps=max(1, self.stage_epochs[index] * batches))

    # --- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        stage = self.stage
        subnets = self._sampler.sample(self._step_in_stage)
        step_batch = self._resize(batch, subnets[0].resolution)
        optimizer = self.optimizers()
        if self._scheduler is not None:
            self._scheduler.step_update(self._step_in_stage)
        teacher = teacher_logits(self.teacher, step_batch[0], stage)
        captured: List[torch.Tensor] = []

        def forward(subnet: Subnet) -> Tuple[torch.Tensor, torch.Tensor]:
            captured.clear()
            own = step_batch if subnet.resolution == subnets[0].resolution else self._resize(batch, subnet.resolution)
            loss = self.training_module.training_step(own, batch_idx)
            self.sampled.append((stage.name, subnet))
            return (loss['loss'] if isinstance(loss, Mapping) else loss), captured[-1]

        hook = self.model.register_forward_hook(lambda module, args, output: captured.append(output))
        optimizer.zero_grad()
        try:
            loss = shrinking_step(self.supernet, subnets, stage, forward, self.manual_backward, self.config, teacher,
                                  step=self._step_in_stage)
        finally:
            hook.remove()
        if stage.clip_grad is not None:  # the stage's own clipping, as ofa-timm train applies it
            self.clip_gradients(optimizer, gradient_clip_val=stage.clip_grad, gradient_clip_algorithm='norm')
        optimizer.step()
        self._step_in_stage += 1
        self.log('train_ps_loss', loss, prog_bar=True)
        return torch.tensor(loss)

    @staticmethod
    def _resize(batch: Any, resolution: Optional[int]) -> Any:
        if not isinstance(batch, (tuple, list)):
            return batch
        images = resize_to(batch[0], resolution)
        return type(batch)([images, *batch[1:]]) if isinstance(batch, list) else (images, *batch[1:])

    # --- validation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        # The evaluator's own metric (what NNI reports) is measured on the max subnet.
        self.supernet.set_active(None)
        return self.training_module.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.training_module.on_validation_epoch_end()
        if self.trainer.sanity_checking or self._stage_index < 0:
            return
        stage_end = sum(self.stage_epochs[:self._stage_index + 1]) - 1
        if not self.grid_every_epoch and self.current_epoch != stage_end:
            return
        results = []
        grid = StepSampler(self.supernet.space, self.stage, self.config.seed).validation_grid(
            self.config.val_resolutions)
        for label, subnet in grid:
            top1 = self.evaluate_subnet(subnet)
            results.append({'subnet': label, 'spec': subnet, 'top1': top1})
            self.log(f'ps_val_top1/{label}', top1)
        self.last_validation = results
        self.log('ps_val_top1_mean', sum(r['top1'] for r in results) / len(results))

    def evaluate_subnet(self, subnet: Subnet) -> float:
        """Top-1 (%) of ``subnet`` on the validation data, after BN recalibration on training images."""
        loaders = self.trainer.val_dataloaders
        val = itertools.chain.from_iterable(loaders if isinstance(loaders, (list, tuple)) else [loaders])
        return evaluate_subnet(self.supernet, subnet, self.trainer.train_dataloader, val, self.config.calib_images,
                               self.device)['top1']

    def export(self) -> Dict[str, Any]:
        """The NNI sample of the best subnet of the last validation grid (the max subnet before any validation)."""
        best = max(self.last_validation, key=lambda r: r['top1'])['spec'] if self.last_validation \
            else self.supernet.space.max()
        return self.model.to_sample(best)


class OFAProgressiveShrinking(OneShotStrategy):
    """OFA progressive shrinking, run by NNI like DARTS or SPOS: ``NasExperiment(space, evaluator, strategy).run()``.

    The model space must be a :class:`SupernetSpace`; the evaluator any Lightning evaluator whose module calls the
    model once per training step (``Classification`` does). Its trainer must run at least :meth:`total_epochs`
    epochs; each schedule stage lasts ``round(epochs * epochs_scale)`` (at least 1) epochs. The schedule is built as
    ``ofa-timm train`` builds it (``ofa_timm.training.build_schedule``), and its floor in optimizer steps applies:
    pass ``steps_per_epoch`` (the evaluator's training batches) to :meth:`total_epochs`.

    Args:
        schedule: ``'auto'`` (``'fast'`` for a ``pretrained`` start, else ``'scratch'``), a preset name (``'ofa'``,
            ``'fast'``, ``'scratch'``, ``'demo'``), a ``Recipe``, a YAML file or a ``Schedule``.
        epochs_scale: Rescale the schedule.
        pretrained: The supernet starts from trained weights: skip the ``full`` stage (and ``'auto'`` picks the
            pretrained recipe).
        config: Seed, distillation, BN-recalibration and learning-rate settings (the same as ``ofa-timm train``'s).
        manage_lr: Drive the evaluator's optimizer with each stage's learning-rate schedule (warmup then cosine).
        grid_every_epoch: Evaluate the subnet grid after every epoch (default: at the end of each stage).
        min_steps: The schedule's floor in optimizer steps (default: the recipe's own; 0: none).
        lr_scale: Multiplies every stage's learning rate.
        sampling: Sampling rule of every stage (default: each stage's own).
        **settings: Fields of :class:`ShrinkingConfig` overriding ``config`` (e.g. ``calib_images=500``).
    """

    def __init__(
            self,
            schedule: ScheduleLike = 'ofa',
            epochs_scale: Optional[float] = None,
            pretrained: bool = False,
            config: Optional[ShrinkingConfig] = None,
            manage_lr: bool = True,
            grid_every_epoch: bool = False,
            min_steps: Optional[int] = None,
            lr_scale: float = 1.0,
            sampling: Optional[str] = None,
            **settings: Any,
    ):
        unknown = set(settings) - {f.name for f in fields(ShrinkingConfig)}
        if unknown:
            raise ValueError(f'Unknown settings {sorted(unknown)}; allowed: '
                             f'{[f.name for f in fields(ShrinkingConfig)]}')
        super().__init__()
        self._space: Optional[SupernetSpace] = None
        self.schedule_options = dict(spec=schedule, pretrained=pretrained, epochs_scale=epochs_scale,
                                     min_steps=min_steps, lr_scale=lr_scale, sampling=sampling)
        self.pretrained = pretrained
        self.config = replace(config or ShrinkingConfig(), **settings)
        self.module_kwargs = dict(manage_lr=manage_lr, grid_every_epoch=grid_every_epoch, check_source=pretrained)
        self.schedule: Optional[Schedule] = None  # the schedule the experiment runs, once the evaluator is known

    def stages_for(self, space: SupernetSpace, steps_per_epoch: Optional[int] = None) -> Schedule:
        """The schedule for ``space``: the stages that train something for it, lengthened to the schedule's floor in
        optimizer steps when ``steps_per_epoch`` is given."""
        options = dict(self.schedule_options)
        schedule = build_schedule(options.pop('spec'), space.supernet.space, **options)
        schedule = applicable_stages(schedule, space.supernet.space, self.pretrained)
        return schedule.fit(steps_per_epoch) if steps_per_epoch else schedule

    def total_epochs(self, space: SupernetSpace, steps_per_epoch: Optional[int] = None) -> int:
        """Epochs the evaluator's trainer must run to go through every stage (``steps_per_epoch``: its training
        batches per epoch, for the schedule's floor in optimizer steps)."""
        return sum(_stage_epochs(self.stages_for(space, steps_per_epoch)))

    def default_mutation_hooks(self) -> list:
        return []  # a SupernetSpace is already a supernet: nothing to mutate

    def mutate_model(self, model: Any) -> Any:
        if not isinstance(model, SupernetSpace):
            raise TypeError(f'OFAProgressiveShrinking needs a SupernetSpace model space, got {type(model).__name__}')
        self._space = model
        return super().mutate_model(model)

    def configure_oneshot_module(self, training_module: Any) -> ProgressiveShrinkingModule:
        if self.schedule is None:
            self.schedule = self.stages_for(self._space)
        return ProgressiveShrinkingModule(training_module, self._space, self.schedule, self.config,
                                          **self.module_kwargs)

    def mutate_evaluator(self, evaluator: Any) -> Any:
        steps = _steps_per_epoch(evaluator)
        self.schedule = self.stages_for(self._space, steps)
        needed = sum(_stage_epochs(self.schedule))
        max_epochs = evaluator.trainer.max_epochs
        if max_epochs is not None and 0 < max_epochs < needed:
            floor = f' (its floor of {self.schedule.min_steps} optimizer steps at {steps} per epoch)' if steps else ''
            raise ValueError(f'The evaluator trains {max_epochs} epochs, but the schedule needs {needed}{floor}: set '
                             f'max_epochs={needed} (strategy.total_epochs(space, steps_per_epoch))')
        return super().mutate_evaluator(evaluator)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.schedule is not None:
            state['schedule'] = self.schedule.to_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        schedule = self.schedule or (self.stages_for(self._space) if self._space is not None else None)
        if 'schedule' in state_dict and schedule is not None and Schedule.from_dict(state_dict['schedule']) != schedule:
            raise ValueError('The experiment checkpoint was written with another progressive-shrinking schedule')
        super().load_state_dict(state_dict)


def _steps_per_epoch(evaluator: Any) -> Optional[int]:
    """Training batches per epoch of a Lightning evaluator, where its data loader has a length."""
    loaders = getattr(evaluator, 'train_dataloaders', None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if len(loaders) == 1 else None
    try:
        return len(loaders) or None if loaders is not None else None
    except TypeError:  # an iterable dataset
        return None
