"""Elastic layers and elastic supernets built from timm models."""
from typing import Any, Optional, Tuple, Type

import torch.nn as nn

from .base import BlockSpec, ElasticSupernet, LayerSpec
from .efficientnet import ElasticEfficientNet
from .efficientnet_builder import EfficientNetBuilderSupernet
from .mobilenetv3 import ElasticMobileNetV3, convert_ofa_state_dict, ofa_mobilenetv3
from .resnet import ElasticResNet, OFAResNet, convert_ofa_resnet_state_dict, ofa_resnet50
from .vit import ElasticVisionTransformer
from .convnext import ElasticConvNeXt
from .ops import (
    ElasticBatchNorm2d, ElasticBatchNormAct2d, ElasticConv2d, ElasticLinear, ElasticSqueezeExcite, is_elastic)

__all__ = [
    'FAMILIES', 'elasticize', 'single_subnet', 'ElasticSupernet', 'BlockSpec', 'LayerSpec',
    'EfficientNetBuilderSupernet', 'ElasticMobileNetV3', 'ElasticEfficientNet', 'ofa_mobilenetv3',
    'convert_ofa_state_dict', 'ElasticResNet', 'OFAResNet', 'ofa_resnet50', 'convert_ofa_resnet_state_dict',
    'ElasticVisionTransformer', 'ElasticConvNeXt',
    'ElasticConv2d', 'ElasticBatchNorm2d', 'ElasticBatchNormAct2d', 'ElasticLinear', 'ElasticSqueezeExcite',
    'is_elastic',
]

#: Every supernet family, in the order ``elasticize`` tries them.
FAMILIES: Tuple[Type[ElasticSupernet], ...] = (
    ElasticMobileNetV3, ElasticEfficientNet, ElasticResNet, ElasticVisionTransformer, ElasticConvNeXt)


def elasticize(model: nn.Module, **space_options: Any) -> ElasticSupernet:
    """Turn a timm model into an elastic OFA supernet whose max subnet is the model itself.

    The model is copied, not modified, and its weights (pretrained or not) are kept.

    Args:
        model: A timm model of a supported class:

            * ``MobileNetV3`` (``mobilenetv3_*``, ``lcnet_*``, ``mobilenetv4_conv_*`` without attention blocks) or
              ``EfficientNet`` (``efficientnet_b*``, ``efficientnet_lite*``, ``mobilenetv2_*``, ``mnasnet_*``,
              ``fbnetc_100``, ``spnasnet_100``, ``tinynet_*``), built by timm's EfficientNet builder from
              InvertedResidual, UniversalInvertedResidual, DepthwiseSeparableConv and ConvBnAct blocks with
              symmetric padding (not the ``tf_*`` variants);
            * ``ResNet`` with Bottleneck or BasicBlock blocks (e.g. ``resnet50``, ``resnet50d``, ``resnet101``,
              ``resnet34``).
        **space_options: Passed to the family's supernet: for MobileNetV3 and EfficientNet ``kernels``, ``expands``,
            ``depths``, ``resolutions``, ``grow_kernels`` (see :class:`EfficientNetBuilderSupernet`); for ResNet
            ``expands``, ``widths``, ``depth_reductions``, ``resolutions``, ``stem_depths`` (see
            :class:`ElasticResNet`).

    Raises:
        ValueError: If the model family is not supported, an option does not apply to it, or the model has TF 'same'
            padding (``tf_*`` variants) or a block type the family cannot rebuild (the message names it and its
            position).
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
        f'(e.g. mobilenetv3_large_100, efficientnet_b0, resnet50d)')


def single_subnet(model: nn.Module, resolution: Optional[int] = None) -> ElasticSupernet:
    """``model`` (a timm model, e.g. an extracted subnet) as a supernet whose space holds one subnet: the model itself,
    at ``resolution``. ``Trainer`` then trains it alone, as a baseline for progressive shrinking or to fine-tune it.

    Raises:
        ValueError: If the model family is not supported (see :func:`elasticize`).
    """
    for family in FAMILIES:
        if family.supports(model):
            return family(model, resolutions=(resolution,) if resolution else (), **family.single_subnet_options)
    return elasticize(model)  # raises, naming the supported classes
