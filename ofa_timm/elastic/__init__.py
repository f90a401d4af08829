"""Elastic layers and elastic supernets built from timm models."""
from typing import Any, Tuple, Type

import torch.nn as nn

from .base import BlockSpec, ElasticSupernet, LayerSpec
from .mobilenetv3 import ElasticMobileNetV3, convert_ofa_state_dict, ofa_mobilenetv3
from .resnet import ElasticResNet, OFAResNet, convert_ofa_resnet_state_dict, ofa_resnet50
from .ops import (
    ElasticBatchNorm2d, ElasticBatchNormAct2d, ElasticConv2d, ElasticLinear, ElasticSqueezeExcite, is_elastic)

__all__ = [
    'FAMILIES', 'elasticize', 'ElasticSupernet', 'BlockSpec', 'LayerSpec', 'ElasticMobileNetV3', 'ofa_mobilenetv3',
    'convert_ofa_state_dict', 'ElasticResNet', 'OFAResNet', 'ofa_resnet50', 'convert_ofa_resnet_state_dict',
    'ElasticConv2d', 'ElasticBatchNorm2d', 'ElasticBatchNormAct2d', 'ElasticLinear', 'ElasticSqueezeExcite',
    'is_elastic',
]

#: Every supernet family, in the order ``elasticize`` tries them.
FAMILIES: Tuple[Type[ElasticSupernet], ...] = (ElasticMobileNetV3, ElasticResNet)


def elasticize(model: nn.Module, **space_options: Any) -> ElasticSupernet:
    """Turn a timm model into an elastic OFA supernet whose max subnet is the model itself.

    The model is copied, not modified, and its weights (pretrained or not) are kept.

    Args:
        model: A timm ``MobileNetV3`` (e.g. ``mobilenetv3_large_100``) or ``ResNet`` with Bottleneck or BasicBlock
            blocks (e.g. ``resnet50``, ``resnet50d``, ``resnet101``, ``resnet34``).
        **space_options: Passed to the family's supernet: for MobileNetV3 ``kernels``, ``expands``, ``depths``,
            ``resolutions``, ``grow_kernels`` (see :class:`ElasticMobileNetV3`); for ResNet ``expands``, ``widths``,
            ``depth_reductions``, ``resolutions``, ``stem_depths`` (see :class:`ElasticResNet`).

    Raises:
        ValueError: If the model family is not supported, or an option does not apply to it.
    """
    for family in FAMILIES:
        if family.supports(model):
            unknown = sorted(set(space_options) - set(family.space_options))
            if unknown:
                raise ValueError(f'{family.__name__} does not take {unknown}; its space options are '
                                 f'{list(family.space_options)}')
            return family(model, **space_options)
    supported = ', '.join(t.__name__ for family in FAMILIES for t in family.source_types)
    raise ValueError(
        f'Cannot elasticize {type(model).__name__}: supported timm model classes are {supported} '
        f'(e.g. mobilenetv3_large_100, resnet50d)')
