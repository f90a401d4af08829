"""Elastic layers and elastic supernets built from timm models."""
from typing import Any

import torch.nn as nn
from timm.models import MobileNetV3, ResNet

from .base import ElasticSupernet
from .mobilenetv3 import ElasticMobileNetV3, convert_ofa_state_dict, ofa_mobilenetv3
from .resnet import ElasticResNet, OFAResNet, convert_ofa_resnet_state_dict, ofa_resnet50
from .ops import (
    ElasticBatchNorm2d, ElasticBatchNormAct2d, ElasticConv2d, ElasticLinear, ElasticSqueezeExcite, is_elastic)

__all__ = [
    'elasticize', 'ElasticSupernet', 'ElasticMobileNetV3', 'ofa_mobilenetv3', 'convert_ofa_state_dict',
    'ElasticResNet', 'OFAResNet', 'ofa_resnet50', 'convert_ofa_resnet_state_dict',
    'ElasticConv2d', 'ElasticBatchNorm2d', 'ElasticBatchNormAct2d', 'ElasticLinear', 'ElasticSqueezeExcite',
    'is_elastic',
]


def elasticize(model: nn.Module, **space_options: Any) -> ElasticSupernet:
    """Turn a timm model into an elastic OFA supernet whose max subnet is the model itself.

    The model is copied, not modified, and its weights (pretrained or not) are kept.

    Args:
        model: A timm ``MobileNetV3`` (e.g. ``mobilenetv3_large_100``) or ``ResNet`` with Bottleneck or BasicBlock
            blocks (e.g. ``resnet50``, ``resnet50d``, ``resnet101``, ``resnet34``).
        **space_options: Passed to the family's supernet: for MobileNetV3 ``kernels``, ``expands``, ``depths``,
            ``resolutions``, ``grow_kernels`` (see :class:`ElasticMobileNetV3`); for ResNet ``expands``, ``widths``,
            ``depth_reductions``, ``resolutions`` (see :class:`ElasticResNet`).

    Raises:
        ValueError: If the model family is not supported.
    """
    if isinstance(model, MobileNetV3):
        return ElasticMobileNetV3(model, **space_options)
    if isinstance(model, ResNet):
        return ElasticResNet(model, **space_options)
    raise ValueError(
        f'Cannot elasticize {type(model).__name__}: supported timm families are MobileNetV3 '
        f'(e.g. mobilenetv3_large_100) and ResNet (e.g. resnet50, resnet50d)')
