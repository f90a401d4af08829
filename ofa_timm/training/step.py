"""One progressive-shrinking step and the per-stage learning rate, shared by ``Trainer`` and the NNI strategy.

A step trains the step's subnets on one batch: the frozen teacher runs once (or, with sandwich sampling, the max
subnet is the teacher of the others), each subnet's loss plus its distillation term is back-propagated into the
shared weights, and the caller takes one optimizer step. The settings both loops share are declared once, in
:class:`ShrinkingConfig`.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.scheduler import create_scheduler_v2

from ..space import Subnet
from .distill import KD_KINDS, distillation_loss
from .schedule import Schedule, Stage

__all__ = ['ShrinkingConfig', 'NonFiniteLossError', 'stage_scheduler', 'distills_from_teacher', 'teacher_logits',
           'shrinking_step']


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


@dataclass
class ShrinkingConfig:
    """Settings of progressive shrinking that ``ofa-timm train``, ``Trainer`` and the NNI strategy share.

    Args:
        seed: Run seed (subnet sampling; for ``Trainer`` also data order and augmentation).
        kd_kind: Distillation loss: 'ce' (soft-target cross entropy, OFA), 'kl' or 'alpha' (AlphaNet's adaptive
            α-divergence).
        kd_temperature: Distillation temperature.
        calib_images: Training images used to recalibrate BN statistics of each validated subnet (OFA: 2000).
        warmup_lr: Learning rate at the start of a stage's warmup.
        min_lr: Final learning rate of each stage's cosine.
        val_resolutions: Resolutions of the validation grid (default: min and max of the stage).
    """
    seed: int = 0
    kd_kind: str = 'ce'
    kd_temperature: float = 1.0
    calib_images: int = 2000
    warmup_lr: float = 1e-5
    min_lr: float = 0.
    val_resolutions: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        if self.kd_kind not in KD_KINDS:
            raise ValueError(f'kd_kind must be one of {KD_KINDS}, got {self.kd_kind!r}')
        if not self.kd_temperature > 0:
            raise ValueError(f'kd_temperature must be > 0, got {self.kd_temperature}')
        if self.calib_images < 1:
            raise ValueError(f'calib_images must be >= 1, got {self.calib_images}')


def stage_scheduler(
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        stage: Stage,
        steps_per_epoch: int,
        config: ShrinkingConfig,
        lr: Optional[float] = None,
        total_steps: Optional[int] = None,
) -> Tuple[object, int]:
    """The stage's learning-rate schedule, stepped per optimizer step: linear warmup from ``config.warmup_lr``, then
    a cosine from the stage's lr down to ``config.min_lr`` (timm's ``create_scheduler_v2``).

    The optimizer's learning rate is set to the stage's peak first, so one optimizer can serve every stage.

    Args:
        optimizer: The optimizer whose param groups the scheduler drives.
        schedule: The schedule (for its epoch scale).
        stage: The stage.
        steps_per_epoch: Optimizer steps per epoch.
        config: Warmup start and final learning rate.
        lr: Peak learning rate (default ``stage.lr``; the trainer passes it scaled by the world size).
        total_steps: Length of the stage in optimizer steps (default: its epochs times ``steps_per_epoch``).

    Returns:
        (scheduler, total optimizer steps of the stage). Call ``scheduler.step_update(step)`` before each step.
    """
    peak = stage.lr if lr is None else lr
    for group in optimizer.param_groups:
        group['lr'] = group['initial_lr'] = peak
    total = total_steps or schedule.stage_steps(stage, steps_per_epoch)
    warmup = min(total - 1, schedule.warmup_steps(stage, steps_per_epoch))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=total, warmup_epochs=max(0, warmup), warmup_lr=config.warmup_lr,
        min_lr=config.min_lr, updates_per_epoch=1, step_on_epochs=False)
    return scheduler, total


def distills_from_teacher(stage: Stage) -> bool:
    """Whether ``stage`` distils from the frozen teacher (the max subnet as the run's first shrinking stage found
    it): it has a KD ratio, samples uniformly or sandwiches without in-place distillation, and unlocks something (a
    stage that trains only the full network would distil from a frozen copy of itself)."""
    return (stage.kd_ratio > 0 and (stage.sampling == 'uniform' or not stage.inplace_kd)
            and bool(stage.unlock))


def teacher_logits(
        teacher: Optional[nn.Module], images: torch.Tensor, stage: Stage,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Optional[torch.Tensor]:
    """The frozen teacher's logits for the batch, when the stage distils from it (once per batch, for every
    subnet of the step); None otherwise (no KD, sandwich sampling's in-place distillation, or a stage that trains
    only the full network, whose teacher would be itself)."""
    if not distills_from_teacher(stage) or teacher is None:
        return None
    with torch.no_grad(), autocast():
        return teacher(images)


def _is_finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss.detach()).all())


def shrinking_step(
        supernet: nn.Module,
        subnets: List[Subnet],
        stage: Stage,
        forward: Callable[[Subnet], Tuple[torch.Tensor, torch.Tensor]],
        backward: Callable[[torch.Tensor], None],
        config: ShrinkingConfig,
        teacher: Optional[torch.Tensor] = None,
        step: int = 0,
        is_finite: Callable[[torch.Tensor], bool] = _is_finite,
        hint: str = '',
) -> float:
    """Accumulate the gradients of one progressive-shrinking step; the caller zeroes them before and steps after.

    Args:
        supernet: The elastic supernet (each subnet is activated on it).
        subnets: The step's subnets (with sandwich sampling the first is the max subnet, the in-place teacher).
        stage: The stage (KD ratio, sampling rule).
        forward: Runs the active subnet on the batch; returns (its loss without distillation, its logits).
        backward: Back-propagates a loss (e.g. through a grad scaler or Lightning's ``manual_backward``).
        config: Distillation settings.
        teacher: The teacher's logits for the batch (see :func:`teacher_logits`).
        step: Position of the step in the stage, for the error message.
        is_finite: Whether a loss is finite (in DDP, on every rank: all ranks must stop together).
        hint: Appended to the error message (what the user can do).

    Returns:
        The mean loss of the step's subnets.

    Raises:
        NonFiniteLossError: Naming the stage, the step and the subnet.
    """
    total = 0.
    in_place = stage.sampling == 'sandwich' and stage.inplace_kd
    for i, subnet in enumerate(subnets):
        supernet.set_active(subnet)
        loss, logits = forward(subnet)
        if in_place and i == 0:
            teacher = logits.detach()  # in-place distillation from the max subnet
        elif teacher is not None and stage.kd_ratio > 0:
            kd = stage.kd_ratio * distillation_loss(logits, teacher, config.kd_kind, config.kd_temperature)
            # Stage allows labels_max_only with in-place distillation only: the teacher is this step's max subnet
            loss = kd if stage.labels_max_only else loss + kd
        if not is_finite(loss):
            raise NonFiniteLossError(
                f"Non-finite loss ({loss.item()}) in stage '{stage.name}' at step {step} for subnet "
                f'{subnet.to_dict()}.{" " + hint if hint else ""}')
        backward(loss)
        total += loss.item()
    return total / len(subnets)
