"""Elastic ResNet: a timm ``ResNet`` turned into an OFA supernet, and back into stock timm models.

The supernet keeps the source model's modules and state-dict keys. Its elastic dimensions:
  * depth: each stage runs its first ``d`` blocks;
  * expand ratio: a block's mid width is ``make_divisible(round(stage_width * e))`` (OFA's rule);
  * width: the stem and every stage keep their leading ``make_divisible(base * w)`` channels;
  * resolution.

``ElasticResNet.extract(subnet)`` builds the source's timm class (``ResNet`` with ``Bottleneck`` or ``BasicBlock``
blocks) with ``layers=`` for depth, then ``timm.models.adapt_model_from_string`` for per-block widths, and puts the
subnet's weights in it.

The canonical OFA-ResNet50 (``ofa_resnet50``) has a residual middle stem conv that the reference can skip. No stock
timm ResNet has that stem, so its subnets come out as :class:`OFAResNet`, a minimal ``timm.models.ResNet`` subclass
whose only change is that stem (:class:`ResidualDeepStem`). Every subnet of a converted timm model is a stock
``ResNet``.
"""
import copy
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import make_divisible
from timm.models import ResNet
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._prune import adapt_model_from_string
from timm.models.resnet import BasicBlock, Bottleneck

from ..space import (
    OFA_RESNET50_BASE_DEPTHS, OFA_RESNET50_WIDTH_MULTS, OFA_RESOLUTIONS, SearchSpace, StageChoices, Subnet, SubnetLike)
from ._build import assign_state, build_on_meta, skip_meta_init
from .base import ElasticSupernet, imagenet_cfg, map_key
from .ops import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear

__all__ = [
    'ElasticResNet', 'OFAResNet', 'ResidualDeepStem', 'ofa_resnet50', 'convert_ofa_resnet_state_dict',
    'OFA_RESNET_EXPANDS', 'OFA_RESNET_WIDTHS', 'OFA_RESNET_DEPTH_REDUCTIONS',
]

OFA_RESNET_EXPANDS: Tuple[float, ...] = (0.2, 0.25, 0.35)
OFA_RESNET_WIDTHS: Tuple[float, ...] = OFA_RESNET50_WIDTH_MULTS
OFA_RESNET_DEPTH_REDUCTIONS: Tuple[int, ...] = (0, 1, 2)
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
                Bottleneck blocks and (0.5, 0.75, 1.0) for BasicBlocks. Choices above the source ratio are dropped.
            widths: Candidate width multipliers for the stem and each stage; 1.0 is always allowed.
            depth_reductions: Per stage, the depth choices are the source depth minus each of these (at least 1).
            resolutions: Allowed input resolutions (None: OFA's 128..224 in steps of 4 plus the source's own).
            stem_depths: For an OFA residual stem only: allowed numbers of residual stem convs (0 skips it).
        """
        super().__init__()
        if not isinstance(model, ResNet):
            raise ValueError(f'ElasticResNet needs a timm ResNet, got {type(model).__name__}')
        model = copy.deepcopy(model)
        for name in _LAYERS:
            for i, block in enumerate(getattr(model, name)):
                _check_block(block, f'{name}.{i}')
        if not isinstance(model.maxpool, nn.MaxPool2d):
            raise ValueError('ResNets with a replaced or anti-aliased stem pool are not supported')
        self._adopt_source_attributes(model)
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

        # Width slots: stem (mid, out) or stem (out), then one per stage. A first stage without a downsample adds
        # its input to its output, so its width is the stem's and it has no slot of its own.
        stem_bases = [self._stem.mid_chs, (self._stem.out_chs,)] if self._stem.mid_chs else [(self._stem.out_chs,)]
        stage_bases = [(self._block_out(getattr(self, n)[0]),) for n in _LAYERS]
        tied = self.layer1[0].downsample is None
        self._width_bases: List[Tuple[int, ...]] = stem_bases + stage_bases[1 if tied else 0:]
        stem_slot = len(stem_bases) - 1
        self._stage_width_slots: Tuple[int, ...] = tuple(
            stem_slot if tied and s == 0 else stem_slot + s + (0 if tied else 1) for s in range(4))
        width_choices = tuple(sorted(set(float(w) for w in widths if 0 < w <= 1.0) | {1.0}))

        default_expands = OFA_RESNET_EXPANDS if self._block_type is Bottleneck else BASIC_BLOCK_EXPANDS
        candidates = tuple(sorted(float(e) for e in (expands or default_expands)))
        stage_choices = []
        if self._stem.kind == 'residual':
            stem_choices = tuple(d for d in stem_depths if d in (0, 1))
            if not stem_choices:
                raise ValueError(f'stem_depths {list(stem_depths)} must contain 0 and/or 1')
            stage_choices.append(StageChoices(depths=stem_choices))
        self._source_expands: List[List[float]] = []
        for name in _LAYERS:
            stage = getattr(self, name)
            n = len(stage)
            depth_choices = tuple(sorted({n - r for r in depth_reductions if n - r >= 1} | {n}))
            slot_expands, source_expands = [], []
            for i, block in enumerate(stage):
                self._convert_block(block)
                width = self._block_out(block)
                mid = block.conv1.out_channels
                fitting = [e for e in candidates if _mid_channels(width, e) == mid]
                src_e = max(fitting) if fitting else mid / width
                if _mid_channels(width, src_e) != mid:
                    raise ValueError(f'{name}.{i}: {mid} mid channels are not make_divisible(round({width} * e))')
                source_expands.append(src_e)
                slot_expands.append(tuple(sorted({e for e in candidates if e < src_e} | {src_e})))
            self._source_expands.append(source_expands)
            stage_choices.append(StageChoices(depths=depth_choices, expands=tuple(slot_expands)))

        source_res = int(self.pretrained_cfg.get('input_size', (3, 224, 224))[-1])
        # Default: OFA's 128..224 plus the source's own resolution; an explicit list is taken as given.
        resolutions = tuple(resolutions) if resolutions else tuple(set(OFA_RESOLUTIONS) | {source_res})
        self.space = SearchSpace(
            tuple(stage_choices), widths=(width_choices,) * len(self._width_bases),
            resolutions=resolutions)
        self._stage_depths: List[int] = [len(getattr(self, n)) for n in _LAYERS]
        self.active_subnet: Subnet = self.space.max()
        self.set_active(self.active_subnet)

    # --- conversion helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _default_cfg(num_classes: int) -> Dict[str, Any]:
        return _ofa_resnet_cfg(num_classes)

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

    def _convert_block(self, block: nn.Module) -> None:
        convs = ('conv1', 'conv2', 'conv3') if isinstance(block, Bottleneck) else ('conv1', 'conv2')
        for name in convs:
            setattr(block, name, ElasticConv2d.from_static(getattr(block, name)))
            bn = 'bn' + name[-1]
            setattr(block, bn, ElasticBatchNorm2d.from_static(getattr(block, bn)))
        if block.downsample is not None:
            block.downsample[-2] = ElasticConv2d.from_static(block.downsample[-2])
            block.downsample[-1] = ElasticBatchNorm2d.from_static(block.downsample[-1])

    def _block_out(self, block: nn.Module) -> int:
        return (block.conv3 if isinstance(block, Bottleneck) else block.conv2).out_channels

    def _widths(self, subnet: Subnet) -> List[Tuple[int, ...]]:
        """Channel counts of every width slot for ``subnet``."""
        return [tuple(_channels(b, w) for b in bases) for bases, w in zip(self._width_bases, subnet.widths)]

    # --- elastic API --------------------------------------------------------------------------------------------
    def _block_plan(self, subnet: Subnet):
        """Yield (layer name, block index, block, mid channels, out channels, active) for every block."""
        widths = self._widths(subnet)
        stage_depths = subnet.depths[-4:]
        slot = 0
        for s, name in enumerate(_LAYERS):
            out = widths[self._stage_width_slots[s]][0]
            for i, block in enumerate(getattr(self, name)):
                mid = _mid_channels(out, subnet.expands[slot])
                yield name, i, block, mid, out, i < stage_depths[s]
                slot += 1

    def set_active(self, subnet: Optional[SubnetLike] = None) -> Subnet:
        """Make ``subnet`` (default: the max subnet; also ``'max'``, ``'min'``, a dict or a JSON path) the one
        ``forward`` computes. Returns it validated."""
        subnet = self.space.max() if subnet is None else self.space.resolve(subnet)

        def out(conv: ElasticConv2d, channels: int) -> None:
            conv.set_active(out_channels=None if channels == conv.out_channels else channels)

        widths = self._widths(subnet)
        stem_out = widths[1 if self._stem.mid_chs else 0][0]
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
        for name, i, block, mid, width, _ in self._block_plan(subnet):
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

    @torch.no_grad()
    def extract(self, subnet: Optional[SubnetLike] = None) -> ResNet:
        """Build a timm ``ResNet`` carrying ``subnet``'s weights (default: the active subnet).

        Converted timm models give a stock ``timm.models.ResNet``; the canonical OFA-ResNet50 gives an
        :class:`OFAResNet`. The model is independent of the supernet, in the supernet's train/eval mode, and its
        ``pretrained_cfg['input_size']`` carries the subnet's resolution.
        """
        subnet = self.active_subnet if subnet is None else self.space.resolve(subnet)
        state = self._static_state(subnet)
        model_string = '***'.join(
            f'{k}:[{",".join(str(d) for d in v.shape)}]' for k, v in state.items() if k.endswith('.weight'))
        skeleton = self._build_static(subnet)
        with skip_meta_init():
            model = adapt_model_from_string(skeleton, model_string)
        model = assign_state(model, state)
        return self._finish_extracted(model, subnet)

    def _build_static(self, subnet: Subnet) -> ResNet:
        kwargs = dict(
            block=self._block_type, layers=tuple(subnet.depths[-4:]), num_classes=self.num_classes,
            in_chans=self.in_chans, global_pool=self.global_pool.pool_type, avg_down=self._avg_down,
            act_layer=self._act_layer, norm_layer=partial(nn.BatchNorm2d, **self._bn_args), drop_rate=self.drop_rate)
        if self._stem.kind == 'residual':
            return build_on_meta(self._ofa_stem_class, stem_residual=subnet.depths[0] == 1, **kwargs)
        if self._stem.kind == 'deep':
            tiered = self._stem.mid_chs[0] != self._stem.mid_chs[1]
            kwargs.update(stem_type='deep_tiered' if tiered else 'deep', stem_width=self._stem.mid_chs[1])
        return build_on_meta(ResNet, **kwargs)

    def _static_state(self, subnet: Subnet) -> Dict[str, torch.Tensor]:
        state: Dict[str, torch.Tensor] = {}

        def add(prefix: str, module: nn.Module, in_channels: int, out_channels: Optional[int] = None) -> None:
            if isinstance(module, ElasticConv2d):
                tensors = module.static_state(in_channels, out_channels=out_channels)
            else:
                tensors = module.static_state(in_channels)
            state.update({f'{prefix}.{k}': v for k, v in tensors.items()})

        widths = self._widths(subnet)
        stem_out = widths[1 if self._stem.mid_chs else 0][0]
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
        for name, i, block, mid, width, active in self._block_plan(subnet):
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

    def active_blocks(self) -> List[nn.Module]:
        """The residual blocks the active subnet runs, in order."""
        return [b for n, d in zip(_LAYERS, self._stage_depths) for b in getattr(self, n)[:d]]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.maxpool(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(nn.Sequential(*self.active_blocks()), x, flatten=False)
        for name, depth in zip(_LAYERS, self._stage_depths):
            for i, block in enumerate(getattr(self, name)):
                if i == depth:
                    break
                x = block(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stem and stage outputs of the active subnet, as ``timm.models.ResNet.forward_intermediates`` returns them."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(5, indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        last = max_index if stop_early else 4
        for idx, (name, depth) in enumerate(zip(_LAYERS[:last], self._stage_depths), start=1):
            for block in getattr(self, name)[:depth]:
                x = block(x)
            if idx in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
    out = {}
    for key, value in state_dict.items():
        m = re.match(r'blocks\.(\d+)\.(.*)$', key)
        mapped = None
        if m:
            n = int(m.group(1))
            stage = next((s for s in range(len(stage_depths)) if n < starts[s + 1]), None)
            rest = map_key(m.group(2), _REF_RESNET_BLOCK_MAP)
            if stage is not None and rest:
                mapped = f'{_LAYERS[stage]}.{n - starts[stage]}.{rest}'
        else:
            mapped = map_key(key, _REF_RESNET_TOP_MAP)
        if mapped is None:
            raise ValueError(f'Reference key {key!r} is not part of an OFA-ResNet checkpoint')
        out[mapped] = value
    return out
