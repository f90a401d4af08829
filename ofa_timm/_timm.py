"""The timm names that timm does not export publicly, imported in one place.

Everything else comes from ``timm.models`` / ``timm.layers``. If a timm release moves one of these, this is the only
file to change.
"""
from timm.models._builder import _resolve_pretrained_source as resolve_pretrained_source
from timm.models._builder import pretrained_cfg_for_features
from timm.models._efficientnet_blocks import (
    ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual, SqueezeExcite, UniversalInvertedResidual)
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._hub import download_cached_file

__all__ = [
    'ConvBnAct', 'DepthwiseSeparableConv', 'EdgeResidual', 'FeatureGetterNet', 'InvertedResidual', 'SqueezeExcite',
    'UniversalInvertedResidual', 'decode_arch_def', 'download_cached_file', 'feature_take_indices',
    'pretrained_cfg_for_features', 'resolve_pretrained_source', 'round_channels',
]
