"""Channel sorting before an expand stage (OFA): important channels first, within already-trained bands.

A block's mid channels are ranked by the L1 norm of the weights that read them in the next conv. Channels only move
within the bands that earlier stages trained (e.g. once expand 6 and 4 are trained, the first ``mid(4)`` channels
and the rest are sorted separately), so subnets trained before keep their channels. Every permutation is applied
consistently to the producing conv, its batch norm, the depthwise conv, the squeeze-excite and the consuming conv,
so the function of the max subnet is unchanged.
"""
import torch
import torch.nn as nn

from ..elastic.base import ElasticSupernet, band_permutation
from .sampling import space_dimensions
from .schedule import Schedule

__all__ = ['sort_channels', 'sort_before_stage', 'band_permutation']


@torch.no_grad()
def sort_channels(supernet: nn.Module, trained: int = 1) -> None:
    """Sort every block's mid channels by importance, within the bands of the ``trained`` largest expand choices.

    Args:
        supernet: An elastic supernet.
        trained: How many of each slot's largest expand choices earlier stages trained (1: only the max).
    """
    if trained < 1:
        raise ValueError(f'trained must be >= 1, got {trained}')
    if not isinstance(supernet, ElasticSupernet):
        raise ValueError(f'sort_channels needs an ofa_timm elastic supernet, got {type(supernet).__name__}')
    for slot, choices in enumerate(supernet.space.expand_slots):
        supernet.sort_block_channels(slot, [supernet.mid_channels(slot, e) for e in choices[::-1][:trained]])


def sort_before_stage(supernet: nn.Module, schedule: Schedule, index: int) -> bool:
    """Sort channels if stage ``index`` of ``schedule`` unlocks more expand choices than the stage before it.

    The bands kept are those of the expand choices the previous stage trained. Returns whether it sorted.
    """
    if 'expand' not in space_dimensions(supernet.space):
        return False
    before = schedule.stages[index - 1].unlock.get('expand') if index > 0 else None
    now = schedule.stages[index].unlock.get('expand')
    if now is None or now == before:
        return False
    if before is None:
        trained = 1
    elif before == 'all':
        trained = max(len(c) for c in supernet.space.expand_slots)
    else:
        trained = int(before)
    sort_channels(supernet, trained)
    return True
