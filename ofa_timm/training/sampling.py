"""Which subnets a progressive-shrinking step trains.

A stage's ``unlock`` restricts the supernet's space (``SearchSpace.restrict``: locked dimensions stay at their
maximum, ``n`` keeps the ``n`` largest choices). Each step draws its subnets and its input resolution from a RNG
seeded by (seed, stage, step), so every DDP rank trains the same subnets at the same resolution, and a resumed run
draws what the uninterrupted run drew.
"""
import random
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..space import RESOLUTION, Dimension, SearchSpace, Subnet
from .schedule import Level, Schedule, Stage

__all__ = ['restrict_space', 'space_dimensions', 'shrinking_dimensions', 'applicable_stages', 'unknown_unlocks',
           'known_unlocks', 'StepSampler']


def restrict_space(space: SearchSpace, unlock: Mapping[str, Level]) -> SearchSpace:
    """The part of ``space`` a stage trains: unlocked dimensions keep their (largest) choices, the rest its max."""
    return space.restrict(unlock)


def shrinking_dimensions(space: SearchSpace) -> Tuple[Dimension, ...]:
    """The elastic dimensions of ``space`` in the order progressive shrinking unlocks them (the resolution last)."""
    elastic = [d for d in space.dimensions if d.elastic]
    return tuple(sorted(elastic, key=lambda d: (d.shrink_order is None, d.shrink_order == 0, d.shrink_order or 0)))


def space_dimensions(space: SearchSpace) -> Tuple[str, ...]:
    """Labels of the elastic dimensions of ``space`` (those with more than one choice somewhere), in shrinking
    order."""
    return tuple(d.label for d in shrinking_dimensions(space))


def unknown_unlocks(schedule: Schedule, space: SearchSpace) -> List[str]:
    """The unlock keys of ``schedule`` that name no dimension of ``space`` (a recipe for another family's dimensions,
    or a typo); they unlock nothing."""
    known = {k for d in space.dimensions for k in (d.label, d.name)}
    return sorted({k for s in schedule.stages for k in s.unlock if k not in known})


def known_unlocks(schedule: Schedule, space: SearchSpace) -> Schedule:
    """``schedule`` without the unlocks of dimensions ``space`` lacks (they unlock nothing)."""
    unknown = set(unknown_unlocks(schedule, space))
    return replace(schedule, stages=tuple(replace(s, unlock={k: v for k, v in s.unlock.items() if k not in unknown})
                                          for s in schedule.stages))


def applicable_stages(schedule: Schedule, space: SearchSpace, pretrained: bool) -> Schedule:
    """The stages that train something new for ``space``.

    The ``full`` stage (no unlock) is kept unless the supernet starts from ``pretrained`` weights. Any other stage is
    kept when it lets the architecture vary more than the stage before it (resolution alone does not count): a
    kernel stage disappears for ResNets, width stages for MobileNetV3, a phase-1 stage where a dimension has at most
    two choices. A stage with the same ``unlock`` as the stage kept before it continues that stage (with its own lr or
    subnets per step) and is kept. Unlocks of dimensions the space lacks (:func:`unknown_unlocks`) are dropped.

    Raises:
        ValueError: If no stage trains anything for ``space``.
    """
    kept = []
    previous = space.restrict({}).replace_resolutions(())
    for stage in known_unlocks(schedule, space).stages:
        if not stage.unlock:
            if not pretrained:
                kept.append(stage)
            continue
        current = space.restrict(stage.unlock).replace_resolutions(())
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
        self.space = space.restrict(stage.unlock)
        self.stage = stage
        self.seed = seed

    def rng(self, step: int) -> random.Random:
        return random.Random(f'{self.seed}/{self.stage.name}/{step}')

    def sample(self, step: int) -> List[Subnet]:
        """The subnets of global step ``step``; all share one resolution, drawn for the batch, except a sandwich's min
        subnet under ``Stage.min_resolution``, which keeps the smallest."""
        rng = self.rng(step)
        resolution = rng.choice(self.space.resolutions) if self.space.resolutions else None
        n = self.stage.subnets_per_step
        if self.stage.sampling == 'sandwich':
            subnets = [self.space.max(), self.space.min()][:n]
            subnets += [self.space.sample(rng) for _ in range(n - len(subnets))]
        else:
            subnets = [self.space.sample(rng) for _ in range(n)]
        subnets = [s.replace(resolution=resolution) for s in subnets]
        if self.stage.sampling == 'sandwich' and self.stage.min_resolution and n > 1:
            subnets[1] = self.space.min()  # at its own (the smallest) resolution
        return subnets

    def grid_names(self) -> Dict[str, str]:
        """What the short names of :meth:`validation_grid`'s labels stand for (``{'k': 'kernel', ...}``)."""
        labels = [d.label for d in shrinking_dimensions(self.space) if d.name != RESOLUTION]
        return {short: label for label, short in _short_labels(labels).items()}

    def validation_grid(self, resolutions: Optional[Sequence[int]] = None) -> List[Tuple[str, Subnet]]:
        """Named subnets to validate: every min/max corner of the unlocked dimensions, at the given resolutions.

        Resolutions default to the min and max of the stage's resolutions.
        """
        space = self.space
        dims = [d.label for d in shrinking_dimensions(space) if d.name != RESOLUTION]
        short = _short_labels(dims)
        if resolutions is None:
            resolutions = sorted({space.resolutions[0], space.resolutions[-1]}) if space.resolutions else [None]
        grid = []
        for corner in range(2 ** len(dims)):
            smallest = [d for i, d in enumerate(dims) if corner >> i & 1]
            subnet = space.corner(smallest)
            label = ','.join(f'{short[d]}={"min" if d in smallest else "max"}' for d in dims) or 'max'
            for res in resolutions:
                grid.append((f'{label}@{res}' if res else label, subnet.replace(resolution=res)))
        return grid


def _short_labels(labels: Sequence[str]) -> Dict[str, str]:
    """Each label's first letter (``k=max,d=min``), or the whole label where two share one."""
    firsts = [label[0] for label in labels]
    return {label: label[0] if firsts.count(label[0]) == 1 else label for label in labels}
