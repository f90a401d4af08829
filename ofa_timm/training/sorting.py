"""Ranking before a shrinking stage (OFA's channel sorting): what a dimension keeps, important first.

A family declares which of its dimensions it ranks (``Dimension.ranked``: the mid channels an expand ratio keeps, the
heads a head count keeps, ...) and ranks them itself (``ElasticSupernet.rank``). Channels only move within the bands
that earlier stages trained (e.g. once expand 6 and 4 are trained, the first ``mid(4)`` channels and the rest are
sorted separately), so subnets trained before keep their channels, and every permutation is applied consistently to
the layers that produce and read them, so the function of the max subnet is unchanged.
"""
from typing import List, Optional

import torch
import torch.nn as nn

from ..elastic.base import ElasticSupernet, band_permutation
from .schedule import Schedule, unlock_level

__all__ = ['sort_channels', 'rank_before_stage', 'band_permutation']


@torch.no_grad()
def sort_channels(supernet: nn.Module, trained: int = 1, dimensions: Optional[List[str]] = None) -> List[str]:
    """Rank what each ranked dimension keeps, within the bands of its ``trained`` largest choices.

    Args:
        supernet: An elastic supernet.
        trained: How many of each position's largest choices earlier stages trained (1: only the max).
        dimensions: The dimensions to rank (default: every elastic one the family ranks).

    Returns:
        The dimensions ranked.
    """
    if trained < 1:
        raise ValueError(f'trained must be >= 1, got {trained}')
    if not isinstance(supernet, ElasticSupernet):
        raise ValueError(f'sort_channels needs an ofa_timm elastic supernet, got {type(supernet).__name__}')
    names = dimensions if dimensions is not None else [d.name for d in supernet.space.dimensions
                                                       if d.ranked and d.elastic]
    for name in names:
        supernet.rank(name, trained)
    return list(names)


def rank_before_stage(supernet: nn.Module, schedule: Schedule, index: int) -> List[str]:
    """Rank every ranked dimension that stage ``index`` of ``schedule`` unlocks further than the stage before it; the
    bands kept are those of the choices the previous stage trained. Returns the dimensions ranked."""
    ranked = []
    for d in supernet.space.dimensions:
        if not (d.ranked and d.elastic):
            continue
        before = unlock_level(schedule.stages[index - 1].unlock, d) if index > 0 else None
        now = unlock_level(schedule.stages[index].unlock, d)
        if now is None or now == before:
            continue
        trained = 1 if before is None else max(len(c) for c in d.choices) if before == 'all' else int(before)
        ranked += sort_channels(supernet, trained, [d.name])
    return ranked
