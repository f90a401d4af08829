"""Elastic ResNet: a timm ``ResNet`` turned into an OFA supernet, and back into stock timm models.

The supernet keeps the source model's modules and state-dict keys. Its elastic dimensions:
  * depth: each stage runs its first ``d`` blocks;
  * expand ratio: a block's mid width is ``make_divisible(round(stage_width * e))`` (OFA's rule);
  * width: the stem and every stage keep their leading ``make_divisible(base * w)`` channels;
  * resolution.

``ElasticResNet.extract(subnet)`` builds the source's timm class (``ResNet`` with ``Bottleneck`` or ``BasicBlock``
blocks) with ``layers=`` for depth on the meta device, resizes its layers to the subnet's per-block widths, and puts
the subnet's weights in it.

The canonical OFA-ResNet50 (``ofa_resnet50``) has a residual middle stem conv that the reference can skip. No stock
timm ResNet has that stem, so its subnets come out as :class:`OFAResNet`, a minimal ``timm.models.ResNet`` subclass
whose only change is that stem (:class:`ResidualDeepStem`). Every subnet of a converted timm model is a stock
``ResNet``.
"""
import copy
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import make_divisible
from timm.models import ResNet, adapt_model_from_string
from timm.models.resnet import BasicBlock, Bottleneck

from ..space import DEPTHS, OFA_RESOLUTIONS, Dimension, Subnet, SubnetLike
from ._build import build_on_meta, reshape_on_meta
from .base import (
    BlockSpec, ElasticSupernet, LayerSpec, band_permutation, conv_layers, convert_reference_keys, imagenet_cfg,
    input_importance, map_key, permute_channels, reference_resolution)
from .ops import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear

__all__ = [
    'ElasticResNet', 'OFAResNet', 'ResidualDeepStem', 'ofa_resnet50', 'convert_ofa_resnet_state_dict',
    'OFA_RESNET_EXPANDS', 'OFA_RESNET_WIDTHS', 'OFA_RESNET_DEPTH_REDUCTIONS', 'OFA_RESNET50_BASE_DEPTHS',
]

OFA_RESNET_EXPANDS: Tuple[float, ...] = (0.2, 0.25, 0.35)
OFA_RESNET_WIDTHS: Tuple[float, ...] = (0.65, 0.8, 1.0)
OFA_RESNET_DEPTH_REDUCTIONS: Tuple[int, ...] = (0, 1, 2)
# The reference OFA-ResNet50 writes depth as an offset on these base depths (and width as an index into
# OFA_RESNET_WIDTHS) in its subnet dicts.
OFA_RESNET50_BASE_DEPTHS: Tuple[int, ...] = (2, 2, 4, 2)
BASIC_BLOCK_EXPANDS: Tuple[float, ...] = (0.5, 0.75, 1.0)
_LAYERS = ('layer1', 'layer2', 'layer3', 'layer4')


class ResidualDeepStem(nn.Module):
    """OFA-ResNet's stem: 3x3 s2 conv, an optional residual 3x3 conv, and a 3x3 conv to the stem width.

    The final conv's norm and activation are the ResNet's ``bn1`` / ``act1``, as with timm's deep stem.
    """

    def __init__(
            self,
            in_chans: int,
            mid_chs: int,
            out_chs: int,
            residual: bool = True,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv_in = nn.Conv2d(in_chans, mid_chs, 3, stride=2, padding=1, bias=False, **dd)
        self.bn_in = norm_layer(mid_chs, **dd)
        self.act_in = act_layer(inplace=True)
        self.residual = residual
        if residual:
            self.conv_mid = nn.Conv2d(mid_chs, mid_chs, 3, padding=1, bias=False, **dd)
            self.bn_mid = norm_layer(mid_chs, **dd)
            self.act_mid = act_layer(inplace=True)
        self.conv_out = nn.Conv2d(mid_chs, out_chs, 3, padding=1, bias=False, **dd)
        # Set by an elastic supernet to skip the residual conv; a static stem simply has none.
        self.skip_residual = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_in(self.bn_in(self.conv_in(x)))
        if self.residual and not self.skip_residual:
            x = x + self.act_mid(self.bn_mid(self.conv_mid(x)))
        return self.conv_out(x)


class OFAResNet(ResNet):
    """A timm ``ResNet`` with OFA-ResNet's residual deep stem; everything else is stock timm."""

    def __init__(self, stem_residual: bool = True, stem_width: int = 32, **kwargs: Any):
        """
        Args:
            stem_residual: Whether the stem has its residual middle conv.
            stem_width: Width of the first two stem convs; the stem outputs ``2 * stem_width``.
            **kwargs: ``timm.models.ResNet`` arguments (``stem_type`` is always ``'deep'``).
        """
        kwargs['stem_type'] = 'deep'
        super().__init__(stem_width=stem_width, **kwargs)
        norm_layer = type(self.bn1)
        self.conv1 = ResidualDeepStem(
            kwargs.get('in_chans', 3), stem_width, self.bn1.num_features, residual=stem_residual,
            act_layer=type(self.act1), norm_layer=partial(norm_layer, eps=self.bn1.eps, momentum=self.bn1.momentum),
            device=self.bn1.weight.device, dtype=self.bn1.weight.dtype)
        for m in self.conv1.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')


@dataclass(frozen=True)
class _Stem:
    kind: str  # 'plain' (one conv), 'deep' (timm three-conv stem) or 'residual' (OFA stem)
    mid_chs: Tuple[int, ...]  # widths of the convs before the last one
    out_chs: int


def _mid_channels(width: int, expand: float) -> int:
    # OFA-ResNet's rule: bottleneck mid width follows the (possibly shrunk) stage width.
    return make_divisible(round(width * expand))


def _channels(base: int, mult: float) -> int:
    return base if mult == 1.0 else make_divisible(base * mult)


def _block_out(block: nn.Module) -> int:
    return (block.conv3 if isinstance(block, Bottleneck) else block.conv2).out_channels


def _check_block(block: nn.Module, where: str) -> None:
    if not isinstance(block, (Bottleneck, BasicBlock)):
        raise ValueError(f'{where}: {type(block).__name__} blocks are not supported; supported: Bottleneck, BasicBlock')
    if getattr(block, 'se', None) is not None or not isinstance(block.aa, nn.Identity):
        raise ValueError(f'{where}: ResNets with attention (SE/ECA) or anti-aliasing blocks are not supported')
    if block.conv2.groups != 1 or block.conv1.dilation != (1, 1) or block.conv2.dilation != (1, 1):
        raise ValueError(f'{where}: grouped (ResNeXt) or dilated blocks are not supported')
    if block.downsample is not None and not (
            isinstance(block.downsample, nn.Sequential) and len(block.downsample) in (2, 3)
            and isinstance(block.downsample[-2], nn.Conv2d) and block.downsample[-2].kernel_size == (1, 1)):
        raise ValueError(f'{where}: only 1x1 conv (optionally avg-pool) downsampling is supported')


class ElasticResNet(ElasticSupernet):
    """Elastic supernet over a timm ``ResNet`` (``Bottleneck`` or ``BasicBlock`` blocks).

    The supernet owns (deep copies of) the source model's modules, so its state dict has the source's keys. Its max
    subnet computes exactly the source model.
    """
    source_types = (ResNet,)
    timm_sources = ('resnet50d', 'resnet26d', 'resnet101', 'resnet34')
    space_options = ('expands', 'widths', 'depth_reductions', 'resolutions', 'stem_depths')
    single_subnet_options = dict(expands=(), widths=(), depth_reductions=(), stem_depths=(1,))
    stage_ends = (0, 1, 2, 3, 4)

    def __init__(
            self,
            model: ResNet,
            expands: Optional[Sequence[float]] = None,
            widths: Sequence[float] = OFA_RESNET_WIDTHS,
            depth_reductions: Sequence[int] = OFA_RESNET_DEPTH_REDUCTIONS,
            resolutions: Optional[Sequence[int]] = None,
            stem_depths: Sequence[int] = (0, 1),
    ):
        """
        Args:
            model: Source timm ``ResNet`` (pretrained or not); it is copied, not modified.
            expands: Candidate expand ratios (mid width / stage width). Defaults to OFA's (0.2, 0.25, 0.35) for
                Bottleneck blocks and (0.5, 0.75, 1.0) for BasicBlocks. Choices above the source ratio are dropped;
                the source's own is always kept (``()`` keeps it alone).
            widths: Candidate width multipliers for the stem and each stage; 1.0 is always allowed.
            depth_reductions: Per stage, the depth choices are the source depth minus each of these (at least 1).
            resolutions: Allowed input resolutions (None: OFA's 128..224 in steps of 4 plus the source's own).
            stem_depths: For an OFA residual stem only: allowed numbers of residual stem convs (0 skips it).
        """
        super().__init__()
        model = self._checked_copy(model)
        self._adopt_source_attributes(model)
        self._adopt_modules(model)
        width_choices = self._make_widths_elastic(widths)
        depths, expands = self._make_stages_elastic(expands, depth_reductions, stem_depths)
        widths = Dimension('widths', 'network', (width_choices,) * len(self._width_bases), integer=False,
                           shrink_order=4, doc='width multiplier of a stem conv or a stage: its leading '
                                               'make_divisible(channels * w) channels')
        self._finish_init([getattr(self, n) for n in _LAYERS],
                          [depths, expands, widths, self._resolution_dimension(resolutions)])

    # --- construction -------------------------------------------------------------------------------------------
    @staticmethod
    def _checked_copy(model: nn.Module) -> ResNet:
        if not isinstance(model, ResNet):
            raise ValueError(f'ElasticResNet needs a timm ResNet, got {type(model).__name__}')
        for name in _LAYERS:
            for i, block in enumerate(getattr(model, name)):
                _check_block(block, f'{name}.{i}')
        if not isinstance(model.maxpool, nn.MaxPool2d):
            raise ValueError('ResNets with a replaced or anti-aliased stem pool are not supported')
        return copy.deepcopy(model)

    def _adopt_modules(self, model: ResNet) -> None:
        """Take the source's modules and read what extraction must rebuild (block type, stem, downsampling)."""
        self._block_type = type(model.layer1[0])
        self._ofa_stem_class = type(model) if isinstance(model.conv1, ResidualDeepStem) else None
        downsamples = [getattr(model, n)[0].downsample for n in _LAYERS if getattr(model, n)[0].downsample is not None]
        self._avg_down = bool(downsamples) and len(downsamples[0]) == 3
        self._act_layer = type(model.act1)
        self._bn_args = dict(eps=model.bn1.eps, momentum=model.bn1.momentum)
        self.conv1 = model.conv1
        self.bn1 = ElasticBatchNorm2d.from_static(model.bn1)
        self.act1 = model.act1
        self.maxpool = model.maxpool
        for name in _LAYERS:
            setattr(self, name, getattr(model, name))
        self.global_pool = model.global_pool
        self.fc = ElasticLinear.from_static(model.fc) if isinstance(model.fc, nn.Linear) else model.fc
        self.in_chans = self._convert_stem()

    def _convert_stem(self) -> int:
        stem = self.conv1
        if isinstance(stem, ResidualDeepStem):
            if not stem.residual:
                raise ValueError('An OFA stem without its residual conv cannot be made elastic')
            self._stem = _Stem('residual', (stem.conv_in.out_channels,), stem.conv_out.out_channels)
            in_chans = stem.conv_in.in_channels
            for name in ('conv_in', 'conv_mid', 'conv_out'):
                setattr(stem, name, ElasticConv2d.from_static(getattr(stem, name)))
            for name in ('bn_in', 'bn_mid'):
                setattr(stem, name, ElasticBatchNorm2d.from_static(getattr(stem, name)))
        elif isinstance(stem, nn.Sequential):
            if len(stem) != 7:
                raise ValueError('Only timm deep stems of three convs are supported')
            self._stem = _Stem('deep', (stem[0].out_channels, stem[3].out_channels), stem[6].out_channels)
            in_chans = stem[0].in_channels
            for i in (0, 3, 6):
                stem[i] = ElasticConv2d.from_static(stem[i])
            for i in (1, 4):
                stem[i] = ElasticBatchNorm2d.from_static(stem[i])
        elif isinstance(stem, nn.Conv2d):
            self._stem = _Stem('plain', (), stem.out_channels)
            in_chans = stem.in_channels
            self.conv1 = ElasticConv2d.from_static(stem)
        else:
            raise ValueError(f'Unsupported ResNet stem {type(stem).__name__}')
        return in_chans

    def _make_widths_elastic(self, widths: Sequence[float]) -> Tuple[float, ...]:
        """Lay out the width slots: stem (mid, out) or stem (out), then one per stage. A first stage without a
        downsample adds its input to its output, so its width is the stem's and it has no slot of its own."""
        stem_bases = [self._stem.mid_chs, (self._stem.out_chs,)] if self._stem.mid_chs else [(self._stem.out_chs,)]
        stage_bases = [(_block_out(getattr(self, n)[0]),) for n in _LAYERS]
        tied = self.layer1[0].downsample is None
        self._width_bases: List[Tuple[int, ...]] = stem_bases + stage_bases[1 if tied else 0:]
        self._stem_width_slot = len(stem_bases) - 1
        self._stage_width_slots: Tuple[int, ...] = tuple(
            self._stem_width_slot if tied and s == 0 else self._stem_width_slot + s + (0 if tied else 1)
            for s in range(4))
        return tuple(sorted(set(float(w) for w in widths if 0 < w <= 1.0) | {1.0}))

    def _make_stages_elastic(
            self, expands: Optional[Sequence[float]], depth_reductions: Sequence[int], stem_depths: Sequence[int],
    ) -> Tuple[Dimension, Dimension]:
        """Convert every block; returns the depth dimension (of the stem, for an OFA stem, and of each stage) and
        the expand dimension of every block slot."""
        default_expands = OFA_RESNET_EXPANDS if self._block_type is Bottleneck else BASIC_BLOCK_EXPANDS
        candidates = tuple(sorted(float(e) for e in (default_expands if expands is None else expands)))
        depth_choices, expand_slots = [], {}
        if self._stem.kind == 'residual':
            stem_choices = tuple(sorted({d for d in stem_depths if d in (0, 1)}))
            if not stem_choices:
                raise ValueError(f'stem_depths {list(stem_depths)} must contain 0 and/or 1')
            depth_choices.append(stem_choices)
        offset = len(depth_choices)
        self._slot_blocks: List[Tuple[int, int]] = []
        for s, name in enumerate(_LAYERS):
            stage = getattr(self, name)
            n = len(stage)
            stage_depths = tuple(sorted({n - r for r in depth_reductions if n - r >= 1} | {n}))
            for i, block in enumerate(stage):
                self._convert_block(block)
                width, mid = _block_out(block), block.conv1.out_channels
                fitting = [e for e in candidates if _mid_channels(width, e) == mid]
                src_e = max(fitting) if fitting else mid / width
                if _mid_channels(width, src_e) != mid:
                    raise ValueError(f'{name}.{i}: {mid} mid channels are not make_divisible(round({width} * e))')
                expand_slots[(s + offset, i)] = tuple(sorted({e for e in candidates if e < src_e} | {src_e}))
                self._slot_blocks.append((s, i))
            depth_choices.append(stage_depths)
        depth = Dimension.per_stage(DEPTHS, depth_choices, shrink_order=2,
                                    doc='blocks each stage runs (its first d); for an OFA stem, whether it runs its '
                                        'residual conv')
        expand = Dimension.per_block('expands', expand_slots, shrink_order=3, integer=False, ranked=True,
                                     doc='mid width of a block = make_divisible(round(stage width * e)), the leading '
                                         'channels')
        return depth, expand

    @staticmethod
    def _convert_block(block: nn.Module) -> None:
        convs = ('conv1', 'conv2', 'conv3') if isinstance(block, Bottleneck) else ('conv1', 'conv2')
        for name in convs:
            setattr(block, name, ElasticConv2d.from_static(getattr(block, name)))
            bn = 'bn' + name[-1]
            setattr(block, bn, ElasticBatchNorm2d.from_static(getattr(block, bn)))
        if block.downsample is not None:
            block.downsample[-2] = ElasticConv2d.from_static(block.downsample[-2])
            block.downsample[-1] = ElasticBatchNorm2d.from_static(block.downsample[-1])

    @staticmethod
    def _default_cfg(num_classes: int) -> Dict[str, Any]:
        return _ofa_resnet_cfg(num_classes)

    # --- subnets ------------------------------------------------------------------------------------------------
    def _widths(self, subnet: Subnet) -> List[Tuple[int, ...]]:
        """Channel counts of every width slot for ``subnet``."""
        return [tuple(_channels(b, w) for b in bases) for bases, w in zip(self._width_bases, subnet.widths)]

    def _block_plan(self, subnet: Subnet):
        """Yield (layer name, block index, block, mid channels, out channels, active, slot) for every block."""
        widths = self._widths(subnet)
        stage_depths = subnet.depths[-4:]
        for slot, (s, i) in enumerate(self._slot_blocks):
            out = widths[self._stage_width_slots[s]][0]
            block = getattr(self, _LAYERS[s])[i]
            yield _LAYERS[s], i, block, _mid_channels(out, subnet.expands[slot]), out, i < stage_depths[s], slot

    def subnet_from_reference(self, d: Mapping[str, Any]) -> Subnet:
        """Read the reference ``OFAResNets`` form ``{'d': [stem + 4 depth offsets], 'e': [...], 'w': [width
        indices], 'r': ...}`` (the canonical OFA-ResNet50 space only)."""
        if self._stem.kind != 'residual':
            raise ValueError('The reference ResNet subnet form describes the canonical OFA-ResNet50 only; write this '
                             "supernet's subnets in ofa_timm's form (Subnet.to_dict)")
        missing = {'d', 'e', 'w'} - set(d)
        if missing or not set(d) <= {'d', 'e', 'w', 'r'}:
            raise ValueError(f'Reference ResNet subnet dicts have keys d, e, w (and optionally r); got {sorted(d)}')
        depth, width = list(d['d']), list(d['w'])
        n_stages = len(OFA_RESNET50_BASE_DEPTHS)
        if len(depth) != n_stages + 1:
            raise ValueError(
                f"Reference ResNet 'd' must have {n_stages + 1} entries (stem + {n_stages} stages), got {depth}")
        if len(width) != n_stages + 2:
            raise ValueError(f"Reference ResNet 'w' must have {n_stages + 2} entries, got {width}")
        for i, v in enumerate(depth):
            if v not in (0, 1, 2):
                raise ValueError(f"Reference ResNet 'd'[{i}] = {v} is not allowed; allowed: [0, 1, 2]")
        for i, v in enumerate(width):
            if v not in range(len(OFA_RESNET_WIDTHS)):
                raise ValueError(f"Reference ResNet 'w'[{i}] = {v} is not a width index; "
                                 f'allowed: {list(range(len(OFA_RESNET_WIDTHS)))}')
        # The reference skips the residual middle stem conv unless the stem 'depth' is its maximum (2).
        depths = [1 if depth[0] == 2 else 0] + [base + off for base, off in zip(OFA_RESNET50_BASE_DEPTHS, depth[1:])]
        return Subnet(depths=depths, expands=d['e'], widths=[OFA_RESNET_WIDTHS[i] for i in width],
                      resolution=reference_resolution(d.get('r')))

    def convert_reference_state_dict(
            self, state_dict: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        if not any(k.startswith('input_stem.') for k in state_dict):
            return None
        return convert_ofa_resnet_state_dict(state_dict, [len(getattr(self, n)) for n in _LAYERS])

    def set_active(self, subnet: Optional[SubnetLike] = None) -> Subnet:
        subnet = self.resolve(subnet)

        def out(conv: ElasticConv2d, channels: int) -> None:
            conv.set_active(out_channels=None if channels == conv.out_channels else channels)

        widths = self._widths(subnet)
        stem_out = widths[self._stem_width_slot][0]
        if self._stem.kind == 'residual':
            out(self.conv1.conv_in, widths[0][0])
            out(self.conv1.conv_mid, widths[0][0])
            out(self.conv1.conv_out, stem_out)
            self.conv1.skip_residual = subnet.depths[0] == 0
        elif self._stem.kind == 'deep':
            out(self.conv1[0], widths[0][0])
            out(self.conv1[3], widths[0][1])
            out(self.conv1[6], stem_out)
        else:
            out(self.conv1, stem_out)
        for name, i, block, mid, width, _, _ in self._block_plan(subnet):
            out(block.conv1, mid)
            if isinstance(block, Bottleneck):
                out(block.conv2, mid)
                out(block.conv3, width)
            else:
                out(block.conv2, width)
            if block.downsample is not None:
                out(block.downsample[-2], width)
        self._stage_depths = list(subnet.depths[-4:])
        self.active_subnet = subnet
        return subnet

    # --- extraction ---------------------------------------------------------------------------------------------
    def build_static(self, subnet: Subnet, state: Mapping[str, torch.Tensor]) -> ResNet:
        """The source's timm class with ``layers=`` for depth, resized on the meta device to the subnet's widths
        (what ``timm.models.adapt_model_from_string`` does, without its deep copy)."""
        kwargs = dict(
            block=self._block_type, layers=tuple(subnet.depths[-4:]), num_classes=self.num_classes,
            in_chans=self.in_chans, global_pool=self.global_pool.pool_type, avg_down=self._avg_down,
            act_layer=self._act_layer, norm_layer=partial(nn.BatchNorm2d, **self._bn_args), drop_rate=self.drop_rate)
        if self._stem.kind == 'residual':
            model = build_on_meta(self._ofa_stem_class, stem_residual=subnet.depths[0] == 1, **kwargs)
        else:
            if self._stem.kind == 'deep':
                tiered = self._stem.mid_chs[0] != self._stem.mid_chs[1]
                kwargs.update(stem_type='deep_tiered' if tiered else 'deep', stem_width=self._stem.mid_chs[1])
            model = build_on_meta(ResNet, **kwargs)
        reshape_on_meta(model, state)
        widths = self._widths(subnet)
        channels = [widths[self._stem_width_slot][0]] + [widths[slot][0] for slot in self._stage_width_slots]
        for info, chs in zip(model.feature_info, channels):
            info['num_chs'] = chs
        model.num_features = model.head_hidden_size = channels[-1]
        return model

    def static_state(self, subnet: Subnet) -> Dict[str, torch.Tensor]:
        state: Dict[str, torch.Tensor] = {}

        def add(prefix: str, module: nn.Module, in_channels: int, out_channels: Optional[int] = None) -> None:
            if isinstance(module, ElasticConv2d):
                tensors = module.static_state(in_channels, out_channels=out_channels)
            else:
                tensors = module.static_state(in_channels)
            state.update({f'{prefix}.{k}': v for k, v in tensors.items()})

        widths = self._widths(subnet)
        stem_out = widths[self._stem_width_slot][0]
        if self._stem.kind == 'residual':
            mid = widths[0][0]
            add('conv1.conv_in', self.conv1.conv_in, self.in_chans, mid)
            add('conv1.bn_in', self.conv1.bn_in, mid)
            if subnet.depths[0] == 1:
                add('conv1.conv_mid', self.conv1.conv_mid, mid, mid)
                add('conv1.bn_mid', self.conv1.bn_mid, mid)
            add('conv1.conv_out', self.conv1.conv_out, mid, stem_out)
        elif self._stem.kind == 'deep':
            m0, m1 = widths[0]
            add('conv1.0', self.conv1[0], self.in_chans, m0)
            add('conv1.1', self.conv1[1], m0)
            add('conv1.3', self.conv1[3], m0, m1)
            add('conv1.4', self.conv1[4], m1)
            add('conv1.6', self.conv1[6], m1, stem_out)
        else:
            add('conv1', self.conv1, self.in_chans, stem_out)
        add('bn1', self.bn1, stem_out)
        in_chs = stem_out
        for name, i, block, mid, width, active, _ in self._block_plan(subnet):
            if not active:
                continue
            p = f'{name}.{i}'
            add(f'{p}.conv1', block.conv1, in_chs, mid)
            add(f'{p}.bn1', block.bn1, mid)
            if isinstance(block, Bottleneck):
                add(f'{p}.conv2', block.conv2, mid, mid)
                add(f'{p}.bn2', block.bn2, mid)
                add(f'{p}.conv3', block.conv3, mid, width)
                add(f'{p}.bn3', block.bn3, width)
            else:
                add(f'{p}.conv2', block.conv2, mid, width)
                add(f'{p}.bn2', block.bn2, width)
            if block.downsample is not None:
                k = len(block.downsample)
                add(f'{p}.downsample.{k - 2}', block.downsample[-2], in_chs, width)
                add(f'{p}.downsample.{k - 1}', block.downsample[-1], width)
            in_chs = width
        if isinstance(self.fc, ElasticLinear):
            add('fc', self.fc, in_chs)
        return state

    # --- family hooks -------------------------------------------------------------------------------------------
    def mid_channels(self, slot: int, expand: float) -> int:
        """Mid channels of block slot ``slot`` at ``expand``, at full width."""
        s, i = self._slot_blocks[slot]
        return _mid_channels(_block_out(getattr(self, _LAYERS[s])[i]), expand)

    def rank(self, dimension: str, trained: int = 1) -> None:
        """Sort every block's mid channels (``'expands'``) by the L1 norm of the weights that read them, within the
        bands of the ``trained`` largest expand ratios."""
        if dimension != 'expands':
            return super().rank(dimension, trained)
        for slot, choices in enumerate(self.space['expands'].choices):
            self.sort_block_channels(slot, [self.mid_channels(slot, e) for e in choices[::-1][:trained]])

    def zero_init_residual(self) -> int:
        """timm's ``zero_init_last`` of every block: the last batch norm scale of each residual branch is zero."""
        blocks = [b for name in _LAYERS for b in getattr(self, name)]
        for block in blocks:
            block.zero_init_last()
        return len(blocks)

    @torch.no_grad()
    def sort_block_channels(self, slot: int, bands: Sequence[int]) -> None:
        """Sort the mid channels of block slot ``slot``, each within its band of ``bands`` (mid-channel counts)."""
        s, i = self._slot_blocks[slot]
        block = getattr(self, _LAYERS[s])[i]
        if isinstance(block, Bottleneck):
            perm = band_permutation(input_importance(block.conv3.weight), bands)
            permute_channels(block.conv2, perm)
            permute_channels(block.bn2, perm)
            permute_channels(block.conv3, perm, dim=1)
        perm = band_permutation(input_importance(block.conv2.weight), bands)
        permute_channels(block.conv1, perm)
        permute_channels(block.bn1, perm)
        permute_channels(block.conv2, perm, dim=1)

    def describe(self, subnet: Optional[SubnetLike] = None) -> Tuple[BlockSpec, ...]:
        subnet = self.active_subnet if subnet is None else self.resolve(subnet)
        space = self.space
        widths = self._widths(subnet)
        residual_stem = self._stem.kind == 'residual'
        width_gene = [space.gene_index('widths', w) for w in range(len(self._width_bases))]
        stem_genes = tuple(width_gene[:self._stem_width_slot + 1])
        stem_out = widths[self._stem_width_slot][0]
        act = type(self.act1).__name__
        if self._stem.kind == 'plain':
            k = self.conv1.kernel_size[0]
            layers = conv_layers(self.in_chans, stem_out, k, 2)
            stem_modules: Tuple[str, ...] = ('conv1', 'bn1', 'act1', 'maxpool')
        else:
            m0, m1 = widths[0] if self._stem.kind == 'deep' else (widths[0][0], widths[0][0])
            layers = conv_layers(self.in_chans, m0, 3, 2)
            if residual_stem and subnet.depths[0] == 1:
                layers += conv_layers(m0, m0, 3, reduction=2)
            if residual_stem:
                stem_genes += (space.gene_index('depths', 0),)
            layers += conv_layers(m0, m1, 3, reduction=2) if self._stem.kind == 'deep' else ()
            layers += conv_layers(m1, stem_out, 3, reduction=2)
            k = 3
            stem_modules = ('conv1', 'bn1', 'act1', 'maxpool')
        specs = [BlockSpec('stem', 'stem', self.in_chans, stem_out, widths[0][0], k, 4, 1.0, 1, act=act,
                           layers=layers, modules=stem_modules, genes=stem_genes)]
        in_chs, reduction = stem_out, 4
        depth_offset = 1 if residual_stem else 0
        for name, i, block, mid, width, active, slot in self._block_plan(subnet):
            if not active:
                continue
            stride = block.conv2.stride[0] if isinstance(block, Bottleneck) else block.conv1.stride[0]
            s = int(name[-1]) - 1
            in_slot = self._stage_width_slots[s - 1] if s > 0 else self._stem_width_slot
            genes = (space.gene_index('depths', s + depth_offset), space.gene_index('expands', slot),
                     width_gene[self._stage_width_slots[s]]) + ((width_gene[in_slot],) if i == 0 else ())
            if isinstance(block, Bottleneck):
                layers = (*conv_layers(in_chs, mid, reduction=reduction),
                          *conv_layers(mid, mid, 3, stride, reduction=reduction),
                          *conv_layers(mid, width, reduction=reduction * stride))
            else:
                layers = (*conv_layers(in_chs, mid, 3, stride, reduction=reduction),
                          *conv_layers(mid, width, 3, reduction=reduction * stride))
            if block.downsample is not None:
                pooled = len(block.downsample) == 3 and stride > 1
                layers += conv_layers(in_chs, width, 1, 1 if pooled else stride,
                                      reduction=reduction * stride if pooled else reduction)
            specs.append(BlockSpec(
                f'{name}.{i}', 'bottleneck' if isinstance(block, Bottleneck) else 'basic', in_chs, width, mid,
                3, stride, subnet.expands[slot], reduction, act=act, skip=True, layers=layers,
                modules=(f'{name}.{i}',), genes=genes))
            in_chs, reduction = width, reduction * stride
        layers = ()
        if isinstance(self.fc, nn.Linear):
            layers = (LayerSpec('linear', in_chs, self.fc.out_features, bias=self.fc.bias is not None, reduction=0),)
        specs.append(BlockSpec('head', 'head', in_chs, self.num_classes, in_chs, 1, 1, 1.0, reduction, act=act,
                               layers=layers, modules=('global_pool', 'fc'),
                               genes=(width_gene[self._stage_width_slots[-1]],)))
        return tuple(specs)

    # --- timm model API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (it reads the leading channels of the active last-stage width)."""
        from timm.layers import create_classifier
        self.num_classes = num_classes
        pool_type = global_pool or self.global_pool.pool_type
        pool, fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)
        device = self.bn1.weight.device
        self.global_pool = pool.to(device)
        self.fc = ElasticLinear.from_static(fc.to(device)) if isinstance(fc, nn.Linear) else fc

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _enter_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)


def _ofa_resnet_cfg(num_classes: int = 1000) -> Dict[str, Any]:
    return imagenet_cfg(num_classes=num_classes, first_conv='conv1.conv_in', classifier='fc')


# --- canonical OFA-ResNet50 -----------------------------------------------------------------------------------------
def ofa_resnet50(
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.,
        drop_path_rate: float = 0.,
        global_pool: str = 'avg',
        expands: Sequence[float] = OFA_RESNET_EXPANDS,
        widths: Sequence[float] = OFA_RESNET_WIDTHS,
        resolutions: Sequence[int] = OFA_RESOLUTIONS,
) -> ElasticResNet:
    """The canonical OFA-ResNet50 supernet (``ofa_resnet50`` of the reference), randomly initialised.

    Depth offsets {0, 1, 2} on base depths [2, 2, 4, 2], a skippable residual middle stem conv, expand ratios
    {0.2, 0.25, 0.35} and width multipliers {0.65, 0.8, 1.0}. Numerically identical to the reference ``OFAResNets``
    given the same weights (see :func:`convert_ofa_resnet_state_dict`).
    """
    max_e = max(expands)
    depths = tuple(d + 2 for d in OFA_RESNET50_BASE_DEPTHS)
    source = OFAResNet(
        block=Bottleneck, layers=depths, num_classes=num_classes, in_chans=in_chans, stem_width=32, avg_down=True,
        drop_rate=drop_rate, drop_path_rate=drop_path_rate, global_pool=global_pool)
    # OFA's bottleneck mid widths (make_divisible(round(out * max_e))) are not timm's out / 4: adapt them.
    shapes = {k: list(v.shape) for k, v in source.state_dict().items() if k.endswith('.weight')}
    for name in _LAYERS:
        for i, block in enumerate(getattr(source, name)):
            mid = _mid_channels(block.conv3.out_channels, max_e)
            p = f'{name}.{i}'
            shapes[f'{p}.conv1.weight'][0] = mid
            shapes[f'{p}.bn1.weight'] = [mid]
            shapes[f'{p}.conv2.weight'][:2] = [mid, mid]
            shapes[f'{p}.bn2.weight'] = [mid]
            shapes[f'{p}.conv3.weight'][1] = mid
    source = adapt_model_from_string(source, '***'.join(f'{k}:[{",".join(map(str, v))}]' for k, v in shapes.items()))
    source.init_weights()
    source.pretrained_cfg = _ofa_resnet_cfg(num_classes)
    return ElasticResNet(
        source, expands=expands, widths=widths, depth_reductions=OFA_RESNET_DEPTH_REDUCTIONS, resolutions=resolutions)


_REF_RESNET_BLOCK_MAP = (
    (r'conv([123])\.conv\.(conv\.)?weight$', r'conv\1.weight'),
    (r'conv([123])\.bn\.(bn\.)?(\w+)$', r'bn\1.\3'),
    (r'downsample\.conv\.(conv\.)?weight$', 'downsample.1.weight'),
    (r'downsample\.bn\.(bn\.)?(\w+)$', r'downsample.2.\2'),
)
_REF_RESNET_TOP_MAP = (
    (r'input_stem\.0\.conv\.(conv\.)?weight$', 'conv1.conv_in.weight'),
    (r'input_stem\.0\.bn\.(bn\.)?(\w+)$', r'conv1.bn_in.\2'),
    (r'input_stem\.1\.conv\.conv\.(conv\.)?weight$', 'conv1.conv_mid.weight'),
    (r'input_stem\.1\.conv\.bn\.(bn\.)?(\w+)$', r'conv1.bn_mid.\2'),
    (r'input_stem\.2\.conv\.(conv\.)?weight$', 'conv1.conv_out.weight'),
    (r'input_stem\.2\.bn\.(bn\.)?(\w+)$', r'bn1.\2'),
    (r'classifier\.linear\.(linear\.)?(\w+)$', r'fc.\2'),
)


def convert_ofa_resnet_state_dict(
        state_dict: Mapping[str, torch.Tensor], stage_depths: Sequence[int] = (4, 4, 6, 4),
) -> Dict[str, torch.Tensor]:
    """Map a reference ``OFAResNets`` state dict (current or legacy key names) onto :func:`ofa_resnet50`'s keys.

    Raises:
        ValueError: On a key that does not belong to an OFA-ResNet checkpoint.
    """
    starts = [sum(stage_depths[:s]) for s in range(len(stage_depths) + 1)]

    def convert(key: str) -> Optional[str]:
        m = re.match(r'blocks\.(\d+)\.(.*)$', key)
        if not m:
            return map_key(key, _REF_RESNET_TOP_MAP)
        n = int(m.group(1))
        stage = next((s for s in range(len(stage_depths)) if n < starts[s + 1]), None)
        rest = map_key(m.group(2), _REF_RESNET_BLOCK_MAP)
        return f'{_LAYERS[stage]}.{n - starts[stage]}.{rest}' if stage is not None and rest else None

    return convert_reference_keys(state_dict, convert, 'an OFA-ResNet')
