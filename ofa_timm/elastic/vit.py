"""Elastic vision transformer: a timm ``VisionTransformer`` (ViT, DeiT) turned into an OFA supernet, and back into
stock timm models.

The supernet keeps the source model's modules and state-dict keys (and adds ``pos_embed_delta``, below); the layers
that shrink become elastic ones. Its elastic dimensions:

  * ``depths``: the first ``d`` blocks run;
  * ``heads`` per block: the leading heads of q, k and v (the head width is fixed, as in AutoFormer);
  * ``mlp_ratios`` per block: the MLP keeps its leading ``int(embed_dim * r)`` hidden channels, as timm builds a
    ``Block`` of that ratio;
  * ``embed_dim``: the leading channels of the embedding, everywhere (patch embedding, class and register tokens,
    position embedding, every norm, residual branch and layer scale, and the head), each layer norm normalising
    the channels it has (AutoFormer's ``LayerNormSuper``);
  * ``resolution``: multiples of the patch size; the position embedding is resampled to the subnet's grid as timm
    resamples it for another image size (``resample_abs_pos_embed``), plus one of that resolution's own
    (``pos_embed_delta``, zero at conversion; the source's own resolution has none), which the extracted subnet
    folds into its position embedding.

Heads, MLP channels and embedding channels are ranked (OFA's channel sorting) before the stage that first shrinks
them. Subnets come out as stock ``VisionTransformer`` models whose blocks may differ in heads and MLP width (timm's
``Block`` with ``Attention(attn_head_dim=...)``), at the subnet's image size.
"""
import copy
import math
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import LayerScale, Mlp, PatchEmbed, make_divisible, resample_abs_pos_embed
from timm.layers.attention import Attention
from timm.models import VisionTransformer
from timm.models.vision_transformer import Block, global_pool_nlc

from ..space import DEPTHS, Dimension, Subnet, SubnetLike
from ._build import build_on_meta
from .base import BlockSpec, ElasticSupernet, LayerSpec, band_permutation, permute_channels
from .ops import ElasticAttention, ElasticConv2d, ElasticLayerNorm, ElasticLayerScale, ElasticLinear

__all__ = ['ElasticVisionTransformer', 'VIT_MLP_RATIOS', 'VIT_EMBED_RATIOS', 'VIT_HEAD_REDUCTIONS',
           'VIT_DEPTH_REDUCTIONS']

# AutoFormer's choices below the source: MLP ratio {3, 3.5, 4}, a head or two fewer, depth up to 4 blocks fewer, and
# the embedding at 3/4, 7/8 and all of its width.
VIT_MLP_RATIOS: Tuple[float, ...] = (3.0, 3.5, 4.0)
VIT_HEAD_REDUCTIONS: Tuple[int, ...] = (0, 1, 2)
VIT_DEPTH_REDUCTIONS: Tuple[int, ...] = (0, 2, 4)
VIT_EMBED_RATIOS: Tuple[float, ...] = (0.75, 0.875, 1.0)


def _check_source(model: VisionTransformer) -> None:
    """Refuse, naming it, what the elastic transformer cannot shrink or rebuild."""
    if type(model.patch_embed) is not PatchEmbed or model.patch_embed.patch_size[0] != model.patch_embed.patch_size[1]:
        raise ValueError('Vision transformers with another patch embedding than a square timm PatchEmbed are not '
                         'supported')
    if model.attn_pool is not None or model.global_pool not in ('token', 'avg'):
        raise ValueError(f"Global pool {model.global_pool!r} is not supported ('token' or 'avg')")
    if model.patch_embed.dynamic_img_pad or not isinstance(model.patch_drop, nn.Identity):
        raise ValueError('Vision transformers with dynamic image padding or patch dropout are not supported')
    if model.pos_embed is None:
        raise ValueError('Vision transformers without a learned position embedding are not supported')
    for i, block in enumerate(model.blocks):
        where = f'blocks.{i}'
        if type(block) is not Block:
            raise ValueError(f'{where}: {type(block).__name__} blocks are not supported (timm Block only)')
        if type(block.mlp) is not Mlp or not isinstance(block.mlp.norm, nn.Identity):
            raise ValueError(f'{where}: {type(block.mlp).__name__} MLPs (gated, or with a norm) are not supported')
        for name in ('norm1', 'norm2'):
            if not isinstance(getattr(block, name), nn.LayerNorm):
                raise ValueError(f'{where}.{name}: {type(getattr(block, name)).__name__} is not supported (LayerNorm)')
        for name in ('ls1', 'ls2'):
            if not isinstance(getattr(block, name), (nn.Identity, LayerScale)):
                raise ValueError(f'{where}.{name}: {type(getattr(block, name)).__name__} is not supported')
        ElasticAttention.from_static(copy.copy(block.attn))  # raises on what attention cannot shrink


class ElasticVisionTransformer(ElasticSupernet):
    """Elastic supernet over a timm ``VisionTransformer`` (e.g. ``vit_tiny_patch16_224``, ``deit_small_patch16_224``,
    or one built with another depth, patch or image size); extracted subnets are stock ``VisionTransformer`` models.

    The supernet owns (deep copies of) the source model's modules, so its state dict has the source's keys. Its max
    subnet computes exactly the source model.
    """
    source_types = (VisionTransformer,)
    timm_sources = ('vit_tiny_patch16_224', 'vit_small_patch16_224', 'deit_tiny_patch16_224', 'deit_small_patch16_224')
    space_options = ('depth_reductions', 'head_reductions', 'mlp_ratios', 'embed_ratios', 'resolutions')
    single_subnet_options = dict(depth_reductions=(), head_reductions=(), mlp_ratios=(), embed_ratios=())
    feature_cfg = dict(feature_cls='getter')

    def __init__(
            self,
            model: VisionTransformer,
            depth_reductions: Sequence[int] = VIT_DEPTH_REDUCTIONS,
            head_reductions: Sequence[int] = VIT_HEAD_REDUCTIONS,
            mlp_ratios: Sequence[float] = VIT_MLP_RATIOS,
            embed_ratios: Sequence[float] = VIT_EMBED_RATIOS,
            resolutions: Optional[Sequence[int]] = None,
    ):
        """
        Args:
            model: Source timm ``VisionTransformer`` (pretrained or not); it is copied, not modified.
            depth_reductions: The depth choices are the source depth minus each of these (at least 1 block).
            head_reductions: Per block, the head choices are the source's head count minus each of these (at least 1).
            mlp_ratios: Candidate MLP ratios per block; those above the source's are dropped, the source's is kept.
            embed_ratios: Candidate embedding widths, as shares of the source's (rounded to multiples of 8; 1.0 is
                always kept).
            resolutions: Allowed input resolutions, multiples of the patch size (None: from 4/7 of the source's image
                size to all of it, in steps of one patch).

        Raises:
            ValueError: On a block, attention, MLP, norm, pooling or patch embedding the supernet cannot shrink, or a
                resolution that is not a multiple of the patch size.
        """
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise ValueError(f'ElasticVisionTransformer needs a timm VisionTransformer, got {type(model).__name__}')
        _check_source(model)
        model = copy.deepcopy(model)
        self._adopt_source_attributes(model)
        self.drop_rate = model.head_drop.p
        self.in_chans = model.patch_embed.proj.in_channels
        self.embed_dim = model.embed_dim
        self.patch_size = model.patch_embed.patch_size[0]
        self.grid_size = tuple(model.patch_embed.grid_size)
        self.global_pool = model.global_pool
        self.num_prefix_tokens = model.num_prefix_tokens
        self.num_reg_tokens = model.num_reg_tokens
        self.no_embed_class = model.no_embed_class
        self.pool_include_prefix = model.pool_include_prefix
        self.stage_ends = tuple(range(len(model.blocks) + 1))
        self._adopt_modules(model)
        dimensions = self._declare(depth_reductions, head_reductions, mlp_ratios, embed_ratios)
        self._finish_init([self.blocks], [*dimensions, self._resolution_dimension(resolutions)])
        # Every resolution but the source's own adds a position embedding of its own to the source's, resampled (zero
        # at conversion, so the source is unchanged): a subnet at that resolution deploys one embedding of its own
        # grid, and one resampled grid shared by every resolution cannot be what each needs.
        self.pos_embed_delta = nn.ParameterDict({
            str(r): nn.Parameter(torch.zeros_like(self._pos_embed_at(self.embed_dim, self._grid(r))))
            for r in self.space.resolutions if self._grid(r) != self.grid_size})

    # --- construction -------------------------------------------------------------------------------------------
    def _adopt_modules(self, model: VisionTransformer) -> None:
        """Take the source's modules, with the layers that shrink made elastic."""
        self.patch_embed = model.patch_embed
        self.patch_embed.strict_img_size = False  # the supernet takes every resolution of its space
        self.patch_embed.proj = ElasticConv2d.from_static(model.patch_embed.proj)
        self.patch_embed.norm = _elastic_norm(model.patch_embed.norm)
        self.cls_token, self.reg_token, self.pos_embed = model.cls_token, model.reg_token, model.pos_embed
        self.pos_drop, self.patch_drop = model.pos_drop, model.patch_drop
        self.norm_pre = _elastic_norm(model.norm_pre)
        self.blocks = model.blocks
        self._block_args = [_block_args(b) for b in self.blocks]
        for block in self.blocks:
            block.norm1 = ElasticLayerNorm.from_static(block.norm1)
            block.norm2 = ElasticLayerNorm.from_static(block.norm2)
            block.attn = ElasticAttention.from_static(block.attn)
            block.mlp.fc1 = ElasticLinear.from_static(block.mlp.fc1)
            block.mlp.fc2 = ElasticLinear.from_static(block.mlp.fc2)
            for name in ('ls1', 'ls2'):
                if isinstance(getattr(block, name), LayerScale):
                    setattr(block, name, ElasticLayerScale.from_static(getattr(block, name)))
        self.norm, self.fc_norm = _elastic_norm(model.norm), _elastic_norm(model.fc_norm)
        self.head_drop = model.head_drop
        self.head = ElasticLinear.from_static(model.head) if isinstance(model.head, nn.Linear) else model.head
        first = self.blocks[0]
        self._norm_layer = partial(type(first.norm1), eps=first.norm1.eps)
        self._act_layer = type(first.mlp.act)

    def _declare(self, depth_reductions: Sequence[int], head_reductions: Sequence[int], mlp_ratios: Sequence[float],
                 embed_ratios: Sequence[float]) -> List[Dimension]:
        n = len(self.blocks)
        depths = tuple(sorted({n - r for r in depth_reductions if n - r >= 1} | {n}))
        heads, ratios = {}, {}
        for i, args in enumerate(self._block_args):
            h, source = args['num_heads'], args['mlp_ratio']
            heads[(0, i)] = tuple(sorted({h - r for r in head_reductions if h - r >= 1} | {h}))
            ratios[(0, i)] = tuple(sorted({float(r) for r in mlp_ratios if r < source} | {source}))
        embeds = sorted({make_divisible(self.embed_dim * r, 8) for r in embed_ratios if 0 < r < 1} | {self.embed_dim})
        return [
            Dimension.per_stage(DEPTHS, [depths], shrink_order=1, doc='blocks the transformer runs: its first d'),
            Dimension.per_block('heads', heads, shrink_order=2, ranked=True, label='heads',
                                doc='attention heads of a block, the leading ones; each keeps its width'),
            Dimension.per_block('mlp_ratios', ratios, shrink_order=3, integer=False, ranked=True,
                                doc="MLP hidden channels = int(embed_dim * r), the leading ones, as timm's Block"),
            Dimension.network('embed_dim', embeds, shrink_order=4, ranked=True,
                              doc='embedding width: the leading channels of every token, norm and projection'),
        ]

    @property
    def input_resolution(self) -> int:
        """The image size the source model was built for (its patch grid times the patch size)."""
        return self.grid_size[0] * self.patch_size

    def _default_resolutions(self, resolutions: Optional[Sequence[int]]) -> Tuple[int, ...]:
        p, source = self.patch_size, self.input_resolution
        if resolutions:
            bad = [r for r in resolutions if r % p]
            if bad:
                raise ValueError(f'Resolutions {bad} are not multiples of the patch size {p}')
            return tuple(resolutions)
        return tuple(range(p * math.ceil(4 * source / 7 / p), source + 1, p))

    # --- subnets ------------------------------------------------------------------------------------------------
    def set_active(self, subnet: Optional[SubnetLike] = None) -> Subnet:
        subnet = self.resolve(subnet)
        c = subnet.embed_dim
        self.patch_embed.proj.set_active(out_channels=c)
        for block, heads, ratio in zip(self.blocks, subnet.heads, subnet.mlp_ratios):
            block.attn.set_active(heads, c)
            block.mlp.fc1.set_active(int(c * ratio))
            block.mlp.fc2.set_active(c)
        self._stage_depths = [subnet.depths[0]]
        self.active_subnet = subnet
        return subnet

    def _grid(self, resolution: int) -> Tuple[int, int]:
        return resolution // self.patch_size, resolution // self.patch_size

    def _pos_embed_at(self, channels: int, grid: Tuple[int, int]) -> torch.Tensor:
        """The position embedding of ``channels`` leading channels at ``grid``: the source's, resampled, plus the
        grid's own resolution's (``pos_embed_delta``)."""
        pos = self.pos_embed if channels == self.embed_dim else self.pos_embed[..., :channels]
        if tuple(grid) == self.grid_size:
            return pos
        pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self.grid_size),
                                     num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
        own = getattr(self, 'pos_embed_delta', {}).get(str(grid[0] * self.patch_size))  # none while it is built
        return pos if own is None else pos + own[..., :channels]

    # --- extraction ---------------------------------------------------------------------------------------------
    def static_state(self, subnet: Subnet) -> Dict[str, torch.Tensor]:
        c, depth = subnet.embed_dim, subnet.depths[0]
        resolution = self.resolution_of(subnet)
        state = {f'patch_embed.proj.{k}': v for k, v in self.patch_embed.proj.static_state(
            self.in_chans, out_channels=c).items()}
        state.update(_norm_state('patch_embed.norm', self.patch_embed.norm, c))
        with torch.no_grad():
            for name in ('cls_token', 'reg_token'):
                if getattr(self, name) is not None:
                    state[name] = getattr(self, name)[..., :c].detach().clone()
            state['pos_embed'] = self._pos_embed_at(c, self._grid(resolution)).detach().clone()
        state.update(_norm_state('norm_pre', self.norm_pre, c))
        for i, (block, heads, ratio) in enumerate(zip(self.blocks, subnet.heads, subnet.mlp_ratios)):
            if i == depth:
                break
            p = f'blocks.{i}.'
            hidden = int(c * ratio)
            state.update(_norm_state(p + 'norm1', block.norm1, c))
            state.update({f'{p}attn.{k}': v for k, v in block.attn.static_state(c, heads).items()})
            state.update(_norm_state(p + 'norm2', block.norm2, c))
            state.update({f'{p}mlp.fc1.{k}': v for k, v in block.mlp.fc1.static_state(c, hidden).items()})
            state.update({f'{p}mlp.fc2.{k}': v for k, v in block.mlp.fc2.static_state(hidden, c).items()})
            for name in ('ls1', 'ls2'):
                state.update(_norm_state(p + name, getattr(block, name), c))
        state.update(_norm_state('norm', self.norm, c))
        state.update(_norm_state('fc_norm', self.fc_norm, c))
        if isinstance(self.head, ElasticLinear):
            state.update({f'head.{k}': v for k, v in self.head.static_state(c).items()})
        return state

    def build_static(self, subnet: Subnet, state: Mapping[str, torch.Tensor]) -> VisionTransformer:
        c, depth = subnet.embed_dim, subnet.depths[0]
        first = self._block_args[0]
        model = build_on_meta(
            VisionTransformer, img_size=self.resolution_of(subnet), patch_size=self.patch_size, in_chans=self.in_chans,
            num_classes=self.num_classes, global_pool=self.global_pool, embed_dim=c, depth=0,
            num_heads=first['num_heads'], class_token=self.cls_token is not None, reg_tokens=self.num_reg_tokens,
            no_embed_class=self.no_embed_class, pre_norm=not isinstance(self.norm_pre, nn.Identity),
            final_norm=not (isinstance(self.norm, nn.Identity) and isinstance(self.fc_norm, nn.Identity)),
            fc_norm=not isinstance(self.fc_norm, nn.Identity), pool_include_prefix=self.pool_include_prefix,
            embed_norm_layer=None if isinstance(self.patch_embed.norm, nn.Identity) else self._norm_layer,
            drop_rate=self.drop_rate, norm_layer=self._norm_layer, act_layer=self._act_layer)
        blocks = []
        for args, heads, ratio in zip(self._block_args[:depth], subnet.heads, subnet.mlp_ratios):
            flags = args['flags']
            block = build_on_meta(Block, dim=c, num_heads=1, mlp_ratio=ratio, norm_layer=self._norm_layer,
                                  act_layer=self._act_layer, **flags)
            # timm's Block builds its Attention with head width dim / heads; this one keeps the source's
            block.attn = build_on_meta(Attention, c, num_heads=heads, attn_head_dim=args['head_dim'],
                                       qkv_bias=flags['qkv_bias'], qk_norm=flags['qk_norm'],
                                       proj_bias=flags['proj_bias'], norm_layer=self._norm_layer)
            blocks.append(block)
        model.blocks = nn.Sequential(*blocks)
        model.feature_info = [dict(module=f'blocks.{i}', num_chs=c, reduction=self.patch_size) for i in range(depth)]
        return model

    # --- family hooks -------------------------------------------------------------------------------------------
    def conversion_state(self) -> Dict[str, torch.Tensor]:
        """What conversion adds to the source model: each resolution's own position embedding, at zero."""
        return {f'pos_embed_delta.{r}': torch.zeros_like(t) for r, t in self.pos_embed_delta.items()}

    @torch.no_grad()
    def rank(self, dimension: str, trained: int = 1) -> None:
        """Rank heads (by the L1 norm of the ``proj`` columns that read each head), MLP hidden channels (by the L1
        norm of the ``fc2`` columns that read them) or embedding channels (by the L1 norm of every weight that reads
        them), each within the bands of the ``trained`` largest choices."""
        d = self.space[dimension]
        if dimension == 'heads':
            for block, choices in zip(self.blocks, d.choices):
                self._rank_heads(block.attn, list(choices[::-1][:trained]))
        elif dimension == 'mlp_ratios':
            for block, choices in zip(self.blocks, d.choices):
                fc1, fc2 = block.mlp.fc1, block.mlp.fc2
                perm = band_permutation(fc2.weight.abs().sum(0), [int(self.embed_dim * r) for r in
                                                                  choices[::-1][:trained]])
                permute_channels(fc1, perm)
                permute_channels(fc2, perm, dim=1)
        elif dimension == 'embed_dim':
            self._rank_embedding(list(d.choices[0][::-1][:trained]))
        else:
            super().rank(dimension, trained)

    @staticmethod
    def _rank_heads(attn: ElasticAttention, bands: Sequence[int]) -> None:
        h, w = attn.num_heads, attn.head_dim
        importance = attn.proj.weight.abs().sum(0).view(h, w).sum(1)
        order = band_permutation(importance, bands)
        rows = (order[:, None] * w + torch.arange(w)).reshape(-1)  # each head's channels, in the heads' new order
        qkv = torch.cat([rows + part * h * w for part in range(3)])
        permute_channels(attn.qkv, qkv)
        permute_channels(attn.proj, rows, dim=1)

    def _rank_embedding(self, bands: Sequence[int]) -> None:
        readers = [self.blocks[i].attn.qkv.weight for i in range(len(self.blocks))]
        readers += [self.blocks[i].mlp.fc1.weight for i in range(len(self.blocks))]
        if isinstance(self.head, nn.Linear):
            readers.append(self.head.weight)
        perm = band_permutation(sum(w.abs().sum(0) for w in readers), bands)
        permute_channels(self.patch_embed.proj, perm)
        for t in (self.cls_token, self.reg_token, self.pos_embed, *self.pos_embed_delta.values()):
            if t is not None:
                t.data.copy_(t.data.index_select(2, perm))
        for module in (self.patch_embed.norm, self.norm_pre, self.norm, self.fc_norm):
            permute_channels(module, perm)
        for block in self.blocks:
            for module in (block.norm1, block.norm2, block.ls1, block.ls2, block.attn.proj, block.mlp.fc2):
                permute_channels(module, perm)
            permute_channels(block.attn.qkv, perm, dim=1)
            permute_channels(block.mlp.fc1, perm, dim=1)
        if isinstance(self.head, nn.Linear):
            permute_channels(self.head, perm, dim=1)

    def describe(self, subnet: Optional[SubnetLike] = None) -> Tuple[BlockSpec, ...]:
        subnet = self.active_subnet if subnet is None else self.resolve(subnet)
        space = self.space
        c, depth, p = subnet.embed_dim, subnet.depths[0], self.patch_size
        tokens = self.num_prefix_tokens
        embed_gene, depth_gene = space.gene_index('embed_dim'), space.gene_index(DEPTHS, 0)

        def norm(module: nn.Module, width: int = c) -> Tuple[LayerSpec, ...]:
            return () if isinstance(module, nn.Identity) else (LayerSpec('norm', width, width),)

        stem = (LayerSpec('conv', self.in_chans, c, p, p, bias=self.patch_embed.proj.bias is not None),
                *norm(self.patch_embed.norm),
                *((LayerSpec('param', c, c),) if self.cls_token is not None else ()),
                *((LayerSpec('param', c, c * self.num_reg_tokens),) if self.reg_token is not None else ()),
                LayerSpec('embedding', c, c, reduction=p, tokens=0 if self.no_embed_class else tokens),
                *norm(self.norm_pre))
        specs = [BlockSpec('stem', 'stem', self.in_chans, c, c, p, p, 1.0, 1, layers=stem,
                           modules=('patch_embed', 'pos_drop', 'patch_drop', 'norm_pre'), genes=(embed_gene,),
                           fixed_resolution=True)]
        for i, (block, heads, ratio) in enumerate(zip(self.blocks, subnet.heads, subnet.mlp_ratios)):
            if i == depth:
                break
            attn, hidden = block.attn, int(c * ratio)
            inner = heads * attn.head_dim

            def linear(fan_in: int, fan_out: int, module: nn.Module) -> LayerSpec:
                return LayerSpec('linear', fan_in, fan_out, bias=module.bias is not None, reduction=p, tokens=tokens)
            scales = [LayerSpec('param', c, c) for m in (block.ls1, block.ls2) if not isinstance(m, nn.Identity)]
            qk_norms = [*norm(attn.q_norm, attn.head_dim), *norm(attn.k_norm, attn.head_dim)]
            layers = (*norm(block.norm1), linear(c, 3 * inner, attn.qkv), *qk_norms,
                      LayerSpec('attention', inner, inner, reduction=p, tokens=tokens), linear(inner, c, attn.proj),
                      *scales[:1], *norm(block.norm2), linear(c, hidden, block.mlp.fc1),
                      linear(hidden, c, block.mlp.fc2), *scales[1:])
            specs.append(BlockSpec(
                f'blocks.{i}', 'vit', c, c, hidden, heads, 1, ratio, p, act=self._act_layer.__name__, skip=True,
                layers=layers, modules=(f'blocks.{i}',), layout='NLC', tokens=tokens,
                genes=(depth_gene, space.gene_index('heads', i), space.gene_index('mlp_ratios', i), embed_gene)))
        head = (*norm(self.norm), *norm(self.fc_norm))
        if isinstance(self.head, nn.Linear):
            head += (LayerSpec('linear', c, self.num_classes, bias=self.head.bias is not None, reduction=0),)
        specs.append(BlockSpec('head', 'head', c, self.num_classes, c, 1, 1, 1.0, p, layers=head,
                               modules=('norm', 'fc_norm', 'head_drop', 'head'), layout='NLC', tokens=tokens,
                               genes=(embed_gene,)))
        return tuple(specs)

    def default_out_indices(self, subnet: Subnet) -> Any:
        """The last three blocks (as timm's vision transformers give ``features_only``)."""
        return min(3, subnet.depths[0])

    def latency_module(self, model: nn.Module, spec: BlockSpec) -> nn.Module:
        if spec.name == 'stem':
            return _Stem(model)
        if spec.name == 'head':
            return _Head(model)
        # called with the tokens alone, so that an exporter traces the block's own defaults (no mask, not causal)
        return nn.Sequential(*(model.get_submodule(m) for m in spec.modules))

    # --- timm model API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^cls_token|pos_embed|patch_embed|reg_token', blocks=[(r'^blocks\.(\d+)', None),
                                                                               (r'^norm', (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (it reads the leading channels of the active embedding width)."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg'):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        weight = self.pos_embed
        self.head = ElasticLinear(self.embed_dim, num_classes, device=weight.device, dtype=weight.dtype) \
            if num_classes > 0 else nn.Identity()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        grid = self._grid(x.shape[-1])
        x = self.patch_embed(x)
        c = x.shape[-1]
        to_cat = [t[..., :c].expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos = self._pos_embed_at(c, grid)
        if self.no_embed_class:
            x = x + pos
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
            x = x + pos
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))

    def _exit_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Any] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False) -> Any:
        """Block outputs of the active subnet as feature maps (prefix tokens dropped), as timm's
        ``VisionTransformer.forward_intermediates``."""
        from .._timm import feature_take_indices
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = self._stage_depths[0]
        take, max_index = feature_take_indices(depth, indices)
        grid = self._grid(x.shape[-1])
        B = x.shape[0]
        x = self.forward_stem(x)
        out = []
        for i, block in enumerate(self.blocks[:max_index + 1 if stop_early else depth]):
            x = block(x)
            if i in take:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens:]
                out.append(y.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                           if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return out
        return self.norm(x), out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens,
                            reduce_include_prefix=self.pool_include_prefix)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


class _Stem(nn.Module):
    """The embedding of an extracted transformer as one module (what a latency table times for its stem)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


class _Head(nn.Module):
    """The final norm, pooling and classifier of an extracted transformer as one module."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(x))


def _elastic_norm(module: nn.Module) -> nn.Module:
    """An elastic layer norm in place of a ``LayerNorm``; an ``Identity`` stays one."""
    if isinstance(module, nn.Identity):
        return module
    if not isinstance(module, nn.LayerNorm):
        raise ValueError(f'{type(module).__name__} norms are not supported (LayerNorm)')
    return ElasticLayerNorm.from_static(module)


def _norm_state(prefix: str, module: nn.Module, channels: int) -> Dict[str, torch.Tensor]:
    """The static state of an elastic norm or layer scale over ``channels`` (nothing for an ``Identity``)."""
    if isinstance(module, nn.Identity):
        return {}
    return {f'{prefix}.{k}': v for k, v in module.static_state(channels).items()}


def _block_args(block: Block) -> Dict[str, Any]:
    """What rebuilds a source block's kind at another width: its head count and width, MLP ratio, and the flags timm's
    ``Block`` takes."""
    attn = block.attn
    dim = block.norm1.normalized_shape[0]
    return dict(num_heads=attn.num_heads, head_dim=attn.head_dim, mlp_ratio=block.mlp.fc1.out_features / dim,
                flags=dict(qkv_bias=attn.qkv.bias is not None, qk_norm=not isinstance(attn.q_norm, nn.Identity),
                           proj_bias=attn.proj.bias is not None,
                           init_values=1.0 if isinstance(block.ls1, LayerScale) else None))
