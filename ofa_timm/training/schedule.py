"""The progressive-shrinking schedule: a typed, declarative list of stages, and the recipes that write one for any
supernet from the dimensions its family declares.

A :class:`Stage` names the dimensions it unlocks (by label, ``'kernel'``, ``'depth'``, ``'heads'``, ..., or by name)
and how far: ``'all'`` choices, or the ``n`` largest ones (OFA's "phase 1" of depth and expand unlocks the two
largest). A :class:`Recipe` (the presets ``ofa``, ``fast``, ``demo``, ``scratch``) writes the stages for a space: the
``full`` stage that trains the largest subnet, then, in the order of each dimension's ``shrink_order``, one stage for
a dimension unlocked at once (OFA's kernel) or two for one unlocked in two phases (OFA's depth, expand and width).
Dimensions of ``shrink_order`` 0 (the resolution) are unlocked in every stage after ``full``. For MobileNetV3 this is
the reference order full → kernel → depth 1/2 → expand 1/2; for ResNet, depth 1/2 → expand 1/2 → width 1/2.

:func:`build_schedule` is the one way the command line, the pipeline, the NNI strategy and the benchmarks make the
schedule they run.
"""
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import yaml

from ..space import Dimension, SearchSpace

__all__ = ['Stage', 'Schedule', 'Recipe', 'PRESETS', 'load_schedule', 'build_schedule', 'recommended_min_steps',
           'short_schedule_warning', 'unlock_level', 'SAMPLING_RULES', 'ScheduleLike']

SAMPLING_RULES: Tuple[str, ...] = ('uniform', 'sandwich')
Level = Union[str, int]


@dataclass(frozen=True)
class Stage:
    """One progressive-shrinking stage.

    Args:
        name: Stage name (unique within a schedule).
        epochs: Length in epochs (before the schedule's ``epochs_scale``).
        lr: Peak learning rate per process (scaled by the world size at run time, as in OFA).
        unlock: Dimension (label or name) -> ``'all'`` or the number of largest choices to allow. Dimensions not
            listed stay at their max.
        warmup_epochs: Linear warmup length, in epochs.
        subnets_per_step: Subnets whose gradients are accumulated per optimizer step. Under the sandwich rule the
            first is the max and the second the min, so a stage of 1 trains the max alone and nothing it unlocks.
        kd_ratio: Weight of the distillation loss (0 disables the teacher).
        sampling: ``'uniform'`` (OFA) or ``'sandwich'`` (BigNAS: max + min + random subnets).
        inplace_kd: With sandwich sampling, distil from the max subnet of the same step (BigNAS's in-place
            distillation, which improves with the max); False distils every subnet, the max included, from the frozen
            teacher (the max subnet as the run's first shrinking stage found it), which holds a converged max where
            it started. Uniform sampling always distils from the frozen teacher.
        clip_grad: Clip the total gradient norm of each optimizer step to this (None: no clipping;
            ``TrainConfig.clip_grad``, when set, overrides it). Rare huge gradients, as EfficientNet's at the start of
            training and in its expand stages, then cannot undo what was learned.
        carry_optimizer: Start from the previous stage's optimizer state (momentum, Adam moments) instead of a fresh
            one; the learning-rate schedule (warmup, cosine) still restarts, and weights that channel ranking
            permutes start afresh. OFA restarts fresh. Only ``Trainer`` reads it: the NNI strategy steps the
            evaluator's one optimizer through every stage.
        floor_weight: This stage's weight, per epoch, in the schedule's floor: where ``Schedule.min_steps`` lengthens
            the schedule, a stage of weight 2 gets twice the share of one of weight 1 with as many epochs. The
            ``scratch`` recipe weighs the stages after ``full`` 2, because their steps are shared among subnets,
            while a longer full stage overfits a small dataset (the budget curve in docs/results.md).
        min_resolution: With sandwich sampling, train the min subnet at the stage's smallest resolution at every step,
            where it is deployed, instead of at the resolution drawn for the step's other subnets (trained alone, a
            subnet sees only its own resolution).
        added_lr_scale: Learning-rate multiplier for what conversion adds to the source model (kernel transforms,
            per-resolution position embeddings; ``added_state()``): they start at identity or zero and only the
            smaller subnets use them, so they may move faster than the shared weights. Only ``Trainer`` reads it.
        labels_max_only: With sandwich sampling and in-place distillation, only the max subnet learns from the labels
            (with label smoothing and mixup); the others learn from its predictions alone (BigNAS regularizes only
            the max subnet).
    """
    name: str
    epochs: float
    lr: float
    unlock: Mapping[str, Level] = field(default_factory=dict)
    warmup_epochs: float = 0.
    subnets_per_step: int = 1
    kd_ratio: float = 1.0
    sampling: str = 'uniform'
    inplace_kd: bool = True
    clip_grad: Optional[float] = None
    carry_optimizer: bool = False
    floor_weight: float = 1.0
    min_resolution: bool = False
    added_lr_scale: float = 1.0
    labels_max_only: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError('Stage.name must be a non-empty string')
        if self.epochs < 0 or not math.isfinite(self.epochs):
            raise ValueError(f"Stage '{self.name}': epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"Stage '{self.name}': lr must be > 0, got {self.lr}")
        if self.subnets_per_step < 1:
            raise ValueError(f"Stage '{self.name}': subnets_per_step must be >= 1, got {self.subnets_per_step}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"Stage '{self.name}': clip_grad must be > 0 or None, got {self.clip_grad}")
        if self.kd_ratio < 0:
            raise ValueError(f"Stage '{self.name}': kd_ratio must be >= 0, got {self.kd_ratio}")
        if not self.floor_weight > 0 or not math.isfinite(self.floor_weight):
            raise ValueError(f"Stage '{self.name}': floor_weight must be > 0, got {self.floor_weight}")
        if not isinstance(self.min_resolution, bool):
            raise ValueError(f"Stage '{self.name}': min_resolution must be true or false, got {self.min_resolution!r}")
        if not self.added_lr_scale > 0 or not math.isfinite(self.added_lr_scale):
            raise ValueError(f"Stage '{self.name}': added_lr_scale must be > 0, got {self.added_lr_scale}")
        if not isinstance(self.labels_max_only, bool):
            raise ValueError(
                f"Stage '{self.name}': labels_max_only must be true or false, got {self.labels_max_only!r}")
        if self.labels_max_only and not (self.sampling == 'sandwich' and self.inplace_kd and self.kd_ratio > 0):
            raise ValueError(f"Stage '{self.name}': labels_max_only needs in-place distillation (sampling "
                             f"'sandwich', inplace_kd true, kd_ratio > 0), got sampling {self.sampling!r}, "
                             f"inplace_kd {self.inplace_kd}, kd_ratio {self.kd_ratio}")
        if self.sampling not in SAMPLING_RULES:
            raise ValueError(f"Stage '{self.name}': sampling {self.sampling!r} not in {list(SAMPLING_RULES)}")
        unlock = dict(self.unlock or {})
        for dim, level in unlock.items():
            if not isinstance(dim, str) or not dim.isidentifier():
                raise ValueError(f"Stage '{self.name}': unlock keys are dimension labels or names, got {dim!r}")
            if level != 'all' and not (isinstance(level, int) and not isinstance(level, bool) and level >= 1):
                raise ValueError(
                    f"Stage '{self.name}': unlock[{dim!r}] must be 'all' or a positive int, got {level!r}")
        object.__setattr__(self, 'unlock', unlock)

    def lengthened(self, factor: float) -> 'Stage':
        """This stage ``factor`` times as long, its warmup too."""
        return replace(self, epochs=self.epochs * factor, warmup_epochs=self.warmup_epochs * factor)


def unlock_level(unlock: Mapping[str, Level], dimension: Dimension) -> Optional[Level]:
    """How far ``unlock`` opens ``dimension`` (named by its label or its name): ``'all'``, ``n`` or None."""
    return unlock.get(dimension.label, unlock.get(dimension.name))


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages, a global epoch scale and a floor in optimizer steps.

    Stages are measured in epochs, so that a recipe carries over between datasets of similar size. On a small dataset
    epochs are short, and a recipe made for a larger one would train for too few steps: ``min_steps`` is the
    schedule's floor. Where its epochs give fewer optimizer steps in all, :meth:`fit` lengthens the stages (and their
    warmups) until the whole schedule takes ``min_steps``: each in proportion to its epochs times its
    ``Stage.floor_weight``, and none below its own epochs.

    Args:
        stages: The stages, in training order.
        epochs_scale: Multiplies every stage's epochs (and warmup); 0.01 turns the reference recipe into a toy run.
        min_steps: The fewest optimizer steps the whole schedule may take (0: no floor).
    """
    stages: Tuple[Stage, ...]
    epochs_scale: float = 1.0
    min_steps: int = 0

    def __post_init__(self) -> None:
        stages = tuple(s if isinstance(s, Stage) else Stage(**s) for s in self.stages)
        if not stages:
            raise ValueError('A schedule needs at least one stage')
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f'Stage names must be unique, got {names}')
        if not self.epochs_scale > 0 or not math.isfinite(self.epochs_scale):
            raise ValueError(f'epochs_scale must be > 0, got {self.epochs_scale}')
        if self.min_steps < 0:
            raise ValueError(f'min_steps must be >= 0, got {self.min_steps}')
        object.__setattr__(self, 'stages', stages)

    def scaled(self, epochs_scale: float) -> 'Schedule':
        """The same schedule with another epoch scale."""
        return replace(self, epochs_scale=epochs_scale)

    def stage_epochs(self, stage: Stage) -> float:
        return stage.epochs * self.epochs_scale

    def stage_steps(self, stage: Stage, steps_per_epoch: int) -> int:
        """Optimizer steps of ``stage`` (at least one)."""
        return max(1, round(self.stage_epochs(stage) * steps_per_epoch))

    def warmup_steps(self, stage: Stage, steps_per_epoch: int) -> int:
        """Optimizer steps of ``stage``'s warmup."""
        return round(stage.warmup_epochs * self.epochs_scale * steps_per_epoch)

    def total_steps(self, steps_per_epoch: int) -> int:
        return sum(self.stage_steps(s, steps_per_epoch) for s in self.stages)

    def as_run(self, steps_per_epoch: int) -> Tuple[Stage, ...]:
        """The stages as they train at ``steps_per_epoch``, their length and warmup counted in optimizer steps: two
        schedules that train alike compare equal, whether a floor lengthened their stages or their epoch scale (as
        it did before ``Stage.floor_weight``)."""
        return tuple(replace(s, epochs=self.stage_steps(s, steps_per_epoch),
                             warmup_epochs=self.warmup_steps(s, steps_per_epoch), floor_weight=1.)
                     for s in self.stages)

    def fit(self, steps_per_epoch: int) -> 'Schedule':
        """The schedule as it runs at ``steps_per_epoch``: where its epochs give fewer than ``min_steps`` optimizer
        steps in all, every stage (and its warmup) lengthened by ``max(1, c * floor_weight)``, with the least ``c``
        that reaches the floor. With equal weights that is every stage in proportion to its epochs."""
        if self.total_steps(steps_per_epoch) >= self.min_steps:
            return self

        def stretched(c: float) -> 'Schedule':
            return replace(self, stages=tuple(s.lengthened(max(1., c * s.floor_weight)) for s in self.stages))

        # Every stage stretched at c0 gives the floor up to rounding; the least c is found by bisection, as the
        # stages at their own epochs (factor 1) and rounding to whole steps make the total a step function of c.
        weighted = sum(self.stage_epochs(s) * s.floor_weight for s in self.stages) * steps_per_epoch
        if weighted == 0:
            raise ValueError(f'Stages of 0 epochs cannot be lengthened to the floor of {self.min_steps} steps')
        lo, hi = 0., self.min_steps / weighted
        while stretched(hi).total_steps(steps_per_epoch) < self.min_steps:
            hi *= 1.01
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if stretched(mid).total_steps(steps_per_epoch) >= self.min_steps else (mid, hi)
        return stretched(hi)

    def to_dict(self) -> Dict[str, Any]:
        return {'epochs_scale': self.epochs_scale, 'min_steps': self.min_steps,
                'stages': [asdict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'Schedule':
        unknown = set(d) - {'epochs_scale', 'min_steps', 'stages'}
        if unknown:
            raise ValueError(f'Unknown schedule keys {sorted(unknown)}; allowed: epochs_scale, min_steps, stages')
        if 'stages' not in d:
            raise ValueError("A schedule needs a 'stages' list")
        stages = []
        for i, s in enumerate(d['stages']):
            try:
                stages.append(Stage(**s))
            except TypeError as e:
                raise ValueError(f'Schedule stage {i}: {e}') from None
        return cls(tuple(stages), float(d.get('epochs_scale', 1.0)), int(d.get('min_steps', 0)))

    def to_yaml(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> 'Schedule':
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))


@dataclass(frozen=True)
class Recipe:
    """How to train any supernet with progressive shrinking: the ``full`` stage, then stages for the dimensions its
    family declares, in their ``shrink_order`` (see the module's docstring).

    A dimension unlocked at once (``phases`` 1) gets a stage named after its label with the ``single_*`` settings; one
    unlocked in two phases gets ``<label>_1`` (its two largest choices, ``phase1_*``) and ``<label>_2`` (all of them,
    ``phase2_*``). The k-th dimension of two phases trains ``min(4, 2**k)`` subnets per step (OFA: 2 in the depth
    stages, 4 in the expand stages).

    Args:
        full_lr: Peak lr of the ``full`` stage.
        full_epochs: Its length.
        full_warmup: Its warmup (None: ``warmup``).
        single_lr: Peak lr of a stage that unlocks a dimension at once.
        single_epochs: Its length.
        single_subnets: Its subnets per step.
        phase1_lr: Peak lr of a first-phase stage.
        phase1_epochs: Its length.
        phase1_warmup: Its warmup.
        phase2_lr: Peak lr of a second-phase stage.
        phase2_epochs: Its length.
        warmup: Warmup of the single-phase and second-phase stages.
        sampling: Sampling rule of every shrinking stage.
        carry_optimizer: Every shrinking stage starts from the previous stage's optimizer state.
        inplace_kd: See :class:`Stage`.
        clip_grad: Gradient-norm clipping of every stage (``full`` included).
        min_steps: The schedule's floor in optimizer steps.
        shrink_floor_weight: ``Stage.floor_weight`` of every stage after ``full`` (``full``'s is 1).
        min_resolution: ``Stage.min_resolution`` of every shrinking stage.
    """
    full_lr: float
    full_epochs: float
    single_lr: float
    single_epochs: float
    phase1_lr: float
    phase1_epochs: float
    phase2_lr: float
    phase2_epochs: float
    warmup: float = 0.
    full_warmup: Optional[float] = None
    phase1_warmup: float = 0.
    single_subnets: int = 1
    sampling: str = 'uniform'
    carry_optimizer: bool = False
    inplace_kd: bool = True
    clip_grad: Optional[float] = None
    min_steps: int = 0
    shrink_floor_weight: float = 1.0
    min_resolution: bool = False

    def schedule(self, space: SearchSpace) -> Schedule:
        """The stages of this recipe for ``space``'s declared dimensions."""
        common = dict(sampling=self.sampling, carry_optimizer=self.carry_optimizer, inplace_kd=self.inplace_kd,
                      clip_grad=self.clip_grad, floor_weight=self.shrink_floor_weight,
                      min_resolution=self.min_resolution)
        full_warmup = self.warmup if self.full_warmup is None else self.full_warmup
        stages = [Stage('full', self.full_epochs, self.full_lr, {}, warmup_epochs=full_warmup, kd_ratio=0.,
                        clip_grad=self.clip_grad)]
        shrunk = [d for d in space.dimensions if d.shrink_order is not None and d.elastic]
        always = {d.label: 'all' for d in shrunk if d.shrink_order == 0}
        done: Dict[str, Level] = {}
        phased = 0
        for d in sorted((d for d in shrunk if d.shrink_order > 0), key=lambda d: d.shrink_order):
            if d.phases == 1:
                stages.append(Stage(d.label, self.single_epochs, self.single_lr, {**done, d.label: 'all', **always},
                                    warmup_epochs=self.warmup, subnets_per_step=self.single_subnets, **common))
            else:
                phased += 1
                subnets = min(4, 2 ** phased)
                stages.append(Stage(f'{d.label}_1', self.phase1_epochs, self.phase1_lr,
                                    {**done, d.label: 2, **always}, warmup_epochs=self.phase1_warmup,
                                    subnets_per_step=subnets, **common))
                stages.append(Stage(f'{d.label}_2', self.phase2_epochs, self.phase2_lr,
                                    {**done, d.label: 'all', **always}, warmup_epochs=self.warmup,
                                    subnets_per_step=subnets, **common))
            done[d.label] = 'all'
        return Schedule(tuple(stages), min_steps=self.min_steps)


PRESETS: Dict[str, Recipe] = {
    # The reference recipe (lr per GPU at batch 64, 32 GPUs, SGD-Nesterov); 'full' trains the teacher first.
    'ofa': Recipe(full_lr=2.6e-2, full_epochs=180, single_lr=3e-2, single_epochs=120, phase1_lr=2.5e-3,
                  phase1_epochs=25, phase2_lr=7.5e-3, phase2_epochs=120, warmup=5),
    # A short recipe for supernets converted from pretrained timm weights (the full stage is skipped), the default
    # for a pretrained start ('auto'). Sandwich sampling trains the min subnet at every step of every stage (with
    # uniform sampling it was drawn too rarely in so few steps and ended 12 points below fine-tuning it alone,
    # docs/results.md); the kernel stage therefore trains two subnets per step, since under the sandwich rule one
    # would be the max alone and no smaller kernel would train before the depth stage. The optimizer's momentum
    # carries over between stages, gradient norms are clipped at 10, and a floor of 4,000 optimizer steps keeps a
    # small dataset from starving it (the budget curve in docs/results.md: on the digits every gap shrank from 1,000
    # to 2,000 to 4,000 steps and none grew; at 4,000 MobileNetV3's min and mid came within 0.5 of fine-tuning each
    # alone, and the small ViT at its own resolution held its max within 0.5 at every stage end). The min subnet
    # trains at the smallest resolution, where it is deployed (on a small ViT with 24-32 px it ended 3.7 points higher
    # on the validation split; docs/results.md).
    'fast': Recipe(full_lr=1e-2, full_epochs=10, single_lr=1e-2, single_epochs=10, single_subnets=2,
                   phase1_lr=2.5e-3, phase1_epochs=2, phase2_lr=5e-3, phase2_epochs=10, warmup=1, sampling='sandwich',
                   carry_optimizer=True, clip_grad=10., min_steps=4000, min_resolution=True),
    # A short recipe for small datasets trained from scratch (the demo and benchmarks/ps_quality.py), for SGD with
    # Nesterov momentum (--opt sgd). Measured on digits (docs/results.md): every stage after 'full' runs at 0.1-0.3x
    # the full stage's peak lr (at 1x the kernel stage undoes the full stage), warms up, keeps the optimizer's
    # momentum, and trains the max and the min subnet at every step (sandwich rule, in-place distillation).
    'demo': Recipe(full_lr=5e-2, full_epochs=16, full_warmup=2, single_lr=1.5e-2, single_epochs=7.5, single_subnets=2,
                   phase1_lr=5e-3, phase1_epochs=3, phase1_warmup=0.5, phase2_lr=1.5e-2, phase2_epochs=4.5,
                   warmup=0.5, sampling='sandwich', carry_optimizer=True),
    # The default from scratch ('auto'), measured on three families and on small data (docs/results.md): the 'demo'
    # stages with the later stages at 0.2-0.6x the full stage's lr, every step's gradient norm clipped at 10 (rare
    # huge gradients, EfficientNet's above all, otherwise undo the full stage and the expand stages), and a floor of
    # 1,600 optimizer steps in which the stages after 'full' weigh twice their epochs, so that a dataset of a few
    # hundred images still trains a full recipe: the full stage gets what a plain floor of 1,000 gave it, and the
    # stages whose steps the subnets share twice as much. (A plain floor of 2,000 closed the subnets' gaps on one
    # split and lost 1.3 points on another, its longer full stage ending lower on both; weighting only the later
    # stages gained on both: the budget curve in docs/results.md.)
    'scratch': Recipe(full_lr=5e-2, full_epochs=16, full_warmup=2, single_lr=3e-2, single_epochs=7.5,
                      single_subnets=2, phase1_lr=1e-2, phase1_epochs=3, phase1_warmup=0.5, phase2_lr=3e-2,
                      phase2_epochs=4.5, warmup=0.5, sampling='sandwich', carry_optimizer=True, clip_grad=10.,
                      min_steps=1600, shrink_floor_weight=2.),
}

ScheduleLike = Union[str, os.PathLike, Schedule, Recipe]


def load_schedule(spec: ScheduleLike, epochs_scale: Optional[float] = None, pretrained: bool = False,
                  space: Optional[SearchSpace] = None) -> Schedule:
    """A schedule from a preset name, ``'auto'``, a :class:`Recipe`, a YAML file or a ``Schedule``, optionally
    rescaled.

    ``'auto'`` is ``'fast'`` for a supernet that starts from pretrained weights and ``'scratch'`` otherwise; both
    carry a floor in optimizer steps (``Schedule.min_steps``), so that a small dataset still gets a full recipe. A
    preset or recipe is written for a space's declared dimensions: pass ``space``.

    Raises:
        ValueError: On an unknown name or file, or a preset without a space.
    """
    if isinstance(spec, Schedule):
        schedule = spec
    elif isinstance(spec, Recipe) or str(spec) == 'auto' or str(spec) in PRESETS:
        recipe = spec if isinstance(spec, Recipe) else PRESETS[
            ('fast' if pretrained else 'scratch') if str(spec) == 'auto' else str(spec)]
        if space is None:
            raise ValueError(f'The recipe {spec!r} writes its stages for the dimensions a supernet declares: pass '
                             f'space=supernet.space')
        schedule = recipe.schedule(space)
    elif os.path.isfile(spec):
        schedule = Schedule.from_yaml(spec)
    else:
        raise ValueError(f"Unknown schedule {spec!r}: expected 'auto', one of {sorted(PRESETS)} or a YAML file path")
    return schedule.scaled(epochs_scale) if epochs_scale is not None else schedule


def build_schedule(spec: ScheduleLike, space: SearchSpace, pretrained: bool = False,
                   epochs_scale: Optional[float] = None, min_steps: Optional[int] = None, lr_scale: float = 1.0,
                   sampling: Optional[str] = None) -> Schedule:
    """The schedule a run trains ``space``'s supernet with: ``spec`` (see :func:`load_schedule`) with its overrides.
    ``ofa-timm train``, ``ofa-timm run`` / ``ofa_timm.run``, the NNI strategy and the benchmarks all build theirs
    here.

    Args:
        spec: ``'auto'``, a preset name, a :class:`Recipe`, a YAML file or a ``Schedule``.
        space: The supernet's space (a recipe writes its stages from its dimensions).
        pretrained: The supernet starts from trained weights (``'auto'`` then picks ``'fast'``).
        epochs_scale: Multiplies every stage's length.
        min_steps: The schedule's floor in optimizer steps (default: the recipe's own; 0: none).
        lr_scale: Multiplies every stage's learning rate.
        sampling: Sampling rule of every stage (default: each stage's own).

    Raises:
        ValueError: On an unknown schedule, a bad override, or unlocks this space has none of.
    """
    schedule = load_schedule(spec, epochs_scale, pretrained=pretrained, space=space)
    if min_steps is not None:
        schedule = replace(schedule, min_steps=min_steps)
    if not lr_scale > 0:
        raise ValueError(f'lr_scale must be > 0, got {lr_scale}')
    if lr_scale != 1.0:
        schedule = replace(schedule, stages=tuple(replace(s, lr=s.lr * lr_scale) for s in schedule.stages))
    if sampling is not None:
        schedule = replace(schedule, stages=tuple(replace(s, sampling=sampling) for s in schedule.stages))
    return schedule


def recommended_min_steps(pretrained: bool) -> int:
    """The floor in optimizer steps of the recipe ``'auto'`` picks (see ``docs/results.md`` for how it was measured)."""
    return PRESETS['fast' if pretrained else 'scratch'].min_steps


def short_schedule_warning(schedule: Schedule, steps_per_epoch: int, pretrained: bool) -> Optional[str]:
    """One line when ``schedule`` trains fewer optimizer steps than the ``'auto'`` recipe's floor for this start, with
    what to change; None otherwise."""
    need = recommended_min_steps(pretrained)
    total = schedule.total_steps(steps_per_epoch)
    if total >= need:
        return None
    start = 'pretrained weights' if pretrained else 'scratch'
    return (f'Warning: this schedule trains {total} optimizer steps in all ({steps_per_epoch} per epoch); from '
            f'{start}, progressive shrinking needs about {need} on small data (docs/results.md). Pass --min-steps '
            f'{need} or --schedule auto, or raise --epochs-scale.')
