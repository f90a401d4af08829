"""Which subnets a progressive-shrinking step trains.

A stage's ``unlock`` restricts the supernet's space (locked dimensions stay at their maximum, ``n`` keeps the ``n``
largest choices). Each step draws its subnets and its input resolution from a RNG seeded by (seed, stage, step), so
every DDP rank trains the same subnets at the same resolution, and a resumed run draws what the uninterrupted run
drew.
"""
import random
from typing import List, Mapping, Optional, Sequence, Tuple, TypeVar

from ..space import SearchSpace, StageChoices, Subnet
from dataclasses import replace

from .schedule import DIMENSIONS, Level, Schedule, Stage

__all__ = ['restrict_space', 'space_dimensions', 'applicable_stages', 'StepSampler']

T = TypeVar('T')


def _top(choices: Sequence[T], level: Optional[Level]) -> Tuple[T, ...]:
    choices = tuple(choices)
    if level is None:
        return choices[-1:]
    if level == 'all':
        return choices
    return choices[-int(level):]


def restrict_space(space: SearchSpace, unlock: Mapping[str, Level]) -> SearchSpace:
    """The part of ``space`` a stage trains: unlocked dimensions keep their (largest) choices, the rest its max."""
    stages = tuple(
        StageChoices(
            depths=_top(s.depths, unlock.get('depth')),
            kernels=tuple(_top(k, unlock.get('kernel')) for k in s.kernels),
            expands=tuple(_top(e, unlock.get('expand')) for e in s.expands),
        ) for s in space.stages)
    return SearchSpace(
        stages=stages,
        widths=tuple(_top(w, unlock.get('width')) for w in space.widths),
        resolutions=_top(space.resolutions, unlock.get('resolution')),
    )


def space_dimensions(space: SearchSpace) -> Tuple[str, ...]:
    """The elastic dimensions of ``space`` (those with more than one choice somewhere)."""
    has = {
        'kernel': any(len(k) > 1 for k in space.kernel_slots),
        'depth': any(len(s.depths) > 1 for s in space.stages),
        'expand': any(len(e) > 1 for e in space.expand_slots),
        'width': any(len(w) > 1 for w in space.widths),
        'resolution': len(space.resolutions) > 1,
    }
    return tuple(d for d in DIMENSIONS if has[d])


def applicable_stages(schedule: Schedule, space: SearchSpace, pretrained: bool) -> Schedule:
    """The stages that train something new for ``space``.

    The ``full`` stage (no unlock) is kept unless the supernet starts from ``pretrained`` weights. Any other stage is
    kept when it lets the architecture vary more than the stage before it (resolution alone does not count): the
    kernel stage disappears for ResNets, the width stages for MobileNetV3, a phase-1 stage where a dimension has at
    most two choices. A stage with the same ``unlock`` as the stage kept before it continues that stage (with its own
    lr or subnets per step) and is kept.
    """
    kept = []
    previous = restrict_space(space, {}).replace_resolutions(())
    for stage in schedule.stages:
        if not stage.unlock:
            if not pretrained:
                kept.append(stage)
            continue
        current = restrict_space(space, stage.unlock).replace_resolutions(())
        if current != previous or (kept and kept[-1].unlock == stage.unlock):
            kept.append(stage)
            previous = current
    if not kept:
        skipped = ' (the full stage is skipped for a pretrained start)' if pretrained else ''
        raise ValueError(f'No stage of the schedule trains anything for this supernet{skipped}: stages '
                         f'{[s.name for s in schedule.stages]} unlock nothing that its space {space_dimensions(space)} '
                         'lets vary')
    return replace(schedule, stages=tuple(kept))


class StepSampler:
    """Draws the subnets of each optimizer step of one stage.

    Args:
        space: The supernet's full space.
        stage: The stage (its ``unlock``, ``subnets_per_step`` and ``sampling`` rule).
        seed: Run seed.
    """

    def __init__(self, space: SearchSpace, stage: Stage, seed: int = 0):
        self.space = restrict_space(space, stage.unlock)
        self.stage = stage
        self.seed = seed

    def rng(self, step: int) -> random.Random:
        return random.Random(f'{self.seed}/{self.stage.name}/{step}')

    def sample(self, step: int) -> List[Subnet]:
        """The subnets of global step ``step``; all share one resolution, drawn for the batch."""
        rng = self.rng(step)
        resolution = rng.choice(self.space.resolutions) if self.space.resolutions else None
        n = self.stage.subnets_per_step
        if self.stage.sampling == 'sandwich':
            subnets = [self.space.max(), self.space.min()][:n]
            subnets += [self.space.sample(rng) for _ in range(n - len(subnets))]
        else:
            subnets = [self.space.sample(rng) for _ in range(n)]
        return [s.replace(resolution=resolution) for s in subnets]

    def validation_grid(self, resolutions: Optional[Sequence[int]] = None) -> List[Tuple[str, Subnet]]:
        """Named subnets to validate: every min/max corner of the unlocked dimensions, at the given resolutions.

        Resolutions default to the min and max of the stage's resolutions.
        """
        space = self.space
        dims = [d for d in space_dimensions(space) if d != 'resolution']
        if resolutions is None:
            resolutions = sorted({space.resolutions[0], space.resolutions[-1]}) if space.resolutions else [None]
        grid = []
        for corner in range(2 ** len(dims)):
            picks = {d: 'min' if corner >> i & 1 else 'max' for i, d in enumerate(dims)}
            subnet = _corner(space, picks)
            label = ','.join(f'{d[0]}={p}' for d, p in picks.items()) or 'max'
            for res in resolutions:
                grid.append((f'{label}@{res}' if res else label, subnet.replace(resolution=res)))
        return grid


def _corner(space: SearchSpace, picks: Mapping[str, str]) -> Subnet:
    def pick(dim: str, choices: Sequence[T]) -> T:
        return choices[0] if picks.get(dim) == 'min' else choices[-1]

    return Subnet(
        depths=[pick('depth', s.depths) for s in space.stages],
        kernels=[pick('kernel', k) for k in space.kernel_slots],
        expands=[pick('expand', e) for e in space.expand_slots],
        widths=[pick('width', w) for w in space.widths],
        resolution=space.resolutions[-1] if space.resolutions else None,
    )
