"""The progressive-shrinking training loop.

One process, one GPU, a CPU, or many processes under ``torchrun`` (PyTorch DDP). Per optimizer step: the step's
subnets are drawn from a RNG seeded by the step (identical on every rank), the batch is resized to the step's
resolution (and to the min subnet's own under ``Stage.min_resolution``), the frozen teacher runs once, and each
subnet's loss (label-smoothed CE + KD) is back-propagated into the shared weights before a single optimizer step.

Distributed choices: every rank trains on its shard of each batch order; rank 0 alone validates (BN calibration and
evaluation of the validation grid), logs and writes checkpoints, and the other ranks wait at a barrier.

Checkpoints hold the model, teacher, EMA, optimizer, scheduler, grad scaler, position (stage, step) and every RNG,
are written atomically and load with ``torch.load(weights_only=True)``. ``resume`` continues exactly: on CPU the
weights after N/2 steps + resume + N/2 steps are bitwise those of N steps in one go. They are written at epoch ends,
on a wall-clock cadence, and when SIGINT/SIGTERM stops a run: the step in progress finishes, is checkpointed, and
``run`` raises :class:`TrainingInterrupted`; under DDP every rank learns of a signal at the same step (one small
all-reduce per step), so all stop together.
"""
import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.utils import ModelEmaV3

from .._dist import barrier as _barrier, rank_and_world as _dist
from .._io import atomic_path, checkpoint_metadata, load_weights
from .._rng import preserved_rng, rng_state, set_rng_state
from ..space import Subnet
from .data import EpochSampler, SeededDataset, default_workers, resize_to, train_loader
from .distill import classification_loss
from .evaluate import SubnetEvaluator
from .init import zero_init_residual
from .report import source_check_lines, source_check_subnets
from .sampling import StepSampler, applicable_stages, known_unlocks, space_dimensions, unknown_unlocks
from .schedule import Schedule, Stage, short_schedule_warning
from .sorting import rank_before_stage
from .step import ShrinkingConfig, distills_from_teacher, shrinking_step, stage_scheduler, teacher_logits

__all__ = ['TrainConfig', 'Trainer', 'TrainingInterrupted', 'save_checkpoint', 'load_checkpoint']

CHECKPOINT = 'last.pth'
# The default cadence: a stage's curve in a few points, without validation outgrowing the training on small data.
VALIDATIONS_PER_STAGE = 5


@dataclass
class TrainConfig(ShrinkingConfig):
    """Settings of a progressive-shrinking run that are not part of the schedule (the shared ones are
    :class:`ShrinkingConfig`'s).

    Args:
        output: Run folder (checkpoints, metrics.jsonl, summary, plot).
        batch_size: Images per process per step.
        workers: Data-loader workers per process (default: 4, or the CPUs the process may use if fewer).
        amp: Autocast dtype: 'none', 'bf16' or 'fp16' (fp16 uses a GradScaler).
        channels_last: Train in channels-last memory format.
        opt: timm optimizer name ('sgd' is SGD with Nesterov momentum, as OFA).
        momentum: Optimizer momentum.
        weight_decay: Weight decay (not applied to biases and norms).
        clip_grad: Clip the gradient norm to this value in every stage (None: each stage's own ``clip_grad``).
        ema_decay: Keep a ``ModelEmaV3`` of the supernet with this decay (None: no EMA).
        label_smoothing: Label smoothing of the classification loss.
        mixup: Mixup alpha (0 disables).
        cutmix: CutMix alpha (0 disables).
        zero_init_residual: A run from scratch (not ``pretrained``, first stage ``full``) starts by zeroing the last
            BN scale of every residual block (``training.zero_init_residual``), as the reference's
            ``zero_last_gamma``, BigNAS and timm's ResNets do.
        val_every: Validate every this many epochs, and always at the end of a stage (None: evenly, at most
            ``VALIDATIONS_PER_STAGE`` times per stage). Each subnet of the grid costs a BN recalibration and an
            evaluation, so on a small dataset, whose epochs are a few steps, validating every epoch costs more than
            the training.
        checkpoint_every: Also checkpoint every this many steps (0: only at epoch ends).
        checkpoint_minutes: Also checkpoint when this many minutes passed since the last checkpoint (0: never).
        log_every: Write a training record to metrics.jsonl every this many steps.
        progress: Show a tqdm progress bar on rank 0 when the output is a terminal. Without a bar (the output is a
            file, or ``progress`` is off) rank 0 prints a line at most every ``progress_seconds`` and one per
            validation.
        progress_seconds: Seconds between progress lines when there is no bar.
    """
    output: str = 'output'
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    amp: str = 'none'
    channels_last: bool = False
    opt: str = 'sgd'
    momentum: float = 0.9
    weight_decay: float = 3e-5
    clip_grad: Optional[float] = None
    ema_decay: Optional[float] = None
    label_smoothing: float = 0.1
    mixup: float = 0.
    cutmix: float = 0.
    zero_init_residual: bool = True
    val_every: Optional[int] = None
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.
    log_every: int = 10
    progress: bool = True
    progress_seconds: float = 30.

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.amp not in ('none', 'bf16', 'fp16'):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {self.batch_size}')
        if self.val_every is not None and self.val_every < 1:
            raise ValueError(f'val_every must be >= 1 epoch, or None for at most {VALIDATIONS_PER_STAGE} per stage, '
                             f'got {self.val_every}')


class TrainingInterrupted(KeyboardInterrupt):
    """:meth:`Trainer.run` was stopped by SIGINT or SIGTERM.

    On the first signal a training step in progress finishes and is checkpointed (``saved``); validation, BN
    recalibration and channel sorting stop at once (they are redone on resume). On a second signal the run stops at
    once and the last checkpoint is kept. A command line exits with ``128 + signum`` (130, 143).

    Args:
        signum: The signal.
        where: Where the run stopped (``Trainer.where()``).
        checkpoint: The checkpoint ``Trainer.resume`` continues from.
        saved: Whether it was written at the stopping step.
        detail: Replaces the message's account of what was kept.
    """

    def __init__(self, signum: int, where: str, checkpoint: Path, saved: bool = True, detail: str = ''):
        self.signum, self.where, self.checkpoint, self.saved = signum, where, checkpoint, saved
        name = signal.Signals(signum).name
        if detail:
            message = f'{name}: stopped in {where}; {detail}'
        elif saved:
            message = f'{name}: stopped at {where}; checkpoint written to {checkpoint}'
        else:
            message = f'{name} again: stopped at once, in {where}; the last checkpoint is kept at {checkpoint}'
        super().__init__(message)


class _PhaseAborted(Exception):
    """Raised by the signal handler inside work that is cheaper to redo than to finish (validation, BN calibration,
    channel sorting)."""


# --- checkpoints ----------------------------------------------------------------------------------------------------
def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects.

    Raises:
        ValueError: Naming the file and what is wrong with it (see ``ofa_timm._io.load_weights``).
    """
    return load_weights(path)[0]


def _param_groups(model: nn.Module, weight_decay: float, added_lr_scale: float) -> List[Dict[str, Any]]:
    """timm's parameter groups (no weight decay on biases and norms), each split in two where ``added_lr_scale``
    is not 1: the shared weights, and what conversion adds (``added_state()``) at ``lr_scale`` (which timm's
    schedulers apply). With 1, the groups are timm's own, as an optimizer without the option has them."""
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=getattr(
        model, 'no_weight_decay', lambda: set())())
    if added_lr_scale == 1:
        return groups
    added = set(model.added_state())
    added_ids = {id(p) for name, p in model.named_parameters() if name in added}
    split = []
    for group in groups:
        for is_added in (False, True):
            params = [p for p in group['params'] if (id(p) in added_ids) == is_added]
            if params:
                split.append({**group, 'params': params, **({'lr_scale': added_lr_scale} if is_added else {})})
    return split


def _carry_optimizer_state(previous: Dict[str, Any], previous_order: Sequence[torch.Tensor],
                           optimizer: torch.optim.Optimizer, moved: Sequence[torch.Tensor] = ()) -> None:
    """Give ``optimizer`` the per-parameter state (momentum, moments, step) of ``previous``, a state dict of an
    optimizer over the same parameters, keeping ``optimizer``'s own hyper-parameters (lr, weight decay).

    ``previous_order`` lists the parameters in ``previous``'s order (its groups', one after the other), so that the
    state follows each parameter when the two optimizers group them differently (``Stage.added_lr_scale``).
    Parameters in ``moved`` (permuted by channel sorting since ``previous`` was saved) start afresh: their carried
    state would no longer line up with their channels.
    """
    state = optimizer.state_dict()
    index = {id(p): i for group, saved in zip(optimizer.param_groups, state['param_groups'])
             for p, i in zip(group['params'], saved['params'])}
    old_index = [i for saved in previous['param_groups'] for i in saved['params']]
    skip = {id(p) for p in moved}
    state['state'] = {index[id(p)]: previous['state'][i] for p, i in zip(previous_order, old_index)
                      if i in previous['state'] and id(p) not in skip}
    optimizer.load_state_dict(state)


# --- distributed helpers --------------------------------------------------------------------------------------------
def _all_finite(loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float()
    if _dist()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together, none hangs in a collective
    return bool(finite.item())


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class _Position:
    stage: int = 0
    step: int = 0  # optimizer steps done in the stage
    global_step: int = 0
    validate: bool = False  # a validation is owed at this position (a signal stopped it; resume runs it first)


class Trainer:
    """Runs a progressive-shrinking schedule on an elastic supernet.

    Args:
        supernet: An ofa_timm elastic supernet (from ``elasticize`` or ``timm.create_model('ofa_...')``).
        schedule: The stages to run (stages that do not apply to the supernet are dropped).
        train_set: Seeded training set (``data.build_datasets``).
        val_set: Validation set (eval transform).
        calib_set: Training images with the eval transform, for BN recalibration.
        config: Run settings.
        pretrained: The supernet starts from trained weights: the ``full`` stage is skipped.
        teacher: A frozen teacher; default: the supernet's max subnet once the full stage is done.
        device: Training device (default: cuda:LOCAL_RANK if available, else cpu).
    """

    def __init__(
            self,
            supernet: nn.Module,
            schedule: Schedule,
            train_set: SeededDataset,
            val_set: torch.utils.data.Dataset,
            calib_set: torch.utils.data.Dataset,
            config: TrainConfig,
            pretrained: bool = False,
            teacher: Optional[nn.Module] = None,
            device: Optional[torch.device] = None,
    ):
        self.rank, self.world_size = _dist()
        if device is None:
            if torch.cuda.is_available():
                device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            else:
                device = torch.device('cpu')
        self.device = device
        self.config = config
        self.supernet = supernet.to(device)
        if config.channels_last:
            self.supernet.to(memory_format=torch.channels_last)
        self.pretrained = pretrained
        self.train_set, self.val_set, self.calib_set = train_set, val_set, calib_set
        self.output = Path(config.output)
        self.teacher = teacher.to(device).eval().requires_grad_(False) if teacher is not None else None
        self.model: nn.Module = self.supernet
        if self.world_size > 1:
            # Elastic depth/kernel leave parameters unused in a step: DDP must look for them.
            self.model = nn.parallel.DistributedDataParallel(
                self.supernet, device_ids=[device.index] if device.type == 'cuda' else None,
                find_unused_parameters=True)
        self.ema = ModelEmaV3(self.supernet, decay=config.ema_decay) if config.ema_decay else None
        self.sampler = EpochSampler(len(train_set), config.batch_size, config.seed, self.rank, self.world_size)
        # The stages that apply, at the length they run on this data (a schedule's min_steps floor).
        self.schedule = applicable_stages(schedule, supernet.space, pretrained).fit(self.steps_per_epoch)
        self._unknown_unlocks = unknown_unlocks(schedule, supernet.space)
        self.position = _Position()
        self.history: List[Dict[str, Any]] = []
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._scheduler: Any = None
        self._scaler = torch.amp.GradScaler(device.type, enabled=config.amp == 'fp16')
        self._resume_state: Optional[Dict[str, Any]] = None
        self._stop_after: Optional[int] = None
        self._signal: Optional[int] = None  # a stop signal this process received
        self._stopped_by: Optional[int] = None  # the signal every rank stopped for
        self._abort_ok = False  # the signal handler may abort the work in progress (see _abortable)
        self._evaluator: Optional[SubnetEvaluator] = None
        self._last_save = time.monotonic()

    # --- properties -----------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def stage_steps(self, stage: Stage) -> int:
        return self.schedule.stage_steps(stage, self.steps_per_epoch)

    def describe_schedule(self) -> str:
        """What the run will do: its stages with their optimizer steps, and a line when the schedule looks too short
        for the data (see :func:`~ofa_timm.training.schedule.short_schedule_warning`)."""
        stages = ', '.join(f'{s.name} {self.stage_steps(s)}' for s in self.schedule.stages)
        total = self.schedule.total_steps(self.steps_per_epoch)
        lines = [f'Stages (optimizer steps): {stages}; {total} in all ({self.steps_per_epoch} steps/epoch of '
                 f'{len(self.train_set):,} training images, batch {self.config.batch_size} x world size '
                 f'{self.world_size})']
        warning = short_schedule_warning(self.schedule, self.steps_per_epoch, self.pretrained)
        if warning:
            lines.append(warning)
        if not self.supernet.has_batchnorm:
            lines.append('No batch norm in this supernet: subnets are validated without BN recalibration')
        if self._unknown_unlocks:
            lines.append(f'The schedule unlocks {self._unknown_unlocks}, which this supernet does not have (its '
                         f'elastic dimensions: {list(space_dimensions(self.supernet.space))}): ignored')
        return '\n'.join(lines)

    def where(self) -> str:
        """Where the run stands: stage, epoch and step in the stage (steps done), and global step."""
        stages = self.schedule.stages
        if self.position.stage >= len(stages):
            return f'the end of the schedule (global step {self.position.global_step})'
        stage = stages[self.position.stage]
        total, spe = self.stage_steps(stage), self.steps_per_epoch
        epochs = math.ceil(total / spe)
        epoch = min(self.position.step // spe + 1, epochs)
        owed = (f', the validation of epoch {math.ceil(self.position.step / spe)} owed'
                if self.position.validate else '')
        return (f"stage '{stage.name}' ({self.position.stage + 1}/{len(stages)}), epoch {epoch}/{epochs}, "
                f'step {self.position.step}/{total} (global step {self.position.global_step}{owed})')

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.amp == 'none':
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == 'bf16' else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # --- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            'model': self.supernet.state_dict(),
            'teacher': self.teacher.state_dict() if self.teacher is not None else None,
            'ema': self.ema.module.state_dict() if self.ema is not None else None,
            'optimizer': self._optimizer.state_dict() if self._optimizer is not None else None,
            'scheduler': self._scheduler.state_dict() if self._scheduler is not None else None,
            'scaler': self._scaler.state_dict(),
            'position': asdict(self.position),
            'rng': rng_state(),
            'schedule': self.schedule.to_dict(),
            'subnet_space': self.supernet.space.to_dict(),
            'history': json.dumps(self.history),
            'metadata': checkpoint_metadata(self.supernet),
        }

    def save(self, path: Optional[Path] = None) -> None:
        if self.is_main:
            save_checkpoint(self.state_dict(), path or self.output / CHECKPOINT)
        self._last_save = time.monotonic()
        _barrier()

    def resume(self, path: Optional[Path] = None) -> None:
        """Load a checkpoint written by :meth:`save`; :meth:`run` then continues where it stopped."""
        path = Path(path or self.output / CHECKPOINT)
        if not path.is_file():
            raise ValueError(f'No checkpoint to resume from at {path}')
        state = load_checkpoint(path)
        # A checkpoint of 0.2.0 lists unlocks its family lacks (a ResNet's 'kernel'): they unlocked nothing
        written = known_unlocks(Schedule.from_dict(state['schedule']), self.supernet.space)
        if written.as_run(self.steps_per_epoch) != self.schedule.as_run(self.steps_per_epoch):
            # A preset may have changed since the run started ('fast' between releases): keep the run's own, so that
            # it can still be resumed.
            kept = path.with_name(f'{path.stem}_schedule.yaml')
            if self.is_main:
                written.to_yaml(kept)
            raise ValueError(f'{path} was written by a run with another schedule; resume with the same --schedule and '
                             f'--epochs-scale, or with --schedule {kept}, the schedule it was written with (a preset '
                             f'such as auto may have changed since)')
        self.supernet.load_state_dict(state['model'])
        if state['teacher'] is not None:
            self.teacher = self._make_teacher()
            self.teacher.load_state_dict(state['teacher'])
        if self.ema is not None and state['ema'] is not None:
            self.ema.module.load_state_dict(state['ema'])
        self.position = _Position(**state['position'])
        self.history = json.loads(state['history'])
        self._resume_state = state

    # --- the run --------------------------------------------------------------------------------------------
    def run(self, stop_after: Optional[int] = None) -> List[Dict[str, Any]]:
        """Run (or continue) the schedule. Returns the per-stage summaries.

        Args:
            stop_after: Stop (with a checkpoint) once this many optimizer steps are done in total; ``resume`` then
                continues from there. For time-boxed jobs and for testing resumption.
        """
        self.output.mkdir(parents=True, exist_ok=True)
        self._stop_after = stop_after
        self._signal = self._stopped_by = None
        self._last_save = time.monotonic()
        stages = self.schedule.stages
        with self._stop_on_signals():
            if self.pretrained and self.position.global_step == 0 and self.source_check is None:
                try:
                    with self._abortable():
                        self._check_source()
                except _PhaseAborted:
                    raise TrainingInterrupted(self._signal, self.where(), self.output / CHECKPOINT, detail=(
                        'no step had run: there is no checkpoint, and the run starts afresh')) from None
            while self.position.stage < len(stages):
                stage = stages[self.position.stage]
                try:
                    with self._abortable():
                        self.prepare_stage(stage)
                except _PhaseAborted:  # nothing of the stage has run: the last checkpoint is where it starts
                    raise TrainingInterrupted(self._signal, self.where(), self.output / CHECKPOINT, detail=(
                        f'the checkpoint at the start of the stage is kept at {self.output / CHECKPOINT}'
                        if (self.output / CHECKPOINT).is_file() else
                        'no step had run: there is no checkpoint, and the run starts afresh')) from None
                if not self._run_stage(stage):
                    self.save()
                    if self._stopped_by is not None:
                        raise TrainingInterrupted(self._stopped_by, self.where(), self.output / CHECKPOINT)
                    return self.summaries()
                self.position = _Position(self.position.stage + 1, 0, self.position.global_step)
                self._scheduler = None  # the optimizer (and its checkpointed state) stays for a stage that carries it
                self.save()
        return self.summaries()

    @property
    def source_check(self) -> Optional[Dict[str, Any]]:
        """What a pretrained start measured before its first step (see :meth:`_check_source`), else None."""
        return next((r for r in self.history if r.get('type') == 'source'), None)

    def _check_source(self) -> None:
        """Validate the source (the max subnet before any step) at up to five of the space's resolutions, log it, and
        warn of resolutions where it scores far below its own: progressive shrinking has to learn those too, in
        weights the max subnet shares, which cost a converted ConvNeXt's max subnet 4.3 points (docs/families.md).
        Training draws the same numbers with or without this check."""
        if self.is_main:
            with preserved_rng(self.device):  # extraction draws init weights: keep the run's numbers as without it
                top1 = {subnet.resolution: self.evaluate_subnet(subnet)['top1']
                        for subnet in source_check_subnets(self.supernet.space)}
            record = {'type': 'source', 'global_step': 0, 'subnet': 'max',
                      'top1': {str(res): acc for res, acc in top1.items()}}
            self._log(record)
            self.history.append(record)
            for line in source_check_lines(top1, self.supernet.num_classes):
                print(line, flush=True)
        _barrier()

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, SIGINT/SIGTERM ask the loop to stop after the step in progress (see :meth:`_poll`); a
        second signal stops at once, keeping the last checkpoint. Previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:
                raise TrainingInterrupted(signum, self.where(), self.output / CHECKPOINT, saved=False)
            self._signal = signum
            if self.is_main:  # os.write: print() is not safe inside a signal handler
                what = 'now (what was in progress is redone on resume)' if self._abort_ok else 'after this step'
                os.write(2, f'\n{signal.Signals(signum).name}: stopping {what} with a checkpoint (once more stops at '
                            f'once, keeping the last checkpoint)\n'.encode())
            if self._abort_ok:
                self._abort_ok = False
                raise _PhaseAborted()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def _poll(self) -> Tuple[Optional[int], bool]:
        """After each step: the stop signal any rank received (or None), and whether a wall-clock checkpoint is due.

        Every rank gets the same answer (a max all-reduce), so all ranks stop, or checkpoint, at the same step.
        """
        minutes = self.config.checkpoint_minutes
        due = bool(minutes) and time.monotonic() - self._last_save >= minutes * 60
        flags = [self._signal or 0, int(due)]
        if self.world_size > 1:
            agreed = torch.tensor(flags, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        return (flags[0] or None), bool(flags[1])

    @contextlib.contextmanager
    def _abortable(self) -> Iterator[None]:
        """Work in this block that a stop signal ends at once (raising ``_PhaseAborted``): it is redone on resume,
        so only the training state needs saving."""
        if self._signal is not None:
            raise _PhaseAborted()
        self._abort_ok = True
        try:
            yield
        finally:
            self._abort_ok = False

    def _make_teacher(self) -> nn.Module:
        # Building the copy draws random init weights: keep the run's RNG out of it, so that a run resumed at the
        # boundary of the stage that builds the teacher draws the same numbers as the uninterrupted run.
        with preserved_rng(self.device):
            teacher = self.supernet.extract('max').to(self.device).eval().requires_grad_(False)
        if self.config.channels_last:
            teacher.to(memory_format=torch.channels_last)
        return teacher

    def prepare_stage(self, stage: Stage) -> None:
        """Set the run up for ``stage`` at the current position: on entering it, channel sorting (before an expand
        stage), the teacher, a new optimizer (carrying the previous stage's state when the stage says so) and the
        stage's learning-rate schedule; on resuming inside it, the saved optimizer, scheduler and RNG states.
        :meth:`run` calls it before each stage; call it yourself to drive :meth:`train_step` by hand."""
        resumed = self._resume_state is not None
        entering = self.position.step == 0  # also when resuming from the previous stage's end
        fresh = (self.config.zero_init_residual and not self.pretrained and self.position.global_step == 0
                 and not stage.unlock)
        if fresh:
            zero_init_residual(self.supernet)
        carry = stage.carry_optimizer and entering
        # Which weights channel sorting permutes: their carried optimizer state must not follow them.
        params = list(self.supernet.parameters()) if carry else []
        before = [p.detach().clone() for p in params]
        # Entering the stage: sort before the first step.
        sorted_ = entering and bool(rank_before_stage(self.supernet, self.schedule, self.position.stage))
        if (fresh or sorted_) and self.ema is not None:  # the EMA follows the new or permuted weights
            self.ema.module.load_state_dict(self.supernet.state_dict())
        moved = [p for p, b in zip(params, before) if sorted_ and not torch.equal(p, b)]
        del before
        if distills_from_teacher(stage) and self.teacher is None:
            self.teacher = self._make_teacher()
        lr = stage.lr * self.world_size
        previous = self._optimizer  # the previous stage's, when this process ran it
        self._optimizer = create_optimizer_v2(
            self.supernet, opt=self.config.opt, lr=lr, weight_decay=self.config.weight_decay,
            momentum=self.config.momentum, param_group_fn=lambda model: _param_groups(
                model, self.config.weight_decay, stage.added_lr_scale))
        if carry:  # from the checkpoint at the stage boundary, or from the stage this process just ran
            if resumed:  # the previous stage grouped the parameters as its own added_lr_scale says
                carried = self._resume_state['optimizer']
                before_scale = self.schedule.stages[max(self.position.stage - 1, 0)].added_lr_scale
                order = [p for g in _param_groups(self.supernet, self.config.weight_decay, before_scale)
                         for p in g['params']]
            else:
                carried = previous.state_dict() if previous is not None else None
                order = [p for g in previous.param_groups for p in g['params']] if previous is not None else []
            if carried is not None:
                _carry_optimizer_state(carried, order, self._optimizer, moved)
        self._scheduler, _ = stage_scheduler(
            self._optimizer, self.schedule, stage, self.steps_per_epoch, self.config, lr=lr)
        if resumed:
            state = self._resume_state
            if state['optimizer'] is not None and self.position.step > 0:
                self._optimizer.load_state_dict(state['optimizer'])
                self._scheduler.load_state_dict(state['scheduler'])
            self._scaler.load_state_dict(state['scaler'])
            set_rng_state(state['rng'])
            self._resume_state = None
        self._scheduler.step_update(self.position.step)

    def _run_stage(self, stage: Stage) -> bool:
        """Train the prepared stage to its end (True), or until ``stop_after`` steps or a stop signal (False)."""
        sampler = StepSampler(self.supernet.space, stage, self.config.seed)
        total = self.stage_steps(stage)
        spe = self.steps_per_epoch
        epochs = math.ceil(total / spe)
        val_every = self.config.val_every or math.ceil(epochs / VALIDATIONS_PER_STAGE)
        bar = None
        if self.is_main and self.config.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.position.step, desc=f'{stage.name}', unit='step', dynamic_ncols=True,
                       disable=None)  # None: no bar when the output is not a terminal (CI logs)
        # Without a bar (output to a file, or progress bars off): a progress line now and then, so that a log under a
        # scheduler says where the run is.
        lines = self.is_main and (bar is None or bar.disable)
        last_line = -math.inf
        stage_start = time.time()
        try:
            if self.position.validate:  # a signal stopped the validation owed here: it runs first
                if not self._owed_validation(stage, sampler, stage_start, lines):
                    return False
                if self.position.step % spe == 0 and self.position.step < total:
                    self.save()
            while self.position.step < total:
                epoch, start_batch = divmod(self.position.step, spe)
                self.sampler.set_epoch(self.position.stage * 100_000 + epoch, start_batch)
                loader = train_loader(self.train_set, self.sampler, self.config.workers, self.device.type == 'cuda')
                tick, images_seen = time.time(), 0
                for images, targets in loader:
                    subnets = sampler.sample(self.position.step)
                    loss = self.train_step(stage, subnets, images, targets)
                    self.position.step += 1
                    self.position.global_step += 1
                    images_seen += images.shape[0] * self.world_size
                    rate = images_seen / max(time.time() - tick, 1e-9)
                    if bar is not None:
                        bar.set_postfix_str(f'ep {epoch + 1}/{epochs} loss {loss:.3f} {rate:.0f} img/s')
                        bar.update(1)
                    if lines and (time.monotonic() - last_line >= self.config.progress_seconds
                                  or self.position.step == total):
                        last_line = time.monotonic()
                        print(f'{stage.name} ep {epoch + 1}/{epochs} step {self.position.step}/{total} loss {loss:.3f} '
                              f"lr {self._optimizer.param_groups[0]['lr']:.3g} {rate:.0f} img/s", flush=True)
                    if self.is_main and self.position.step % self.config.log_every == 0:
                        self._log({'type': 'train', 'stage': stage.name, 'epoch': epoch, 'step': self.position.step,
                                   'global_step': self.position.global_step, 'loss': loss,
                                   'lr': self._optimizer.param_groups[0]['lr'], 'img_per_s': rate})
                    stop_signal, checkpoint_due = self._poll()  # the same answer on every rank
                    end_of_epoch = self.position.step % spe == 0 or self.position.step == total
                    stopping = self._stop_after is not None and self.position.global_step >= self._stop_after
                    if stop_signal is not None:
                        self._stopped_by, stopping = stop_signal, True
                    done_epochs = math.ceil(self.position.step / spe)
                    if end_of_epoch and (self.position.step == total or done_epochs % val_every == 0):
                        self.position.validate = True  # owed; a signal leaves it to the resumed run
                        if self._stopped_by is None and not self._owed_validation(stage, sampler, stage_start, lines):
                            stopping = True
                    if stopping:
                        return False  # run() writes the checkpoint
                    if end_of_epoch:
                        if self.position.step < total:
                            self.save()
                        break
                    every = self.config.checkpoint_every
                    if checkpoint_due or every and self.position.step % every == 0:
                        self.save()
        finally:
            if bar is not None:
                bar.close()
        return True

    def _owed_validation(self, stage: Stage, sampler: StepSampler, stage_start: float, show: bool) -> bool:
        """Run the validation owed at this position; False when a stop signal came during it (then every rank stops,
        and the validation, which a signal ends at once, is owed again on resume)."""
        epoch = math.ceil(self.position.step / self.steps_per_epoch)
        rng = rng_state()  # validation draws from the global RNG (data-loader seeds): a redo must start from here
        completed = self._validate(stage, sampler, epoch, time.time() - stage_start, show)
        if completed:
            self.position.validate = False
        else:
            set_rng_state(rng)
        stop_signal, _ = self._poll()  # a signal that came during the validation, on any rank
        if stop_signal is not None:
            self._stopped_by = stop_signal
            return False
        return True

    def train_step(self, stage: Stage, subnets: List[Subnet], images: torch.Tensor, targets: torch.Tensor) -> float:
        """One progressive-shrinking step of ``stage`` (prepared by :meth:`prepare_stage`) on a batch: the teacher,
        the loss of each subnet back-propagated into the shared weights, one optimizer step, EMA and scheduler
        updates. Returns the mean loss of the subnets. It does not move the run's position."""
        cfg = self.config
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        mixed = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=self.supernet.num_classes)
            images, mixed = mixer(images, targets)

        def resized(resolution: Optional[int]) -> torch.Tensor:
            out = resize_to(images, resolution)  # from the loader's images, as evaluation resizes
            return out.contiguous(memory_format=torch.channels_last) if cfg.channels_last else out

        step_images = resized(subnets[0].resolution)
        teacher = teacher_logits(self.teacher, step_images, stage, self._autocast)
        self._optimizer.zero_grad(set_to_none=True)
        self.model.train()

        def forward(subnet: Subnet) -> Tuple[torch.Tensor, torch.Tensor]:
            x = step_images if subnet.resolution == subnets[0].resolution else resized(subnet.resolution)
            with self._autocast():
                logits = self.model(x)
                return classification_loss(logits, targets, cfg.label_smoothing, mixed), logits

        loss = shrinking_step(
            self.supernet, subnets, stage, forward, lambda loss: self._scaler.scale(loss).backward(), cfg, teacher,
            step=self.position.step, is_finite=_all_finite,
            hint=f'Global step {self.position.global_step}; the last good checkpoint is kept at '
                 f'{self.output / CHECKPOINT}: lower the learning rate or enable --clip-grad, then --resume.')
        clip = cfg.clip_grad if cfg.clip_grad is not None else stage.clip_grad
        if clip is not None:
            self._scaler.unscale_(self._optimizer)
            torch.nn.utils.clip_grad_norm_(self.supernet.parameters(), clip)
        self._scaler.step(self._optimizer)
        self._scaler.update()
        if self.ema is not None:
            self.ema.update(self.supernet, step=self.position.global_step)
        self._scheduler.step_update(self.position.step + 1)
        return loss

    # --- validation -----------------------------------------------------------------------------------------
    def evaluate_subnet(self, subnet: Subnet) -> Dict[str, float]:
        """BN-recalibrate ``subnet`` on a fixed subset of training images and measure top-1/top-5."""
        if self._evaluator is None:
            cfg = self.config
            self._evaluator = SubnetEvaluator(self.calib_set, self.val_set, cfg.calib_images, cfg.batch_size,
                                              cfg.seed, cfg.workers, self.device, self._autocast)
        return self._evaluator(self.supernet, subnet)

    def _validate(self, stage: Stage, sampler: StepSampler, epoch: int, elapsed: float, show: bool = False) -> bool:
        """Rank 0 evaluates the validation grid, logs it and adds it to the history; every rank waits for it.
        Returns False (nothing logged) when a stop signal ended it."""
        completed = True
        if self.is_main:
            try:
                with self._abortable():
                    records, results = [], []
                    for label, subnet in sampler.validation_grid(self.config.val_resolutions):
                        metrics = self.evaluate_subnet(subnet)
                        results.append(metrics)
                        records.append({'type': 'val', 'stage': stage.name, 'epoch': epoch,
                                        'global_step': self.position.global_step, 'subnet': label,
                                        'spec': subnet.to_dict(), **metrics})
            except _PhaseAborted:
                completed = False
        if self.is_main and completed:
            for r in records:
                self._log(r)
            mean1 = sum(r['top1'] for r in results) / len(results)
            mean5 = sum(r['top5'] for r in results) / len(results)
            record = {'type': 'val_mean', 'stage': stage.name, 'epoch': epoch, 'step': self.position.step,
                      'global_step': self.position.global_step, 'top1': mean1, 'top5': mean5,
                      'min_top1': min(r['top1'] for r in results), 'max_top1': max(r['top1'] for r in results),
                      'seconds': elapsed, 'names': sampler.grid_names()}
            self._log(record)
            self.history.append(record)
            if show:
                print(f"{stage.name} ep {epoch} validation: mean top-1 {mean1:.2f} (min {record['min_top1']:.2f}, "
                      f"max {record['max_top1']:.2f}) over {len(results)} subnets", flush=True)
        _barrier()
        return completed

    def _log(self, record: Dict[str, Any]) -> None:
        with open(self.output / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')

    def summaries(self) -> List[Dict[str, Any]]:
        """Last validation record of each stage."""
        last: Dict[str, Dict[str, Any]] = {}
        for record in self.history:
            if record.get('type', 'val_mean') == 'val_mean':  # not the source check
                last[record['stage']] = record
        return [last[s.name] for s in self.schedule.stages if s.name in last]
