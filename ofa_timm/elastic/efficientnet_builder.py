"""What the elastic supernets over timm's EfficientNet-builder models share.

timm builds ``EfficientNet`` (EfficientNet, MobileNetV2, MNASNet, FBNet, SPNASNet, TinyNet, ...) and ``MobileNetV3``
(MobileNetV3, LCNet, MobileNetV4-conv, ...) with the same ``EfficientNetBuilder`` from arch_def strings, out of the
same blocks. :class:`EfficientNetBuilderSupernet` turns such a model into an OFA supernet, keeping its modules and
state-dict keys, and turns subnets back into stock timm models of the source's class built from a per-block arch_def.
A family module (``efficientnet.py``, ``mobilenetv3.py``) adds what differs between the two classes: the head, the
build arguments and the squeeze-excite rules its generators use.

Elastic blocks, per stage (depth: a stage runs its first ``d`` blocks):
  * ``InvertedResidual``: expand ratio (leading ``make_divisible(in_chs * e)`` mid channels) and depthwise kernel
    (centre crop through OFA's learned transforms);
  * ``UniversalInvertedResidual`` (MobileNetV4): expand ratio of ``pw_exp``, and the kernel of ``dw_mid``, or of
    ``dw_start`` in a block without ``dw_mid`` (ConvNeXt-like); ``dw_start`` beside a ``dw_mid`` and ``dw_end`` stay
    static, as do blocks without any depthwise conv (kernel gene 1);
  * ``DepthwiseSeparableConv``: depthwise kernel only (no expansion), in networks without inverted residuals (LCNet).
The stem, ``ConvBnAct`` and ``EdgeResidual`` stages, leading depthwise-separable stages of inverted-residual networks
and the head stay static, as in OFA.
"""
import abc
import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, Conv2dSame, get_act_layer, make_divisible

from .._timm import (
    ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual, SqueezeExcite, UniversalInvertedResidual,
    decode_arch_def, round_channels)
from ..space import DEPTHS, Dimension, Subnet, SubnetLike
from ._build import build_on_meta
from .base import (
    BlockSpec, ElasticSupernet, LayerSpec, band_permutation, conv_layers, input_importance, permute_channels)
from .ops import ElasticBatchNormAct2d, ElasticConv2d, ElasticSqueezeExcite

__all__ = ['EfficientNetBuilderSupernet', 'SeRule', 'OFA_KERNELS', 'OFA_EXPANDS', 'OFA_DEPTHS']

OFA_KERNELS: Tuple[int, ...] = (3, 5, 7)
OFA_EXPANDS: Tuple[float, ...] = (3.0, 4.0, 6.0)
OFA_DEPTHS: Tuple[int, ...] = (2, 3, 4)

# Activation codes understood by timm's arch_def strings ('_nre', '_nhs', ...).
_ACT_NAMES = dict(re='relu', r6='relu6', hs='hard_swish', sw='swish', mi='mish')
_SE_RATIO = 0.25  # every timm arch_def of these families writes se0.25
_SUPPORTED = 'InvertedResidual, UniversalInvertedResidual, DepthwiseSeparableConv, EdgeResidual, ConvBnAct'


def _act_code(act: nn.Module, where: str) -> str:
    for code, name in _ACT_NAMES.items():
        if type(act) is get_act_layer(name):
            return code
    raise ValueError(
        f'{where}: activation {type(act).__name__} has no timm arch_def code; supported: '
        f'{sorted(_ACT_NAMES.values())}')


def _arch_ratio(e: float) -> float:
    # The expand ratio as the arch_def string writes it (and timm's builder reads it back).
    return float(f'{e:g}')


def _mid_channels(in_chs: int, expand: float) -> int:
    # timm's (and OFA's) rule for the expanded width of an inverted residual.
    return make_divisible(in_chs * expand)


def _allowed(options: Sequence[float], source: float) -> Tuple[Any, ...]:
    # Choices never exceed the source, and always contain it, so the max subnet is the source model.
    return tuple(sorted({o for o in options if o < source} | {source}))


# --- squeeze-excite widths -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeRule:
    """How timm's builder sizes a block's ``SqueezeExcite``: ``round_fn(channels * 0.25)``, divided by the block's
    expand ratio unless ``from_exp`` (EfficientNet's rule, which reduces relative to the block input).

    Args:
        from_exp: Whether the reduction is relative to the expanded (mid) channels (the builder's ``se_from_exp``).
        round_fn: The SE's ``rd_round_fn``: ``round`` (timm's default) or ``round_channels`` (MobileNetV3).
        gate: Gate layer type.
        act: Activation layer type.
    """
    from_exp: bool
    round_fn: Callable[[float], int]
    gate: Optional[type] = None
    act: Optional[type] = None

    def reduced(self, channels: int, exp_ratio: float = 1.0) -> int:
        ratio = _SE_RATIO if self.from_exp else _SE_RATIO / exp_ratio  # as EfficientNetBuilder._make_block
        return self.round_fn(channels * ratio)

    def layer(self) -> Optional[Callable[..., nn.Module]]:
        """The ``se_layer`` argument that rebuilds the source's SE blocks."""
        if self.gate is None:
            return None
        return partial(SqueezeExcite, gate_layer=self.gate, force_act_layer=self.act, rd_round_fn=self.round_fn)


class _TableSqueezeExcite(ElasticSqueezeExcite):
    """``ElasticSqueezeExcite`` whose reduced width per active width is the one timm's builder gives the block at that
    expand ratio (a table over the block's choices), whatever rule the source family uses."""
    rd_table: Dict[int, int]

    @classmethod
    def from_block(cls, se: SqueezeExcite, rd_table: Mapping[int, int]) -> '_TableSqueezeExcite':
        in_chs, rd = se.conv_reduce.in_channels, se.conv_reduce.out_channels
        new = cls.from_static(se, rd_ratio=rd / in_chs, rd_divisor=1)  # the ratio only checks the full width
        new.rd_table = dict(rd_table)
        return new

    def reduced_channels(self, channels: int) -> int:
        return self.rd_table[channels]


# --- source blocks ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """Where the elastic layers of a block live (paths inside the block; '' for none)."""
    expand: str = ''  # pointwise conv producing the mid channels
    mid_norms: Tuple[str, ...] = ()  # norms over the mid channels
    dw: str = ''  # depthwise conv whose kernel is elastic
    dw_on_mid: bool = True  # whether ``dw`` runs on the mid channels (else on the block input)
    se: str = ''
    project: str = ''  # conv reading the mid channels

    def roles(self) -> Dict[str, str]:
        roles = {self.expand: 'expand', self.dw: 'dw', self.se: 'se', self.project: 'project'}
        roles.update({n: 'mid' for n in self.mid_norms})
        roles.pop('', None)
        return roles


@dataclass(frozen=True)
class _Block:
    """One source block: what its arch_def string says, and how to describe it at other kernels and widths.

    ``kernel`` is the kernel the kernel gene sets (the depthwise conv of ``layout``; a ``ConvBnAct``'s own conv;
    1 for a block without depthwise conv). ``uir_kernels`` are a UniversalInvertedResidual's (start, mid, end) kernels.
    """
    kind: str  # 'ds', 'dsa', 'ir', 'uir', 'er' or 'cn'
    in_chs: int
    out_chs: int
    kernel: int
    stride: int
    act: str
    exp_ratio: float = 1.0
    mid_chs: int = 0
    se_chs: int = 0  # reduced SE width of the source block; 0: no SE
    skip: bool = False
    uir_kernels: Tuple[int, int, int] = (0, 0, 0)

    @property
    def se(self) -> bool:
        return self.se_chs > 0

    @property
    def droppable(self) -> bool:
        # Elastic depth may skip a block only if that keeps the tensor shape.
        return self.in_chs == self.out_chs and self.stride == 1

    @property
    def layout(self) -> _Layout:
        se = 'se' if self.se else ''
        if self.kind == 'ir':
            return _Layout('conv_pw', ('bn1', 'bn2'), 'conv_dw', True, se, 'conv_pwl')
        if self.kind == 'uir':
            if self.uir_kernels[1]:
                return _Layout('pw_exp.conv', ('pw_exp.bn', 'dw_mid.bn'), 'dw_mid.conv', True, se, 'pw_proj.conv')
            dw = 'dw_start.conv' if self.uir_kernels[0] else ''
            return _Layout('pw_exp.conv', ('pw_exp.bn',), dw, False, se, 'pw_proj.conv')
        if self.kind in ('ds', 'dsa'):
            return _Layout(dw='conv_dw', dw_on_mid=False)
        return _Layout()

    def _uir_kernels(self, kernel: int) -> Tuple[int, int, int]:
        start, mid, end = self.uir_kernels
        if mid:
            return start, kernel, end
        return (kernel if start else 0), 0, end

    def arch_str(self, kernel: Optional[int] = None, exp_ratio: Optional[float] = None) -> str:
        """The block's timm arch_def string, at ``kernel`` and ``exp_ratio`` (default: the source's)."""
        k, e = kernel or self.kernel, exp_ratio or self.exp_ratio
        noskip = '_noskip' if not self.skip and self.droppable and self.kind != 'cn' else ''
        se = f'_se{_SE_RATIO}' if self.se else ''
        if self.kind == 'cn':
            return f'cn_r1_k{k}_s{self.stride}_c{self.out_chs}_n{self.act}' + ('_skip' if self.skip else '')
        if self.kind == 'uir':
            a, k, p = self._uir_kernels(k)
            return f'uir_r1_a{a}_k{k}_p{p}_s{self.stride}_e{e:g}_c{self.out_chs}{se}_n{self.act}{noskip}'
        exp = f'_e{e:g}' if self.kind in ('ir', 'er') else ''
        return f'{self.kind}_r1_k{k}_s{self.stride}{exp}_c{self.out_chs}{se}_n{self.act}{noskip}'

    def layers(self, kernel: int, mid: int, se_chs: int, reduction: int) -> Tuple[LayerSpec, ...]:
        """The convs and norms of the block with ``kernel`` and ``mid`` channels, its input at ``reduction``."""
        s, r, out = self.stride, reduction, self.out_chs
        se = (LayerSpec('conv', mid, se_chs, bias=True, reduction=0),
              LayerSpec('conv', se_chs, mid, bias=True, reduction=0)) if self.se else ()
        if self.kind == 'ir':
            return (*conv_layers(self.in_chs, mid, reduction=r), *conv_layers(mid, mid, kernel, s, mid, reduction=r),
                    *se, *conv_layers(mid, out, reduction=r * s))
        if self.kind in ('ds', 'dsa'):
            c = self.in_chs
            return *conv_layers(c, c, kernel, s, c, reduction=r), *se, *conv_layers(c, out, reduction=r * s)
        if self.kind == 'er':
            return *conv_layers(self.in_chs, mid, kernel, s, reduction=r), *se, *conv_layers(mid, out, reduction=r * s)
        if self.kind == 'cn':
            return conv_layers(self.in_chs, out, kernel, s, reduction=r)
        a, k, p = self._uir_kernels(kernel)
        s_start, s_mid, s_end = (1 if k else s), s, (1 if a or k else s)
        layers = []
        if a:
            layers += conv_layers(self.in_chs, self.in_chs, a, s_start, self.in_chs, reduction=r)
            r *= s_start
        layers += conv_layers(self.in_chs, mid, reduction=r)
        if k:
            layers += conv_layers(mid, mid, k, s_mid, mid, reduction=r)
            r *= s_mid
        layers += [*se, *conv_layers(mid, out, reduction=r)]
        if p:
            layers += conv_layers(out, out, p, s_end, out, reduction=r)
        return tuple(layers)


def _check_conv(conv: nn.Module, where: str, depthwise: bool = False, pointwise: bool = False) -> None:
    if type(conv) not in (nn.Conv2d, Conv2dSame):  # TF padding is refused with its own reason (_check_padding)
        raise ValueError(f'{where}: {type(conv).__name__} convs are not supported (plain nn.Conv2d only)')
    if depthwise and conv.groups != conv.in_channels:
        raise ValueError(f'{where}: grouped convs ({conv.groups} groups) are not supported, only depthwise')
    if not depthwise and conv.groups != 1:
        raise ValueError(f'{where}: grouped convs ({conv.groups} groups) are not supported')
    if pointwise and conv.kernel_size != (1, 1):
        raise ValueError(f'{where}: a {conv.kernel_size} conv where timm builds a 1x1 one is not supported')


def _check_norms(block: nn.Module, where: str) -> None:
    for name, m in block.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) is not BatchNormAct2d:
            raise ValueError(f'{where}.{name}: {type(m).__name__} is not supported (BatchNormAct2d only)')


def _se_chs(block: nn.Module, where: str) -> int:
    se = getattr(block, 'se', None)
    if se is None or isinstance(se, nn.Identity):
        return 0
    if type(se) is not SqueezeExcite:
        raise ValueError(f'{where}: {type(se).__name__} attention is not supported (SqueezeExcite only)')
    return se.conv_reduce.out_channels


def _read_block(block: nn.Module, where: str) -> _Block:
    """Read a source block, or raise a ValueError naming its type and position."""
    kind = type(block)
    if kind not in (InvertedResidual, DepthwiseSeparableConv, ConvBnAct, EdgeResidual, UniversalInvertedResidual):
        raise ValueError(f'{where}: {kind.__name__} blocks are not supported; supported: {_SUPPORTED}')
    if getattr(block, 'conv_s2d', None) is not None or not isinstance(getattr(block, 'aa', nn.Identity()), nn.Identity):
        raise ValueError(f'{where}: {kind.__name__} blocks with space-to-depth or anti-aliasing are not supported')
    _check_norms(block, where)
    if kind in (InvertedResidual, EdgeResidual):
        expand, spatial = (block.conv_pw, block.conv_dw) if kind is InvertedResidual else (block.conv_exp,) * 2
        if kind is InvertedResidual:
            _check_conv(block.conv_pw, f'{where}.conv_pw', pointwise=True)
            _check_conv(block.conv_dw, f'{where}.conv_dw', depthwise=True)
        else:
            _check_conv(block.conv_exp, f'{where}.conv_exp')
        _check_conv(block.conv_pwl, f'{where}.conv_pwl', pointwise=True)
        in_chs, mid = expand.in_channels, expand.out_channels
        exp = _arch_ratio(mid / in_chs)
        if _mid_channels(in_chs, exp) != mid:
            raise ValueError(f'{where}: {mid} mid channels are not make_divisible({in_chs} * e) for any e')
        return _Block(
            'ir' if kind is InvertedResidual else 'er', in_chs, block.conv_pwl.out_channels, spatial.kernel_size[0],
            spatial.stride[0], _act_code(block.bn1.act, where), exp_ratio=exp, mid_chs=mid,
            se_chs=_se_chs(block, where), skip=block.has_skip)
    if kind is DepthwiseSeparableConv:
        _check_conv(block.conv_dw, f'{where}.conv_dw', depthwise=True)
        _check_conv(block.conv_pw, f'{where}.conv_pw', pointwise=True)
        in_chs = block.conv_dw.in_channels
        return _Block(
            'dsa' if block.has_pw_act else 'ds', in_chs, block.conv_pw.out_channels, block.conv_dw.kernel_size[0],
            block.conv_dw.stride[0], _act_code(block.bn1.act, where), mid_chs=in_chs, se_chs=_se_chs(block, where),
            skip=block.has_skip)
    if kind is ConvBnAct:
        _check_conv(block.conv, f'{where}.conv')
        conv = block.conv
        return _Block('cn', conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                      _act_code(block.bn1.act, where), mid_chs=conv.out_channels, skip=block.has_skip)
    # UniversalInvertedResidual
    if not isinstance(block.layer_scale, nn.Identity):
        raise ValueError(f'{where}: UniversalInvertedResidual blocks with layer scale are not supported')
    kernels, stride = [], 1
    for name in ('dw_start', 'dw_mid', 'dw_end'):
        part = getattr(block, name)
        if isinstance(part, nn.Identity):
            kernels.append(0)
            continue
        _check_conv(part.conv, f'{where}.{name}.conv', depthwise=True)
        kernels.append(part.conv.kernel_size[0])
        stride = max(stride, part.conv.stride[0])
    for name in ('pw_exp', 'pw_proj'):
        _check_conv(getattr(block, name).conv, f'{where}.{name}.conv', pointwise=True)
    if any(getattr(m, 'aa', None) is not None for m in block.children() if hasattr(m, 'conv')):
        raise ValueError(f'{where}: UniversalInvertedResidual blocks with anti-aliasing are not supported')
    in_chs, mid = block.pw_exp.conv.in_channels, block.pw_exp.conv.out_channels
    exp = _arch_ratio(mid / in_chs)
    if _mid_channels(in_chs, exp) != mid:
        raise ValueError(f'{where}: {mid} mid channels are not make_divisible({in_chs} * e) for any e')
    start, mid_k, _ = kernels
    return _Block(
        'uir', in_chs, block.pw_proj.conv.out_channels, mid_k or start or 1, stride,
        _act_code(block.pw_exp.bn.act, where), exp_ratio=exp, mid_chs=mid, se_chs=_se_chs(block, where),
        skip=block.has_skip, uir_kernels=tuple(kernels))


def _check_padding(model: nn.Module) -> None:
    """Reject TF 'same' padding and dilation (output_stride), which arch_def rebuilds and elastic kernels lack."""
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        k, s = m.kernel_size[0], m.stride[0]
        if isinstance(m, Conv2dSame) or m.padding != (((s - 1) + (k - 1)) // 2,) * 2:
            arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
            alt = arch[3:] if arch.startswith('tf_') else ''
            hint = f'use {alt!r} instead' if alt in timm.list_models() else 'use a variant with symmetric padding'
            raise ValueError(
                f"{arch} uses TensorFlow 'same' padding ({name}: {type(m).__name__}, padding {m.padding!r}); elastic "
                f"kernels and timm's arch_def rebuild need timm's symmetric padding: {hint}")
        if m.dilation != (1, 1):
            raise ValueError(f'{name}: dilated convs (output_stride < 32) are not supported')


# --- the supernet ----------------------------------------------------------------------------------------------------
class EfficientNetBuilderSupernet(ElasticSupernet):
    """Elastic supernet over a timm model of the EfficientNet builder (base of the EfficientNet and MobileNetV3
    families).

    The supernet owns (deep copies of) the source model's modules, so its state dict has timm's keys plus the kernel
    transform matrices. Its max subnet computes exactly the source model. A family subclass sets ``source_types`` and
    ``se_rules``, adopts its head modules (:meth:`_adopt_head`), and provides the head's forward, description and
    build arguments.
    """
    space_options = ('kernels', 'expands', 'depths', 'resolutions', 'grow_kernels')
    single_subnet_options = dict(kernels=(), expands=(), depths=())
    feature_cfg = dict(flatten_sequential=True)  # stages live in a nested Sequential, as timm builds them
    #: Candidate ``(se_from_exp, rd_round_fn)`` pairs of the family, preferred first; the first that reproduces every
    #: SE block of the source is the one the supernet and its subnets use.
    se_rules: ClassVar[Tuple[Tuple[bool, Callable[[float], int]], ...]] = ()

    def __init__(
            self,
            model: nn.Module,
            kernels: Sequence[int] = OFA_KERNELS,
            expands: Sequence[float] = OFA_EXPANDS,
            depths: Sequence[int] = OFA_DEPTHS,
            resolutions: Optional[Sequence[int]] = None,
            grow_kernels: bool = False,
    ):
        """
        Args:
            model: Source timm model (pretrained or not); it is copied, not modified.
            kernels: Candidate depthwise kernel sizes. Per block, choices larger than the source kernel are dropped
                unless ``grow_kernels``. An empty tuple (for any of ``kernels``, ``expands``, ``depths``) keeps
                only the source's value.
            expands: Candidate expand ratios. Per block, choices above the source ratio are dropped and the source
                ratio is always allowed.
            depths: Candidate stage depths. Per stage, choices above the source depth are dropped and the source depth
                is always allowed.
            resolutions: Allowed input resolutions (None: OFA's 128..224 in steps of 4 plus the source's own).
            grow_kernels: Zero-pad every elastic depthwise kernel to ``max(kernels)``; the function is unchanged.

        Raises:
            ValueError: On TF 'same' padding (``tf_*`` variants), or a block type or block option that a timm arch_def
                cannot rebuild, naming it and its position.
        """
        super().__init__()
        if not isinstance(model, self.source_types):
            raise ValueError(f'{type(self).__name__} needs a timm {self.source_types[0].__name__}, '
                             f'got {type(model).__name__}')
        self._block_specs: List[List[_Block]] = [
            [_read_block(b, f'blocks.{s}.{i}') for i, b in enumerate(stage)] for s, stage in enumerate(model.blocks)]
        _check_padding(model)
        self._se_rule = self._find_se_rule(model)
        model = copy.deepcopy(model)
        self._adopt_source_attributes(model)
        self.in_chans = model.conv_stem.in_channels
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = model.blocks
        self._adopt_head(model)
        self.stage_ends = tuple(f['stage'] for f in self.feature_info)
        self._stem_act = _act_code(model.bn1.act, 'bn1')
        dimensions = self._make_stages_elastic(kernels, expands, depths, grow_kernels)
        self._finish_init(self.blocks, [*dimensions, self._resolution_dimension(resolutions)])

    # --- construction -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _adopt_head(self, model: nn.Module) -> None:
        """Take the source's head modules (everything after ``blocks``)."""

    def _find_se_rule(self, model: nn.Module) -> SeRule:
        """The family's first SE rule that reproduces every SE block of ``model``."""
        found = [(b.se_chs, b.mid_chs, b.exp_ratio, f'blocks.{s}.{i}')
                 for s, specs in enumerate(self._block_specs) for i, b in enumerate(specs) if b.se]
        if not found:
            return SeRule(*self.se_rules[0])
        ses = [m.se for stage in model.blocks for m in stage if type(getattr(m, 'se', None)) is SqueezeExcite]
        types = {(type(se.gate), type(se.act1)) for se in ses}
        if len(types) > 1:
            found = ', '.join(sorted(f'{gate.__name__}/{act.__name__}' for gate, act in types))
            raise ValueError(f'SE blocks with different gates/activations are not supported: {found}')
        (gate, act), = types
        for from_exp, round_fn in self.se_rules:
            rule = SeRule(from_exp, round_fn, gate, act)
            if all(rule.reduced(mid, e) == rd for rd, mid, e, _ in found):
                return rule
        rd, mid, e, where = found[0]
        raise ValueError(
            f'{where}: the SE widths ({mid} -> {rd} at expand {e:g}) follow none of the {type(self).__name__} SE rules '
            f'timm builds with; extraction could not rebuild them')

    def _make_stages_elastic(
            self, kernels: Sequence[int], expands: Sequence[float], depths: Sequence[int], grow_kernels: bool,
    ) -> List[Dimension]:
        """Turn the stages of the network's main block type elastic; returns their dimensions: the depth of each
        elastic stage, the depthwise kernel and the expand ratio of each of their block slots."""
        kinds = [{b.kind for b in specs} for specs in self._block_specs]
        elastic = [s for s, k in enumerate(kinds) if k <= {'ir', 'uir'}]
        if not elastic:  # a depthwise-separable network (LCNet): its blocks are the elastic ones
            elastic = [s for s, k in enumerate(kinds) if k <= {'ds', 'dsa'}]
        if not elastic:
            raise ValueError(
                'The model has no stage of InvertedResidual, UniversalInvertedResidual or DepthwiseSeparableConv '
                'blocks to make elastic')
        self.elastic_stages: Tuple[int, ...] = tuple(elastic)
        self._slot_blocks: List[Tuple[int, int]] = [
            (s, i) for s in self.elastic_stages for i in range(len(self.blocks[s]))]
        expands = tuple(_arch_ratio(e) for e in expands)
        depth_choices, kernel_slots, expand_slots = [], {}, {}
        for n, s in enumerate(self.elastic_stages):
            specs = self._block_specs[s]
            min_depth = max([i for i, b in enumerate(specs) if not b.droppable] + [0]) + 1
            depth_choices.append(tuple(d for d in _allowed(depths, len(specs)) if d >= min_depth))
            for i, (block, spec) in enumerate(zip(self.blocks[s], specs)):
                layout = spec.layout
                k_opts = (spec.kernel,)
                if layout.dw:
                    k_opts = _allowed(kernels, spec.kernel)
                    if grow_kernels and kernels and max(kernels) > spec.kernel:
                        k_opts = tuple(sorted(set(kernels) | {spec.kernel}))
                e_opts = _allowed(expands, spec.exp_ratio) if layout.expand else (spec.exp_ratio,)
                kernel_slots[(n, i)] = k_opts
                expand_slots[(n, i)] = e_opts
                self._make_block_elastic(block, spec, k_opts, e_opts)
        return [
            Dimension.per_stage(DEPTHS, depth_choices, shrink_order=2,
                                doc='blocks each elastic stage runs: its first d'),
            Dimension.per_block('kernels', kernel_slots, shrink_order=1, phases=1,
                                doc='depthwise kernel size; a smaller kernel is the centre of the next larger one '
                                    'through a learned transform'),
            Dimension.per_block('expands', expand_slots, shrink_order=3, integer=False, ranked=True,
                                doc='expand ratio: mid channels = make_divisible(in_chs * e), the leading ones'),
        ]

    def _make_block_elastic(self, block: nn.Module, spec: _Block, k_opts: Tuple[int, ...], e_opts: Tuple[float, ...]):
        layout = spec.layout
        for path, role in layout.roles().items():
            module = block.get_submodule(path)
            if role in ('expand', 'project'):
                new = ElasticConv2d.from_static(module)
            elif role == 'dw':
                new = ElasticConv2d.from_static(module, k_opts)
            elif role == 'mid':
                new = ElasticBatchNormAct2d.from_static(module)
            else:
                table = {_mid_channels(spec.in_chs, e): self._se_rule.reduced(_mid_channels(spec.in_chs, e), e)
                         for e in e_opts}
                new = _TableSqueezeExcite.from_block(module, table)
            parent, _, name = path.rpartition('.')
            setattr(block.get_submodule(parent) if parent else block, name, new)

    # --- subnets ------------------------------------------------------------------------------------------------
    def _slots(self, subnet: Subnet) -> Iterator[Tuple[int, int, nn.Module, _Block, int, float]]:
        """Yield (stage index, block index, block, spec, kernel, expand) for every block slot of ``subnet``."""
        for slot, (s, i) in enumerate(self._slot_blocks):
            yield s, i, self.blocks[s][i], self._block_specs[s][i], subnet.kernels[slot], subnet.expands[slot]

    def _depths(self, subnet: Subnet) -> List[int]:
        """Active depth of every stage (elastic or not)."""
        depths = [len(stage) for stage in self.blocks]
        for s, depth in zip(self.elastic_stages, subnet.depths):
            depths[s] = depth
        return depths

    def set_active(self, subnet: Optional[SubnetLike] = None) -> Subnet:
        subnet = self.resolve(subnet)
        for _, _, block, spec, kernel, expand in self._slots(subnet):
            layout = spec.layout
            if layout.expand:
                mid = _mid_channels(spec.in_chs, expand)
                block.get_submodule(layout.expand).set_active(out_channels=None if mid == spec.mid_chs else mid)
            if layout.dw:
                block.get_submodule(layout.dw).set_active(kernel_size=kernel)
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
    @abc.abstractmethod
    def _build_kwargs(self) -> Dict[str, Any]:
        """Arguments of the source class beyond the blocks, stem and shared options (head, SE placement)."""

    @abc.abstractmethod
    def _head_modules(self) -> Tuple[str, ...]:
        """Names of the head modules, in the order the head runs them."""

    def build_static(self, subnet: Subnet, state: Mapping[str, torch.Tensor]) -> nn.Module:
        bn = self.bn1
        return build_on_meta(  # every tensor is replaced by the subnet's: skip the random init
            self.source_types[0],
            block_args=decode_arch_def(self.arch_def(subnet)),  # decoded afresh: the builder changes it in place
            num_classes=self.num_classes,
            in_chans=self.in_chans,
            stem_size=self.conv_stem.out_channels,
            fix_stem=True,
            act_layer=get_act_layer(_ACT_NAMES[self._stem_act]),
            norm_layer=partial(nn.BatchNorm2d, eps=bn.eps, momentum=bn.momentum),
            se_layer=self._se_rule.layer(),
            round_chs_fn=partial(round_channels, divisor=1),  # arch_def channels are exact already
            drop_rate=self.drop_rate,
            global_pool=self.global_pool.pool_type,
            **self._build_kwargs(),
        )

    def static_state(self, subnet: Subnet) -> Dict[str, torch.Tensor]:
        def clone(prefix: str, module: nn.Module) -> Dict[str, torch.Tensor]:
            return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}

        state = clone('conv_stem.', self.conv_stem)
        state.update(clone('bn1.', self.bn1))
        depths = self._depths(subnet)
        for s, stage in enumerate(self.blocks):
            if s not in self.elastic_stages:
                state.update(clone(f'blocks.{s}.', stage))
        for s, i, block, spec, kernel, expand in self._slots(subnet):
            if i < depths[s]:
                state.update(self._block_state(f'blocks.{s}.{i}.', block, spec, kernel, expand))
        for name in self._head_modules():
            state.update(clone(f'{name}.', getattr(self, name)))
        return state

    @staticmethod
    def _block_state(
            prefix: str, block: nn.Module, spec: _Block, kernel: int, expand: float) -> Dict[str, torch.Tensor]:
        """The static state of an elastic block at ``kernel`` and ``expand``."""
        layout = spec.layout
        roles = layout.roles()
        mid = _mid_channels(spec.in_chs, expand) if layout.expand else spec.in_chs
        state, covered = {}, ()
        for path, module in block.named_modules():
            if covered and path.startswith(covered):
                continue  # inside an elastic layer, whose static_state holds it
            role = roles.get(path)
            if role is None:
                part = {n: t.detach().clone() for n, t in (*module._parameters.items(), *module._buffers.items())
                        if t is not None and n not in module._non_persistent_buffers_set}
            else:
                covered += (path + '.',)
                if role == 'expand':
                    part = module.static_state(spec.in_chs, out_channels=mid)
                elif role == 'dw':
                    part = module.static_state(mid if layout.dw_on_mid else spec.in_chs, kernel_size=kernel)
                else:
                    part = module.static_state(mid)
            pre = f'{prefix}{path}.' if path else prefix
            state.update({pre + k: v for k, v in part.items()})
        return state

    # --- family hooks -------------------------------------------------------------------------------------------
    def mid_channels(self, slot: int, expand: float) -> int:
        """Mid channels of block slot ``slot`` at ``expand``."""
        s, i = self._slot_blocks[slot]
        spec = self._block_specs[s][i]
        return _mid_channels(spec.in_chs, expand) if spec.layout.expand else spec.in_chs

    def rank(self, dimension: str, trained: int = 1) -> None:
        """Sort every block's mid channels (``'expands'``) by the L1 norm of the weights that read them, within the
        bands of the ``trained`` largest expand ratios."""
        if dimension != 'expands':
            return super().rank(dimension, trained)
        for slot, choices in enumerate(self.space['expands'].choices):
            self.sort_block_channels(slot, [self.mid_channels(slot, e) for e in choices[::-1][:trained]])

    @torch.no_grad()
    def zero_init_residual(self) -> int:
        """Zero the scale of the last batch norm of every block that adds its input to its output."""
        count = 0
        for stage in self.blocks:
            for block in stage:
                bns = [m for m in block.children() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
                if getattr(block, 'has_skip', False) and bns:
                    nn.init.zeros_(bns[-1].weight)
                    count += 1
        return count

    @torch.no_grad()
    def sort_block_channels(self, slot: int, bands: Sequence[int]) -> None:
        """Sort the mid channels of block slot ``slot``, each within its band of ``bands`` (mid-channel counts)."""
        s, i = self._slot_blocks[slot]
        block, layout = self.blocks[s][i], self._block_specs[s][i].layout
        if not layout.expand:  # no mid channels of its own: its channels are its neighbours'
            return
        project = block.get_submodule(layout.project)
        perm = band_permutation(input_importance(project.weight), bands)
        if layout.se:
            se = block.get_submodule(layout.se)
            rd_perm = band_permutation(
                input_importance(se.conv_expand.weight), [se.reduced_channels(m) for m in bands])
            permute_channels(se.conv_reduce, rd_perm)
            permute_channels(se.conv_expand, rd_perm, dim=1)
            permute_channels(se.conv_reduce, perm, dim=1)
            permute_channels(se.conv_expand, perm)
        mid_layers = (layout.expand, *layout.mid_norms) + ((layout.dw,) if layout.dw and layout.dw_on_mid else ())
        for path in mid_layers:
            permute_channels(block.get_submodule(path), perm)
        permute_channels(project, perm, dim=1)

    @abc.abstractmethod
    def _describe_head(self, reduction: int) -> BlockSpec:
        """The head's description; its input is ``ceil(resolution / reduction)`` pixels wide."""

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
                    mid = _mid_channels(arch.in_chs, expand) if arch.layout.expand else arch.mid_chs
                    se_chs = self._se_rule.reduced(mid, expand) if arch.se else 0
                    genes = (stage_genes[s], space.gene_index('kernels', slot), space.gene_index('expands', slot))
                else:
                    kernel, expand, mid, se_chs, genes = arch.kernel, arch.exp_ratio, arch.mid_chs, arch.se_chs, ()
                specs.append(BlockSpec(
                    f'blocks.{s}.{i}', arch.kind, arch.in_chs, arch.out_chs, mid, kernel, arch.stride, expand,
                    reduction, se=arch.se, act=_ACT_NAMES[arch.act], skip=arch.skip,
                    layers=arch.layers(kernel, mid, se_chs, reduction), modules=(f'blocks.{s}.{i}',), genes=genes))
                reduction *= arch.stride
        specs.append(self._describe_head(reduction))
        return tuple(specs)

    # --- timm model API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv_stem(x))


def classifier_spec(classifier: nn.Module) -> Tuple[LayerSpec, ...]:
    """The classifier's layer spec (none for an ``nn.Identity``)."""
    if not isinstance(classifier, nn.Linear):
        return ()
    return (LayerSpec('linear', classifier.in_features, classifier.out_features, bias=classifier.bias is not None,
                      reduction=0),)
