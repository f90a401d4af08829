"""Channel sorting before an expand stage (OFA): important channels first, within already-trained bands.

A block's mid channels are ranked by the L1 norm of the weights that read them in the next conv. Channels only move
within the bands that earlier stages trained (e.g. once expand 6 and 4 are trained, the first ``mid(4)`` channels
and the rest are sorted separately), so subnets trained before keep their channels. Every permutation is applied
consistently to the producing conv, its batch norm, the depthwise conv, the squeeze-excite and the consuming conv,
so the function of the max subnet is unchanged.
"""
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import make_divisible
from timm.models.resnet import Bottleneck

from ..elastic.mobilenetv3 import ElasticMobileNetV3
from ..elastic.resnet import ElasticResNet, _mid_channels
from .sampling import space_dimensions
from .schedule import Schedule

__all__ = ['sort_channels', 'sort_before_stage', 'band_permutation']


def band_permutation(importance: torch.Tensor, boundaries: Sequence[int]) -> torch.Tensor:
    """Indices that sort ``importance`` descending within each band ``[boundaries[i-1], boundaries[i])``."""
    n = importance.shape[0]
    edges = sorted({b for b in boundaries if 0 < b < n} | {n})
    perm, start = [], 0
    for end in edges:
        perm.append(start + torch.argsort(importance[start:end], descending=True, stable=True))
        start = end
    return torch.cat(perm)


def _permute(module: nn.Module, perm: torch.Tensor, dim: int = 0) -> None:
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        t = getattr(module, name, None)
        if t is not None and t.dim() > dim:
            t.data.copy_(t.data.index_select(dim, perm.to(t.device)))


def _importance(consumer_weight: torch.Tensor) -> torch.Tensor:
    # L1 norm per input channel of the conv that reads the channels
    return consumer_weight.detach().abs().sum(dim=(0, 2, 3))


@torch.no_grad()
def _sort_mbv3(supernet: ElasticMobileNetV3, trained: int) -> None:
    slot = 0
    for s in supernet.elastic_stages:
        for block, spec in zip(supernet.blocks[s], supernet._block_specs[s]):
            choices = supernet.space.expand_slots[slot]
            slot += 1
            mids = [make_divisible(spec.in_chs * e) for e in choices[::-1][:trained]]
            if getattr(block.se, 'conv_expand', None) is not None:
                se = block.se
                rd_perm = band_permutation(_importance(se.conv_expand.weight), [se.reduced_channels(m) for m in mids])
                _permute(se.conv_reduce, rd_perm)
                _permute(se.conv_expand, rd_perm, dim=1)
            perm = band_permutation(_importance(block.conv_pwl.weight), mids)
            for module in (block.conv_pw, block.bn1, block.conv_dw, block.bn2):
                _permute(module, perm)
            if getattr(block.se, 'conv_expand', None) is not None:
                _permute(block.se.conv_reduce, perm, dim=1)
                _permute(block.se.conv_expand, perm)
            _permute(block.conv_pwl, perm, dim=1)


@torch.no_grad()
def _sort_resnet(supernet: ElasticResNet, trained: int) -> None:
    slot = 0
    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
        for block in getattr(supernet, name):
            choices = supernet.space.expand_slots[slot]
            slot += 1
            width = (block.conv3 if isinstance(block, Bottleneck) else block.conv2).out_channels
            mids = [_mid_channels(width, e) for e in choices[::-1][:trained]]
            if isinstance(block, Bottleneck):
                perm = band_permutation(_importance(block.conv3.weight), mids)
                _permute(block.conv2, perm)
                _permute(block.bn2, perm)
                _permute(block.conv3, perm, dim=1)
            perm = band_permutation(_importance(block.conv2.weight), mids)
            _permute(block.conv1, perm)
            _permute(block.bn1, perm)
            _permute(block.conv2, perm, dim=1)


def sort_channels(supernet: nn.Module, trained: int = 1) -> None:
    """Sort every block's mid channels by importance, within the bands of the ``trained`` largest expand choices.

    Args:
        supernet: An elastic MobileNetV3 or ResNet.
        trained: How many of each slot's largest expand choices earlier stages trained (1: only the max).
    """
    if trained < 1:
        raise ValueError(f'trained must be >= 1, got {trained}')
    if isinstance(supernet, ElasticMobileNetV3):
        _sort_mbv3(supernet, trained)
    elif isinstance(supernet, ElasticResNet):
        _sort_resnet(supernet, trained)
    else:
        raise ValueError(f'sort_channels supports ElasticMobileNetV3 and ElasticResNet, got {type(supernet).__name__}')


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
