"""Elastic ConvNeXt: a timm ``ConvNeXt`` turned into an OFA supernet, and back into stock timm models.

The supernet keeps the source model's modules and state-dict keys. Its elastic dimensions:

  * ``depths``: each stage runs its first ``d`` blocks;
  * ``kernels`` per block: the depthwise conv's kernel (7 / 5 / 3 under the source's), a smaller kernel being the
    centre of the next larger one through OFA's learned transform;
  * ``mlp_ratios`` per block: the MLP keeps its leading ``int(channels * r)`` hidden channels, as timm builds a
    ``ConvNeXtBlock`` of that ratio, ranked by importance before the stage that first shrinks them;
  * ``resolution``.

Stage widths stay the source's, so the stem, the downsampling layers, every block's norm and layer scale and the
head are the source's own. ConvNeXt has no batch norm: subnets need no BN recalibration. Subnets come out as stock
``ConvNeXt`` models whose blocks may differ in kernel and MLP width.
"""
import copy
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp, NormMlpClassifierHead
from timm.models import ConvNeXt
from timm.models.convnext import ConvNeXtBlock

from ..space import DEPTHS, Dimension, Subnet, SubnetLike
from ._build import build_on_meta
from .base import BlockSpec, ElasticSupernet, LayerSpec, band_permutation, permute_channels
from .efficientnet_builder import OFA_KERNELS
from .ops import ElasticConv2d, ElasticLinear

__all__ = ['ElasticConvNeXt', 'CONVNEXT_MLP_RATIOS', 'CONVNEXT_DEPTH_REDUCTIONS']

CONVNEXT_MLP_RATIOS: Tuple[float, ...] = (2.0, 3.0, 4.0)
CONVNEXT_DEPTH_REDUCTIONS: Tuple[int, ...] = (0, 1, 2)
_STAGES = 4


def _check_source(model: ConvNeXt) -> None:
    """Refuse, naming it, what the elastic ConvNeXt cannot shrink or rebuild."""
    stem = model.stem
    if len(stem) != 2 or type(stem[0]) is not nn.Conv2d or stem[0].kernel_size != stem[0].stride:
        raise ValueError('ConvNeXts with an overlapping stem are not supported (patch stems only)')
    for s, stage in enumerate(model.stages):
        ds = stage.downsample
        if not isinstance(ds, nn.Identity) and not (len(ds) == 2 and type(ds[1]) is nn.Conv2d
                                                    and ds[1].dilation == (1, 1)):
            raise ValueError(f'stages.{s}: dilated downsampling (output_stride < 32) is not supported')
        for i, block in enumerate(stage.blocks):
            where = f'stages.{s}.blocks.{i}'
            if type(block) is not ConvNeXtBlock or not isinstance(block.shortcut, nn.Identity):
                raise ValueError(f'{where}: {type(block).__name__} blocks with a projected shortcut are not supported')
            if type(block.mlp) is not Mlp or not isinstance(block.mlp.norm, nn.Identity):
                raise ValueError(f'{where}: {type(block.mlp).__name__} MLPs (ConvNeXt-V2 GRN) are not supported')
            if block.conv_dw.dilation != (1, 1):
                raise ValueError(f'{where}: dilated depthwise convs are not supported')


class ElasticConvNeXt(ElasticSupernet):
    """Elastic supernet over a timm ``ConvNeXt`` (e.g. ``convnext_atto`` ... ``convnext_tiny``); extracted subnets
    are stock ``ConvNeXt`` models.

    The supernet owns (deep copies of) the source model's modules, so its state dict has the source's keys plus the
    kernel transforms. Its max subnet computes exactly the source model.
    """
    source_types = (ConvNeXt,)
    timm_sources = ('convnext_atto', 'convnext_femto', 'convnext_pico', 'convnext_nano', 'convnext_tiny')
    space_options = ('kernels', 'mlp_ratios', 'depth_reductions', 'resolutions')
    single_subnet_options = dict(kernels=(), mlp_ratios=(), depth_reductions=())
    stage_ends = (1, 2, 3, 4)
    feature_cfg = dict(flatten_sequential=True)  # as timm builds ConvNeXt's features

    def __init__(
            self,
            model: ConvNeXt,
            kernels: Sequence[int] = OFA_KERNELS,
            mlp_ratios: Sequence[float] = CONVNEXT_MLP_RATIOS,
            depth_reductions: Sequence[int] = CONVNEXT_DEPTH_REDUCTIONS,
            resolutions: Optional[Sequence[int]] = None,
    ):
        """
        Args:
            model: Source timm ``ConvNeXt`` (pretrained or not); it is copied, not modified.
            kernels: Candidate depthwise kernel sizes (odd); those above a block's are dropped, its own is kept.
            mlp_ratios: Candidate MLP ratios per block; those above the source's are dropped, the source's is kept.
            depth_reductions: Per stage, the depth choices are the source depth minus each of these (at least 1).
            resolutions: Allowed input resolutions (None: OFA's 128..224 in steps of 4 plus the source's own).

        Raises:
            ValueError: On a stem, block, MLP or downsampling the supernet cannot shrink or rebuild.
        """
        super().__init__()
        if not isinstance(model, ConvNeXt):
            raise ValueError(f'ElasticConvNeXt needs a timm ConvNeXt, got {type(model).__name__}')
        _check_source(model)
        model = copy.deepcopy(model)
        self._adopt_source_attributes(model)
        self.in_chans = model.stem[0].in_channels
        self.stem, self.stages, self.norm_pre, self.head = model.stem, model.stages, model.norm_pre, model.head
        first = self.stages[0].blocks[0]
        self._conv_mlp = first.use_conv_mlp
        self._block_norm = partial(type(first.norm), eps=first.norm.eps)
        self._act_layer = type(first.mlp.act)
        dimensions = self._make_blocks_elastic(kernels, mlp_ratios, depth_reductions)
        self._finish_init([stage.blocks for stage in self.stages],
                          [*dimensions, self._resolution_dimension(resolutions)])

    # --- construction -------------------------------------------------------------------------------------------
    def _default_resolutions(self, resolutions: Optional[Sequence[int]]) -> Tuple[int, ...]:
        chosen = super()._default_resolutions(resolutions)
        # unpadded strided convs: a smaller input leaves a stage without a pixel
        stride = self.stem[0].stride[0] * 2 ** sum(not isinstance(s.downsample, nn.Identity) for s in self.stages)
        small = [r for r in chosen if r < stride]
        if small:
            raise ValueError(f'Resolutions {small} are below {stride}, the stride of the whole network: its last stage '
                             f'would have no pixel left')
        return chosen

    def _make_blocks_elastic(self, kernels: Sequence[int], mlp_ratios: Sequence[float],
                             depth_reductions: Sequence[int]) -> List[Dimension]:
        depths, kernel_slots, ratio_slots = [], {}, {}
        for s, stage in enumerate(self.stages):
            n = len(stage.blocks)
            depths.append(tuple(sorted({n - r for r in depth_reductions if n - r >= 1} | {n})))
            for i, block in enumerate(stage.blocks):
                k = block.conv_dw.kernel_size[0]
                channels = block.conv_dw.in_channels
                source = _hidden(block) / channels
                kernel_slots[(s, i)] = tuple(sorted({int(c) for c in kernels if c < k} | {k}))
                ratio_slots[(s, i)] = tuple(sorted({float(r) for r in mlp_ratios if r < source} | {source}))
                block.conv_dw = ElasticConv2d.from_static(block.conv_dw, kernel_slots[(s, i)])
                make = ElasticConv2d.from_static if self._conv_mlp else ElasticLinear.from_static
                block.mlp.fc1, block.mlp.fc2 = make(block.mlp.fc1), make(block.mlp.fc2)
        return [
            Dimension.per_stage(DEPTHS, depths, shrink_order=2, doc='blocks each stage runs: its first d'),
            Dimension.per_block('kernels', kernel_slots, shrink_order=1, phases=1,
                                doc='depthwise kernel size; a smaller kernel is the centre of the next larger one '
                                    'through a learned transform'),
            Dimension.per_block('mlp_ratios', ratio_slots, shrink_order=3, integer=False, ranked=True,
                                doc="MLP hidden channels = int(channels * r), the leading ones, as timm's block"),
        ]

    def _blocks(self, subnet: Subnet):
        """Yield (stage, block index, block, kernel, hidden channels, active) for every block slot."""
        slot = 0
        for s, stage in enumerate(self.stages):
            for i, block in enumerate(stage.blocks):
                channels = block.conv_dw.in_channels
                yield (s, i, block, subnet.kernels[slot], int(channels * subnet.mlp_ratios[slot]),
                       i < subnet.depths[s])
                slot += 1

    # --- subnets ------------------------------------------------------------------------------------------------
    def set_active(self, subnet: Optional[SubnetLike] = None) -> Subnet:
        subnet = self.resolve(subnet)
        for _, _, block, kernel, hidden, _ in self._blocks(subnet):
            block.conv_dw.set_active(kernel_size=kernel)
            fc1 = block.mlp.fc1
            if self._conv_mlp:
                fc1.set_active(out_channels=hidden)
            else:
                fc1.set_active(hidden)
        self._stage_depths = list(subnet.depths)
        self.active_subnet = subnet
        return subnet

    # --- extraction ---------------------------------------------------------------------------------------------
    def static_state(self, subnet: Subnet) -> Dict[str, torch.Tensor]:
        def clone(prefix: str, module: nn.Module) -> Dict[str, torch.Tensor]:
            return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}

        state = clone('stem.', self.stem)
        for s, stage in enumerate(self.stages):
            state.update(clone(f'stages.{s}.downsample.', stage.downsample))
        for s, i, block, kernel, hidden, active in self._blocks(subnet):
            if not active:
                continue
            p = f'stages.{s}.blocks.{i}.'
            channels = block.conv_dw.in_channels
            parts = {
                'conv_dw': block.conv_dw.static_state(channels, kernel_size=kernel),
                'norm': block.norm.state_dict(),
                'mlp.fc1': (block.mlp.fc1.static_state(channels, out_channels=hidden) if self._conv_mlp
                            else block.mlp.fc1.static_state(channels, hidden)),
                'mlp.fc2': (block.mlp.fc2.static_state(hidden, out_channels=channels) if self._conv_mlp
                            else block.mlp.fc2.static_state(hidden, channels)),
            }
            for name, tensors in parts.items():
                state.update({f'{p}{name}.{k}': v.detach().clone() for k, v in tensors.items()})
            if block.gamma is not None:
                state[p + 'gamma'] = block.gamma.detach().clone()
        state.update(clone('norm_pre.', self.norm_pre))
        state.update(clone('head.', self.head))
        return state

    def build_static(self, subnet: Subnet, state: Mapping[str, torch.Tensor]) -> ConvNeXt:
        dims = tuple(stage.blocks[0].conv_dw.in_channels for stage in self.stages)
        first = self.stages[0].blocks[0]
        args = dict(conv_mlp=self._conv_mlp, conv_bias=first.conv_dw.bias is not None,
                    ls_init_value=1.0 if first.gamma is not None else None, act_layer=self._act_layer)
        head_hidden = self.head.pre_logits.fc.out_features if isinstance(self.head, NormMlpClassifierHead) and \
            not isinstance(self.head.pre_logits, nn.Identity) else None
        model = build_on_meta(
            ConvNeXt, in_chans=self.in_chans, num_classes=self.num_classes, global_pool=self._global_pool(),
            depths=(1,) * _STAGES, dims=dims, patch_size=self.stem[0].kernel_size[0],
            head_norm_first=not isinstance(self.norm_pre, nn.Identity), head_hidden_size=head_hidden,
            norm_eps=first.norm.eps, drop_rate=self.drop_rate, **args)
        for s, stage in enumerate(model.stages):
            stage.blocks = nn.Sequential(*[build_on_meta(
                ConvNeXtBlock, in_chs=dims[s], kernel_size=kernel, mlp_ratio=hidden / dims[s],
                norm_layer=self._block_norm, **args)
                for ss, _, _, kernel, hidden, active in self._blocks(subnet) if ss == s and active])
        return model

    def _global_pool(self) -> str:
        pool = self.head.global_pool
        return pool.pool_type if hasattr(pool, 'pool_type') else 'avg'

    # --- family hooks -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rank(self, dimension: str, trained: int = 1) -> None:
        """Sort every block's MLP hidden channels (``'mlp_ratios'``) by the L1 norm of the ``fc2`` weights that read
        them, within the bands of the ``trained`` largest ratios."""
        if dimension != 'mlp_ratios':
            return super().rank(dimension, trained)
        choices = self.space['mlp_ratios'].choices
        for (_, _, block, _, _, _), ratios in zip(self._blocks(self.space.max()), choices):
            channels = block.conv_dw.in_channels
            fc1, fc2 = block.mlp.fc1, block.mlp.fc2
            weight = fc2.weight.reshape(fc2.weight.shape[0], fc2.weight.shape[1])
            perm = band_permutation(weight.abs().sum(0), [int(channels * r) for r in ratios[::-1][:trained]])
            permute_channels(fc1, perm)
            permute_channels(fc2, perm, dim=1)

    def describe(self, subnet: Optional[SubnetLike] = None) -> Tuple[BlockSpec, ...]:
        subnet = self.active_subnet if subnet is None else self.resolve(subnet)
        space = self.space
        conv, p = self.stem[0], self.stem[0].kernel_size[0]
        c0 = conv.out_channels
        specs = [BlockSpec('stem', 'stem', self.in_chans, c0, c0, p, p, 1.0, 1, layers=(
            LayerSpec('conv', self.in_chans, c0, p, p, bias=conv.bias is not None, floor=True),
            LayerSpec('norm', c0, c0)), modules=('stem',), floor=True)]
        reduction = p
        for s, i, block, kernel, hidden, active in self._blocks(subnet):
            if i == 0 and not isinstance(self.stages[s].downsample, nn.Identity):
                down = self.stages[s].downsample[1]
                c_in = down.in_channels
                specs.append(BlockSpec(
                    f'stages.{s}.downsample', 'downsample', c_in, down.out_channels, down.out_channels, 2, 2, 1.0,
                    reduction, layers=(LayerSpec('norm', c_in, c_in), LayerSpec(
                        'conv', c_in, down.out_channels, 2, 2, bias=down.bias is not None, reduction=reduction,
                        floor=True)), modules=(f'stages.{s}.downsample',), floor=True))
                reduction *= 2
            if not active:
                continue
            c = block.conv_dw.in_channels
            slot = self._slot(s, i)
            mlp = ((LayerSpec('conv', c, hidden, bias=True, reduction=reduction, floor=True),
                    LayerSpec('conv', hidden, c, bias=True, reduction=reduction, floor=True)) if self._conv_mlp else
                   (LayerSpec('linear', c, hidden, bias=True, reduction=reduction, floor=True),
                    LayerSpec('linear', hidden, c, bias=True, reduction=reduction, floor=True)))
            scale = (LayerSpec('param', c, c),) if block.gamma is not None else ()
            specs.append(BlockSpec(
                f'stages.{s}.blocks.{i}', 'convnext', c, c, hidden, kernel, 1, hidden / c, reduction,
                act=self._act_layer.__name__, skip=True, floor=True,
                layers=(LayerSpec('conv', c, c, kernel, 1, c, bias=block.conv_dw.bias is not None, reduction=reduction,
                                  floor=True), LayerSpec('norm', c, c), *mlp, *scale),
                modules=(f'stages.{s}.blocks.{i}',), genes=(space.gene_index(DEPTHS, s),
                                                           space.gene_index('kernels', slot),
                                                           space.gene_index('mlp_ratios', slot))))
        c = self.num_features
        head = () if isinstance(self.norm_pre, nn.Identity) else (LayerSpec('norm', c, c),)
        norm = getattr(self.head, 'norm', nn.Identity())
        head += () if isinstance(norm, nn.Identity) else (LayerSpec('norm', c, c),)
        pre = getattr(self.head, 'pre_logits', nn.Identity())
        if not isinstance(pre, nn.Identity):
            head += (LayerSpec('linear', c, pre.fc.out_features, bias=pre.fc.bias is not None, reduction=0),)
            c = pre.fc.out_features
        if isinstance(self.head.fc, nn.Linear):
            head += (LayerSpec('linear', c, self.num_classes, bias=self.head.fc.bias is not None, reduction=0),)
        specs.append(BlockSpec('head', 'head', self.num_features, self.num_classes, c, 1, 1, 1.0, reduction,
                               layers=head, modules=('norm_pre', 'head'), floor=True))
        return tuple(specs)

    def _slot(self, stage: int, block: int) -> int:
        """The position of block ``block`` of stage ``stage`` in the block-scoped dimensions."""
        return sum(len(s.blocks) for s in self.stages[:stage]) + block

    # --- timm model API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)), (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            (r'^norm_pre', (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _before_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.stages[index].downsample(x)

    def _exit_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)


def _hidden(block: ConvNeXtBlock) -> int:
    fc1 = block.mlp.fc1
    return fc1.out_channels if isinstance(fc1, nn.Conv2d) else fc1.out_features
