"""Elastic layers and elastic supernets built from timm models."""
from typing import Any

import torch.nn as nn
from timm.models import MobileNetV3

from .mobilenetv3 import ElasticMobileNetV3, convert_ofa_state_dict, ofa_mobilenetv3
from .ops import (
    ElasticBatchNorm2d, ElasticBatchNormAct2d, ElasticConv2d, ElasticLinear, ElasticSqueezeExcite, is_elastic)

__all__ = [
    'elasticize', 'ElasticMobileNetV3', 'ofa_mobilenetv3', 'convert_ofa_state_dict',
    'ElasticConv2d', 'ElasticBatchNorm2d', 'ElasticBatchNormAct2d', 'ElasticLinear', 'ElasticSqueezeExcite',
    'is_elastic',
]


def elasticize(model: nn.Module, **space_options: Any) -> ElasticMobileNetV3:
    """Turn a timm model into an elastic OFA supernet whose max subnet is the model itself.

    The model is copied, not modified, and its weights (pretrained or not) are kept.

    Args:
        model: A timm ``MobileNetV3`` (e.g. ``timm.create_model('mobilenetv3_large_100')``).
        **space_options: Passed to the family's supernet, e.g. ``kernels=(3, 5)``, ``expands=(3, 4, 6)``,
            ``depths=(2, 3, 4)``, ``resolutions=range(160, 225, 16)``, ``grow_kernels=True``.

    Raises:
        ValueError: If the model family is not supported.
    """
    if isinstance(model, MobileNetV3):
        return ElasticMobileNetV3(model, **space_options)
    raise ValueError(
        f'Cannot elasticize {type(model).__name__}: supported timm families are MobileNetV3 '
        f'(e.g. mobilenetv3_large_100)')
