"""Elastic MobileNetV3: a timm ``MobileNetV3``-class model turned into an OFA supernet, and back into stock timm models.

timm's ``MobileNetV3`` class builds MobileNetV3, LCNet and MobileNetV4-conv (among others). What the supernet makes
elastic is shared with EfficientNet (see ``efficientnet_builder``): inverted-residual (and MobileNetV4's universal
inverted-residual) stages get elastic depth, expand ratio and depthwise kernel; LCNet, made of depthwise-separable
blocks only, gets elastic depth and kernel. What is particular to the class is its efficient head (pooling first, then
``conv_head``, an optional norm as in MobileNetV4, and the activation) and its squeeze-excite, which reduces relative
to the expanded channels (``round_channels(mid * 0.25)``, recomputed for each expand ratio).

``ofa_mobilenetv3(width_mult)`` builds the canonical OFA MobileNetV3 spaces (kernel {3,5,7}, expand {3,4,6},
depth {2,3,4}, width 1.0 / 1.2) as timm models, and ``convert_ofa_state_dict`` maps the reference implementation's
checkpoints onto them.
"""
import re
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d, get_act_layer, make_divisible
from timm.models import MobileNetV3

from .._timm import SqueezeExcite, decode_arch_def, round_channels
from ..space import OFA_RESOLUTIONS, Subnet
from .base import BlockSpec, LayerSpec, convert_reference_keys, imagenet_cfg, map_key, reference_resolution
from .efficientnet_builder import (
    OFA_DEPTHS, OFA_EXPANDS, OFA_KERNELS, _SE_RATIO, EfficientNetBuilderSupernet, classifier_spec)

__all__ = [
    'ElasticMobileNetV3', 'ofa_mobilenetv3', 'ofa_mobilenetv3_arch_def', 'convert_ofa_state_dict',
    'TUTORIAL_PREDICTOR_ENCODING',
    'OFA_KERNELS', 'OFA_EXPANDS', 'OFA_DEPTHS', 'OFA_RESOLUTIONS',
]


class ElasticMobileNetV3(EfficientNetBuilderSupernet):
    """Elastic supernet over a timm ``MobileNetV3`` (e.g. ``mobilenetv3_large_100``, ``lcnet_100``,
    ``mobilenetv4_conv_small``); extracted subnets are stock ``MobileNetV3`` models."""
    source_types = (MobileNetV3,)
    timm_sources = ('mobilenetv3_large_100', 'mobilenetv3_large_075', 'mobilenetv3_small_100', 'mobilenetv4_conv_small',
                    'mobilenetv4_conv_medium', 'lcnet_100')
    # MobileNetV3's generators size SE from the mid channels with round_channels; LCNet rounds, FBNetV3 reduces
    # relative to the block input.
    se_rules = ((True, round_channels), (True, round), (False, round_channels), (False, round))

    def _adopt_head(self, model: MobileNetV3) -> None:
        self.global_pool = model.global_pool
        self.conv_head = model.conv_head
        self.norm_head = model.norm_head
        self.act2 = model.act2
        self.flatten = model.flatten
        self.classifier = model.classifier
        head_act = self.act2 if isinstance(self.norm_head, nn.Identity) else self.norm_head.act
        if type(head_act) is not type(model.bn1.act):
            raise ValueError(f'Head activation {type(head_act).__name__} differs from the stem activation '
                             f'{type(model.bn1.act).__name__}; timm builds both from one act_layer')

    def _build_kwargs(self) -> Dict[str, Any]:
        return dict(
            num_features=self.head_hidden_size,
            head_bias=self.conv_head.bias is not None,
            head_norm=not isinstance(self.norm_head, nn.Identity),
            se_from_exp=self._se_rule.from_exp,
        )

    def _head_modules(self) -> Tuple[str, ...]:
        return 'global_pool', 'conv_head', 'norm_head', 'act2', 'flatten', 'classifier'

    def _describe_head(self, reduction: int) -> BlockSpec:
        head = self.conv_head
        layers = (LayerSpec('conv', head.in_channels, head.out_channels, bias=head.bias is not None, reduction=0),)
        if not isinstance(self.norm_head, nn.Identity):
            layers += (LayerSpec('norm', head.out_channels, head.out_channels, reduction=0),)
        return BlockSpec(
            'head', 'head', self.num_features, self.num_classes, head.out_channels, 1, 1, 1.0, reduction,
            act=type(self.act2).__name__, layers=layers + classifier_spec(self.classifier),
            modules=self._head_modules())

    # --- the reference implementation ---------------------------------------------------------------------------
    def subnet_from_reference(self, d: Mapping[str, Any]) -> Subnet:
        """Read the reference ``OFAMobileNetV3`` form ``{'ks': [...], 'e': [...], 'd': [...], 'r': ...}``."""
        missing = {'ks', 'e', 'd'} - set(d)
        if missing or not set(d) <= {'ks', 'e', 'd', 'r', 'wid'}:
            raise ValueError(
                f"Reference MobileNetV3 subnet dicts have keys ks, e, d (and optionally r); got {sorted(d)}")
        if d.get('wid') is not None:
            raise ValueError("Reference subnet key 'wid' must be None: width is not elastic for MobileNetV3")
        return Subnet(depths=d['d'], kernels=d['ks'], expands=d['e'], resolution=reference_resolution(d.get('r')))

    def convert_reference_state_dict(
            self, state_dict: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        if not any(k.startswith('first_conv.') or '.mobile_inverted_conv.' in k for k in state_dict):
            return None
        return convert_ofa_state_dict(state_dict, [len(self.blocks[s]) for s in self.elastic_stages])

    # --- timm model API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv_stem|bn1', blocks=r'^blocks\.(\d+)' if coarse else r'^blocks\.(\d+)\.(\d+)')

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier; as in timm, the pooling of the efficient head cannot change its width."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        device, dtype = self.conv_head.weight.device, self.conv_head.weight.dtype
        self.classifier = (
            nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype) if num_classes > 0
            else nn.Identity())

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.conv_head(x)
        x = self.norm_head(x)
        x = self.act2(x)
        x = self.flatten(x)
        if self.drop_rate > 0.:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)


# --- canonical OFA MobileNetV3 spaces -------------------------------------------------------------------------------
_OFA_BASE_WIDTHS = (16, 24, 40, 80, 112, 160)
_OFA_STRIDES = (1, 2, 2, 2, 1, 2)
_OFA_ACTS = ('re', 're', 're', 'hs', 'hs', 'hs')
_OFA_SE = (False, False, True, False, True, True)


def ofa_mobilenetv3_arch_def(
        width_mult: float = 1.2, kernel: int = 7, expand: float = 6, depth: int = 4,
) -> Tuple[List[List[str]], int, int]:
    """The timm arch_def of the largest OFA MobileNetV3 of a width multiplier.

    Returns:
        (arch_def, stem channels, head channels).
    """
    widths = [make_divisible(w * width_mult) for w in _OFA_BASE_WIDTHS]
    arch = [[f'ds_r1_k3_s1_e1_c{widths[0]}_nre']]
    for s in range(1, 6):
        se = f'_se{_SE_RATIO}' if _OFA_SE[s] else ''
        arch.append([f'ir_r{depth}_k{kernel}_s{_OFA_STRIDES[s]}_e{expand:g}_c{widths[s]}{se}_n{_OFA_ACTS[s]}'])
    arch.append([f'cn_r1_k1_s1_c{make_divisible(960 * width_mult)}_nhs'])
    return arch, make_divisible(16 * width_mult), make_divisible(1280 * width_mult)


def ofa_mobilenetv3(
        width_mult: float = 1.2,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.,
        drop_path_rate: float = 0.,
        global_pool: str = 'avg',
        kernels: Sequence[int] = OFA_KERNELS,
        expands: Sequence[float] = OFA_EXPANDS,
        depths: Sequence[int] = OFA_DEPTHS,
        resolutions: Sequence[int] = OFA_RESOLUTIONS,
) -> ElasticMobileNetV3:
    """The canonical OFA MobileNetV3 supernet (``ofa_mbv3_d234_e346_k357_w1.0`` / ``_w1.2``), randomly initialised.

    It is numerically identical to the reference ``OFAMobileNetV3`` given the same weights
    (see :func:`convert_ofa_state_dict`).
    """
    arch, stem, head = ofa_mobilenetv3_arch_def(width_mult, max(kernels), max(expands), max(depths))
    source = MobileNetV3(
        block_args=decode_arch_def(arch),
        num_classes=num_classes,
        in_chans=in_chans,
        stem_size=stem,
        fix_stem=True,
        num_features=head,
        head_bias=False,
        act_layer=get_act_layer('hard_swish'),
        se_layer=partial(SqueezeExcite, gate_layer='hard_sigmoid', force_act_layer=nn.ReLU, rd_round_fn=round_channels),
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        global_pool=global_pool,
    )
    source.pretrained_cfg = imagenet_cfg(num_classes=num_classes)
    return ElasticMobileNetV3(source, kernels=kernels, expands=expands, depths=depths, resolutions=resolutions)


# The reference tutorial's published accuracy predictor of the MobileNetV3 spaces encodes kernels, expand ratios, then
# 8 resolution buckets of 16 px from 112 (``ofa_timm.search.AccuracyPredictor.from_reference``).
TUTORIAL_PREDICTOR_ENCODING: Dict[str, Any] = dict(order=('kernels', 'expands', 'resolution'),
                                                   resolution_bins=tuple(range(112, 225, 16)))


# --- reference checkpoint conversion --------------------------------------------------------------------------------
_LEGACY_RENAMES = (('.mobile_inverted_conv.', '.conv.'),)
_REF_LAYER_MAP = (
    # (reference sub-key regex, timm sub-key); applied to 'blocks.N.' suffixes.
    (r'conv\.inverted_bottleneck\.conv\.(conv\.)?weight$', 'conv_pw.weight'),
    (r'conv\.inverted_bottleneck\.bn\.(bn\.)?(\w+)$', r'bn1.\2'),
    (r'conv\.depth_conv\.conv\.(conv\.)?weight$', 'conv_dw.weight'),
    (r'conv\.depth_conv\.conv\.(\d+)to(\d+)_matrix$', r'conv_dw.kernel_transform_\1to\2'),
    (r'conv\.depth_conv\.bn\.(bn\.)?(\w+)$', r'bn2.\2'),
    (r'conv\.depth_conv\.se\.fc\.reduce\.(\w+)$', r'se.conv_reduce.\1'),
    (r'conv\.depth_conv\.se\.fc\.expand\.(\w+)$', r'se.conv_expand.\1'),
    (r'conv\.point_linear\.conv\.(conv\.)?weight$', 'conv_pwl.weight'),
    (r'conv\.point_linear\.bn\.(bn\.)?(\w+)$', r'bn3.\2'),
)
_REF_FIRST_BLOCK_MAP = (
    (r'conv\.depth_conv\.conv\.(conv\.)?weight$', 'conv_dw.weight'),
    (r'conv\.depth_conv\.bn\.(bn\.)?(\w+)$', r'bn1.\2'),
    (r'conv\.point_linear\.conv\.(conv\.)?weight$', 'conv_pw.weight'),
    (r'conv\.point_linear\.bn\.(bn\.)?(\w+)$', r'bn2.\2'),
)
_REF_TOP_MAP = (
    (r'first_conv\.conv\.weight$', 'conv_stem.weight'),
    (r'first_conv\.bn\.(bn\.)?(\w+)$', r'bn1.\2'),
    (r'final_expand_layer\.conv\.weight$', 'blocks.6.0.conv.weight'),
    (r'final_expand_layer\.bn\.(bn\.)?(\w+)$', r'blocks.6.0.bn1.\2'),
    (r'feature_mix_layer\.conv\.weight$', 'conv_head.weight'),
    (r'classifier\.linear\.(linear\.)?(\w+)$', r'classifier.\2'),
)


def convert_ofa_state_dict(
        state_dict: Mapping[str, torch.Tensor], stage_depths: Sequence[int] = (4, 4, 4, 4, 4),
) -> Dict[str, torch.Tensor]:
    """Map a reference ``OFAMobileNetV3`` state dict (current or legacy key names) onto this supernet's keys.

    Args:
        state_dict: The reference checkpoint's ``state_dict`` (unwrap ``{'state_dict': ...}`` first).
        stage_depths: Max depth of each of the reference's elastic stages.

    Raises:
        ValueError: On a key that does not belong to an OFA MobileNetV3.
    """
    boundaries = [1]  # the reference's block 0 is the fixed depthwise-separable block
    for d in stage_depths:
        boundaries.append(boundaries[-1] + d)

    def convert(key: str) -> Optional[str]:
        for old, new in _LEGACY_RENAMES:
            key = key.replace(old, new)
        m = re.match(r'blocks\.(\d+)\.(.*)$', key)
        if not m:
            mapped = map_key(key, _REF_TOP_MAP)
            return mapped.replace('blocks.6.', f'blocks.{len(stage_depths) + 1}.', 1) if mapped else None
        n, rest = int(m.group(1)), m.group(2)
        if n == 0:
            mapped, prefix = map_key(rest, _REF_FIRST_BLOCK_MAP), 'blocks.0.0.'
        else:
            stage = next((s for s in range(len(stage_depths)) if n < boundaries[s + 1]), None)
            if stage is None:
                raise ValueError(f'Reference key {key!r} lies beyond the {sum(stage_depths)} elastic blocks')
            mapped, prefix = map_key(rest, _REF_LAYER_MAP), f'blocks.{stage + 1}.{n - boundaries[stage]}.'
        return prefix + mapped if mapped else None

    return convert_reference_keys(state_dict, convert, 'an OFA MobileNetV3')
