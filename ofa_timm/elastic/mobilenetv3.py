"""Elastic MobileNetV3: a timm ``MobileNetV3`` turned into an OFA supernet, and back into stock timm models.

The supernet keeps the source model's modules and state-dict keys. Inverted-residual stages become elastic:
  * depth: a stage runs its first ``d`` blocks;
  * expand ratio: the expansion conv keeps its leading ``make_divisible(in_chs * e)`` channels;
  * kernel size: the depthwise kernel is centre-cropped through learned transform matrices (OFA).
The stem, a leading depthwise-separable block and the final 1x1 conv stage stay static, as in OFA.

``ElasticMobileNetV3.extract(subnet)`` builds a stock ``timm.models.MobileNetV3`` from a per-block arch_def and loads
the subnet's sliced weights into it strictly.

``ofa_mobilenetv3(width_mult)`` builds the canonical OFA MobileNetV3 spaces (kernel {3,5,7}, expand {3,4,6},
depth {2,3,4}, width 1.0 / 1.2) as timm models, and ``convert_ofa_state_dict`` maps the reference implementation's
checkpoints onto them.
"""
import copy
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import get_act_layer, make_divisible
from timm.models import MobileNetV3

from .._timm import ConvBnAct, DepthwiseSeparableConv, InvertedResidual, SqueezeExcite, decode_arch_def, round_channels
from ..space import OFA_RESOLUTIONS, StageChoices, Subnet, SubnetLike
from ._build import build_on_meta
from .base import (
    BlockSpec, ElasticSupernet, LayerSpec, band_permutation, conv_layers, convert_reference_keys, imagenet_cfg,
    input_importance, map_key, permute_channels, reference_resolution)
from .ops import ElasticBatchNormAct2d, ElasticConv2d, ElasticSqueezeExcite

__all__ = [
    'ElasticMobileNetV3', 'ofa_mobilenetv3', 'ofa_mobilenetv3_arch_def', 'convert_ofa_state_dict',
    'OFA_KERNELS', 'OFA_EXPANDS', 'OFA_DEPTHS', 'OFA_RESOLUTIONS',
]

OFA_KERNELS: Tuple[int, ...] = (3, 5, 7)
OFA_EXPANDS: Tuple[float, ...] = (3.0, 4.0, 6.0)
OFA_DEPTHS: Tuple[int, ...] = (2, 3, 4)

# Activation codes understood by timm's arch_def strings ('_nre', '_nhs', ...).
_ACT_CODES = ('re', 'r6', 'hs', 'sw', 'mi')
_ACT_NAMES = dict(re='relu', r6='relu6', hs='hard_swish', sw='swish', mi='mish')
_SE_RATIO = 0.25


def _act_code(act: nn.Module, where: str) -> str:
    for code in _ACT_CODES:
        if type(act) is get_act_layer(_ACT_NAMES[code]):
            return code
    raise ValueError(
        f'{where}: activation {type(act).__name__} has no timm arch_def code; supported: '
        f'{sorted(_ACT_NAMES.values())}')


def _mid_channels(in_chs: int, expand: float) -> int:
    # timm's (and OFA's) rule for the expanded width of an inverted residual.
    return make_divisible(in_chs * expand)


@dataclass(frozen=True)
class _Block:
    """What the arch_def string of one source block needs to say."""
    kind: str  # 'ds', 'ir' or 'cn'
    in_chs: int
    out_chs: int
    kernel: int
    stride: int
    act: str
    exp_ratio: float = 1.0
    mid_chs: int = 0
    se_chs: int = 0  # reduced SE width of the source block; 0: no SE
    noskip: bool = False

    @property
    def se(self) -> bool:
        return self.se_chs > 0

    @property
    def has_skip(self) -> bool:
        return self.in_chs == self.out_chs and self.stride == 1 and not self.noskip and self.kind != 'cn'

    def arch_str(self, kernel: Optional[int] = None, exp_ratio: Optional[float] = None) -> str:
        k = kernel or self.kernel
        s = f'{self.kind}_r1_k{k}_s{self.stride}'
        if self.kind == 'ir':
            s += f'_e{exp_ratio or self.exp_ratio:g}'
        elif self.kind == 'ds':
            s += '_e1'
        s += f'_c{self.out_chs}'
        if self.se:
            s += f'_se{_SE_RATIO}'
        s += f'_n{self.act}'
        if self.noskip:
            s += '_noskip'
        return s

    def layers(self, kernel: int, mid: int, se_chs: int, reduction: int) -> Tuple[LayerSpec, ...]:
        """The convs and norms of the block with ``kernel`` and ``mid`` channels, input at ``reduction``."""
        out_reduction = reduction * self.stride
        se = (LayerSpec('conv', mid, se_chs, bias=True, reduction=0),
              LayerSpec('conv', se_chs, mid, bias=True, reduction=0)) if self.se else ()
        if self.kind == 'ir':
            return (*conv_layers(self.in_chs, mid, reduction=reduction),
                    *conv_layers(mid, mid, kernel, self.stride, groups=mid, reduction=reduction), *se,
                    *conv_layers(mid, self.out_chs, reduction=out_reduction))
        if self.kind == 'ds':
            return (*conv_layers(self.in_chs, self.in_chs, kernel, self.stride, groups=self.in_chs,
                                 reduction=reduction), *se,
                    *conv_layers(self.in_chs, self.out_chs, reduction=out_reduction))
        return conv_layers(self.in_chs, self.out_chs, kernel, self.stride, reduction=reduction)

    @property
    def droppable(self) -> bool:
        # A block can be skipped by elastic depth only if dropping it keeps the tensor shape.
        return self.in_chs == self.out_chs and self.stride == 1


def _is_elastic_candidate(block: nn.Module) -> bool:
    if type(block) is not InvertedResidual:
        return False
    plain = (
        block.conv_s2d is None and isinstance(block.aa, nn.Identity)
        and type(block.conv_pw) is nn.Conv2d and type(block.conv_dw) is nn.Conv2d
        and type(block.conv_pwl) is nn.Conv2d
        and block.conv_pw.kernel_size == (1, 1) and block.conv_pwl.kernel_size == (1, 1)
        and block.conv_dw.groups == block.conv_dw.in_channels
    )
    return plain and (isinstance(block.se, nn.Identity) or type(block.se) is SqueezeExcite)


def _se_chs(block: nn.Module) -> int:
    se = getattr(block, 'se', None)
    return 0 if se is None or isinstance(se, nn.Identity) else se.conv_reduce.out_channels


def _describe_block(block: nn.Module, where: str) -> _Block:
    if isinstance(block, InvertedResidual):
        in_chs, mid = block.conv_pw.in_channels, block.conv_pw.out_channels
        exp = mid / in_chs
        if _mid_channels(in_chs, exp) != mid:
            raise ValueError(f'{where}: {mid} mid channels are not make_divisible({in_chs} * e) for any e')
        return _Block(
            'ir', in_chs, block.conv_pwl.out_channels, block.conv_dw.kernel_size[0], block.conv_dw.stride[0],
            _act_code(block.bn1.act, where), exp_ratio=exp, mid_chs=mid, se_chs=_se_chs(block),
            noskip=not block.has_skip and in_chs == block.conv_pwl.out_channels and block.conv_dw.stride[0] == 1)
    if isinstance(block, DepthwiseSeparableConv):
        if block.has_pw_act or block.conv_s2d is not None:
            raise ValueError(f'{where}: depthwise-separable blocks with pw_act or s2d are not supported')
        in_chs, out = block.conv_dw.in_channels, block.conv_pw.out_channels
        return _Block(
            'ds', in_chs, out, block.conv_dw.kernel_size[0], block.conv_dw.stride[0], _act_code(block.bn1.act, where),
            mid_chs=in_chs, se_chs=_se_chs(block),
            noskip=not block.has_skip and in_chs == out and block.conv_dw.stride[0] == 1)
    if isinstance(block, ConvBnAct):
        if block.has_skip:
            raise ValueError(f'{where}: ConvBnAct blocks with a skip connection are not supported')
        return _Block(
            'cn', block.conv.in_channels, block.conv.out_channels, block.conv.kernel_size[0], block.conv.stride[0],
            _act_code(block.bn1.act, where), mid_chs=block.conv.out_channels)
    raise ValueError(
        f'{where}: {type(block).__name__} blocks are not supported; supported: InvertedResidual, '
        f'DepthwiseSeparableConv, ConvBnAct')


def _allowed(options: Sequence[float], source: float) -> Tuple[Any, ...]:
    # Choices never exceed the source, and always contain it, so the max subnet is the source model.
    return tuple(sorted({o for o in options if o < source} | {source}))


class ElasticMobileNetV3(ElasticSupernet):
    """Elastic supernet over a timm ``MobileNetV3``.

    The supernet owns (deep copies of) the source model's modules, so its state dict has timm's keys plus the kernel
    transform matrices. Its max subnet computes exactly the source model.
    """
    source_types = (MobileNetV3,)
    space_options = ('kernels', 'expands', 'depths', 'resolutions', 'grow_kernels')
    feature_cfg = dict(flatten_sequential=True)  # stages live in a nested Sequential, as timm builds them

    def __init__(
            self,
            model: MobileNetV3,
            kernels: Sequence[int] = OFA_KERNELS,
            expands: Sequence[float] = OFA_EXPANDS,
            depths: Sequence[int] = OFA_DEPTHS,
            resolutions: Optional[Sequence[int]] = None,
            grow_kernels: bool = False,
    ):
        """
        Args:
            model: Source timm ``MobileNetV3`` (pretrained or not); it is copied, not modified.
            kernels: Candidate depthwise kernel sizes. Per block, choices larger than the source kernel are dropped
                unless ``grow_kernels``. An empty tuple (for any of ``kernels``, ``expands``, ``depths``) keeps
                only the source's value.
            expands: Candidate expand ratios. Per block, choices above the source ratio are dropped and the source
                ratio is always allowed.
            depths: Candidate stage depths. Per stage, choices above the source depth are dropped and the source depth
                is always allowed.
            resolutions: Allowed input resolutions (None: OFA's 128..224 in steps of 4 plus the source's own).
            grow_kernels: Zero-pad every elastic depthwise kernel to ``max(kernels)``; the function is unchanged.
        """
        super().__init__()
        model = self._checked_copy(model)
        self._adopt_source_attributes(model)
        self._adopt_modules(model)
        stage_choices = self._make_stages_elastic(kernels, expands, depths, grow_kernels)
        self._finish_init(self.blocks, stage_choices, resolutions)

    # --- construction -------------------------------------------------------------------------------------------
    @staticmethod
    def _checked_copy(model: nn.Module) -> MobileNetV3:
        if not isinstance(model, MobileNetV3):
            raise ValueError(f'ElasticMobileNetV3 needs a timm MobileNetV3, got {type(model).__name__}')
        if not isinstance(model.norm_head, nn.Identity):
            raise ValueError('MobileNetV3 models with a head norm (MobileNetV4 style) are not supported')
        return copy.deepcopy(model)

    def _adopt_modules(self, model: MobileNetV3) -> None:
        """Take the source's modules and read what extraction must rebuild (block archs, activations, SE type)."""
        self.in_chans = model.conv_stem.in_channels
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = model.blocks
        self.global_pool = model.global_pool
        self.conv_head = model.conv_head
        self.norm_head = model.norm_head
        self.act2 = model.act2
        self.flatten = model.flatten
        self.classifier = model.classifier
        self.stage_ends = tuple(f['stage'] for f in self.feature_info)
        self._stem_act = _act_code(model.bn1.act, 'stem')
        self._block_specs: List[List[_Block]] = [
            [_describe_block(b, f'blocks.{s}.{i}') for i, b in enumerate(stage)] for s, stage in enumerate(self.blocks)]
        se_template = next(
            (b.se for stage in self.blocks for b in stage if type(getattr(b, 'se', None)) is SqueezeExcite), None)
        self._se_gate = type(se_template.gate) if se_template is not None else None
        self._se_act = type(se_template.act1) if se_template is not None else None

    def _make_stages_elastic(
            self, kernels: Sequence[int], expands: Sequence[float], depths: Sequence[int], grow_kernels: bool,
    ) -> List[StageChoices]:
        """Turn every plain inverted-residual stage into an elastic one; returns the stages' choices."""
        self.elastic_stages: Tuple[int, ...] = tuple(
            s for s, stage in enumerate(self.blocks) if all(_is_elastic_candidate(b) for b in stage))
        if not self.elastic_stages:
            raise ValueError('The model has no plain inverted-residual stage to make elastic')
        self._slot_blocks: List[Tuple[int, int]] = [
            (s, i) for s in self.elastic_stages for i in range(len(self.blocks[s]))]
        stage_choices = []
        for s in self.elastic_stages:
            specs = self._block_specs[s]
            min_depth = max([i for i, b in enumerate(specs) if not b.droppable] + [0]) + 1
            depth_choices = tuple(d for d in _allowed(depths, len(specs)) if d >= min_depth)
            kernel_slots, expand_slots = [], []
            for block, spec in zip(self.blocks[s], specs):
                k_opts = _allowed(kernels, spec.kernel)
                if grow_kernels and kernels and max(kernels) > spec.kernel:
                    k_opts = tuple(sorted(set(kernels) | {spec.kernel}))
                kernel_slots.append(k_opts)
                expand_slots.append(_allowed(tuple(float(e) for e in expands), spec.exp_ratio))
                block.conv_pw = ElasticConv2d.from_static(block.conv_pw)
                block.bn1 = ElasticBatchNormAct2d.from_static(block.bn1)
                block.conv_dw = ElasticConv2d.from_static(block.conv_dw, k_opts)
                block.bn2 = ElasticBatchNormAct2d.from_static(block.bn2)
                if spec.se:
                    block.se = ElasticSqueezeExcite.from_static(block.se, _SE_RATIO)
                block.conv_pwl = ElasticConv2d.from_static(block.conv_pwl)
            stage_choices.append(StageChoices(depth_choices, tuple(kernel_slots), tuple(expand_slots)))
        return stage_choices

    # --- subnets ------------------------------------------------------------------------------------------------
    def _slots(self, subnet: Subnet):
        """Yield (stage index, block index, block, spec, kernel, expand) for every block slot of ``subnet``."""
        for slot, (s, i) in enumerate(self._slot_blocks):
            yield s, i, self.blocks[s][i], self._block_specs[s][i], subnet.kernels[slot], subnet.expands[slot]

    def _depths(self, subnet: Subnet) -> List[int]:
        """Active depth of every stage (elastic or not)."""
        depths = [len(stage) for stage in self.blocks]
        for s, depth in zip(self.elastic_stages, subnet.depths):
            depths[s] = depth
        return depths

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

    def set_active(self, subnet: Optional[SubnetLike] = None) -> Subnet:
        subnet = self.resolve(subnet)
        for s, i, block, spec, kernel, expand in self._slots(subnet):
            mid = _mid_channels(spec.in_chs, expand)
            block.conv_pw.set_active(out_channels=None if mid == spec.mid_chs else mid)
            block.conv_dw.set_active(kernel_size=kernel)
        self._stage_depths = self._depths(subnet)
        self.active_subnet = subnet
        return subnet

    def arch_def(self, subnet: Optional[SubnetLike] = None) -> List[List[str]]:
        """The timm arch_def (one string per block) of ``subnet`` (default: the active one)."""
        subnet = self.active_subnet if subnet is None else self.resolve(subnet)
        choices = {(s, i): (k, e) for s, i, _, _, k, e in self._slots(subnet)}
        return [
            [spec.arch_str(*choices.get((s, i), (None, None))) for i, spec in enumerate(specs[:depth])]
            for s, (specs, depth) in enumerate(zip(self._block_specs, self._depths(subnet)))]

    # --- extraction ---------------------------------------------------------------------------------------------
    def build_static(self, subnet: Subnet, state: Mapping[str, torch.Tensor]) -> MobileNetV3:
        se_layer = None
        if self._se_gate is not None:
            se_layer = partial(
                SqueezeExcite, gate_layer=self._se_gate, force_act_layer=self._se_act, rd_round_fn=round_channels)
        bn = self.bn1
        return build_on_meta(  # every tensor is replaced by the subnet's: skip the random init
            MobileNetV3,
            block_args=decode_arch_def(self.arch_def(subnet)),  # decoded afresh: the builder changes it in place
            num_classes=self.num_classes,
            in_chans=self.in_chans,
            stem_size=self.conv_stem.out_channels,
            fix_stem=True,
            num_features=self.head_hidden_size,
            head_bias=self.conv_head.bias is not None,
            act_layer=get_act_layer(_ACT_NAMES[self._stem_act]),
            norm_layer=partial(nn.BatchNorm2d, eps=bn.eps, momentum=bn.momentum),
            se_layer=se_layer,
            round_chs_fn=partial(round_channels, divisor=1),  # arch_def channels are exact already
            drop_rate=self.drop_rate,
            global_pool=self.global_pool.pool_type,
        )

    def static_state(self, subnet: Subnet) -> Dict[str, torch.Tensor]:
        def clone(prefix: str, module: nn.Module) -> Dict[str, torch.Tensor]:
            return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}

        def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {prefix + k: v for k, v in state.items()}

        state = clone('conv_stem.', self.conv_stem)
        state.update(clone('bn1.', self.bn1))
        for name in ('conv_head', 'norm_head', 'classifier'):
            state.update(clone(f'{name}.', getattr(self, name)))
        for s, stage in enumerate(self.blocks):
            if s not in self.elastic_stages:
                state.update(clone(f'blocks.{s}.', stage))
        depths = self._depths(subnet)
        for s, i, block, spec, kernel, expand in self._slots(subnet):
            if i >= depths[s]:
                continue
            p = f'blocks.{s}.{i}.'
            mid = _mid_channels(spec.in_chs, expand)
            state.update(prefixed(p + 'conv_pw.', block.conv_pw.static_state(spec.in_chs, out_channels=mid)))
            state.update(prefixed(p + 'bn1.', block.bn1.static_state(mid)))
            state.update(prefixed(p + 'conv_dw.', block.conv_dw.static_state(mid, kernel_size=kernel)))
            state.update(prefixed(p + 'bn2.', block.bn2.static_state(mid)))
            if spec.se:
                state.update(prefixed(p + 'se.', block.se.static_state(mid)))
            state.update(prefixed(p + 'conv_pwl.', block.conv_pwl.static_state(mid)))
            state.update(clone(p + 'bn3.', block.bn3))
        return state

    # --- family hooks -------------------------------------------------------------------------------------------
    def mid_channels(self, slot: int, expand: float) -> int:
        s, i = self._slot_blocks[slot]
        return _mid_channels(self._block_specs[s][i].in_chs, expand)

    @torch.no_grad()
    def sort_block_channels(self, slot: int, bands: Sequence[int]) -> None:
        s, i = self._slot_blocks[slot]
        block = self.blocks[s][i]
        if isinstance(block.se, ElasticSqueezeExcite):
            se = block.se
            rd_perm = band_permutation(
                input_importance(se.conv_expand.weight), [se.reduced_channels(m) for m in bands])
            permute_channels(se.conv_reduce, rd_perm)
            permute_channels(se.conv_expand, rd_perm, dim=1)
        perm = band_permutation(input_importance(block.conv_pwl.weight), bands)
        for module in (block.conv_pw, block.bn1, block.conv_dw, block.bn2):
            permute_channels(module, perm)
        if isinstance(block.se, ElasticSqueezeExcite):
            permute_channels(block.se.conv_reduce, perm, dim=1)
            permute_channels(block.se.conv_expand, perm)
        permute_channels(block.conv_pwl, perm, dim=1)

    def describe(self, subnet: Optional[SubnetLike] = None) -> Tuple[BlockSpec, ...]:
        subnet = self.active_subnet if subnet is None else self.resolve(subnet)
        space = self.space
        stem = self.conv_stem
        k, stride = stem.kernel_size[0], stem.stride[0]
        specs = [BlockSpec(
            'stem', 'stem', self.in_chans, stem.out_channels, stem.out_channels, k, stride, 1.0, reduction=1,
            act=_ACT_NAMES[self._stem_act], layers=conv_layers(self.in_chans, stem.out_channels, k, stride),
            modules=('conv_stem', 'bn1'))]
        elastic = {
            (s, i): (kernel, expand, slot) for slot, (s, i, _, _, kernel, expand) in enumerate(self._slots(subnet))}
        stage_genes = {s: space.gene_index('depths', n) for n, s in enumerate(self.elastic_stages)}
        reduction = stride
        for s, (specs_s, depth) in enumerate(zip(self._block_specs, self._depths(subnet))):
            for i, arch in enumerate(specs_s[:depth]):
                if (s, i) in elastic:
                    kernel, expand, slot = elastic[(s, i)]
                    mid = _mid_channels(arch.in_chs, expand)
                    se_chs = self.blocks[s][i].se.reduced_channels(mid) if arch.se else 0
                    genes = (stage_genes[s], space.gene_index('kernels', slot), space.gene_index('expands', slot))
                else:
                    kernel, expand, mid, se_chs, genes = arch.kernel, arch.exp_ratio, arch.mid_chs, arch.se_chs, ()
                specs.append(BlockSpec(
                    f'blocks.{s}.{i}', arch.kind, arch.in_chs, arch.out_chs, mid, kernel, arch.stride, expand,
                    reduction, se=arch.se, act=_ACT_NAMES[arch.act], skip=arch.has_skip,
                    layers=arch.layers(kernel, mid, se_chs, reduction), modules=(f'blocks.{s}.{i}',), genes=genes))
                reduction *= arch.stride
        head = self.conv_head
        layers = [LayerSpec('conv', head.in_channels, head.out_channels, bias=head.bias is not None, reduction=0)]
        if isinstance(self.classifier, nn.Linear):
            layers.append(LayerSpec('linear', self.classifier.in_features, self.classifier.out_features,
                                    bias=self.classifier.bias is not None, reduction=0))
        specs.append(BlockSpec(
            'head', 'head', self.num_features, self.num_classes, head.out_channels, 1, 1, 1.0, reduction,
            act=type(self.act2).__name__, layers=tuple(layers),
            modules=('global_pool', 'conv_head', 'norm_head', 'act2', 'flatten', 'classifier')))
        return tuple(specs)

    # --- timm model API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv_stem|bn1', blocks=r'^blocks\.(\d+)' if coarse else r'^blocks\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier; as in timm, the pooling of the efficient head cannot change its width."""
        self.num_classes = num_classes
        if global_pool is not None:
            from timm.layers import SelectAdaptivePool2d
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        device, dtype = self.conv_head.weight.device, self.conv_head.weight.dtype
        self.classifier = (
            nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype) if num_classes > 0
            else nn.Identity())

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv_stem(x))

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
