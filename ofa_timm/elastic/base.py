"""The family contract: what every elastic supernet provides, and what the families share.

A supernet family (MobileNetV3, ResNet, ViT, ...) is one module in ``ofa_timm.elastic`` with one
:class:`ElasticSupernet` subclass. Training, search, NNI and the timm registry talk to this contract only:

* ``space``: the :class:`~ofa_timm.space.SearchSpace` of the dimensions the family declares (``_finish_init``);
* ``set_active(subnet)`` / ``extract(subnet)``: run a subnet inside the supernet, or build it as a stock timm model
  (the extraction template is here; families provide ``static_state`` and ``build_static``);
* ``rank(dimension, trained)``: rank what a ranked dimension keeps (channels, heads) before the stage that shrinks it;
* ``describe(subnet)``: a :class:`BlockSpec` per block (input shape, channels, tokens and the exact conv / linear /
  norm / attention layers), from which cost models count FLOPs, parameters and latency without building a model;
* ``subnet_from_reference(d)`` / ``convert_reference_state_dict(sd)``: the reference implementation's subnet dicts and
  checkpoints of the family, where it has some;
* ``complete_state(sd)``: a source model's state dict completed with what conversion adds (kernel transforms);
* ``zero_init_residual()``: the family's zero init of residual branches for a run from scratch;
* ``timm_sources``: the timm models the registry converts as ``ofa_<name>``.
"""
import abc
import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import checkpoint_seq

from .._timm import feature_take_indices
from ..space import (
    _REFERENCE_KEYS, OFA_RESOLUTIONS, RESOLUTION, Constraint, Dimension, SearchSpace, Subnet, SubnetLike, read_json)
from ._build import assign_state

__all__ = [
    'ElasticSupernet', 'BlockSpec', 'LayerSpec', 'imagenet_cfg', 'map_key', 'convert_reference_keys',
    'reference_resolution', 'band_permutation', 'input_importance', 'permute_channels',
]


def imagenet_cfg(**overrides: Any) -> Dict[str, Any]:
    """A timm ``pretrained_cfg`` for ImageNet-style models at 224 px, with ``overrides``."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
        'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier', **overrides,
    }


# --- reference checkpoints and subnet dicts --------------------------------------------------------------------------
def map_key(key: str, rules: Sequence[Tuple[str, str]]) -> Optional[str]:
    """Rename ``key`` by the first ``(regex, replacement)`` rule that matches it whole; None if none does."""
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_reference_keys(
        state_dict: Mapping[str, torch.Tensor], convert_key: Callable[[str], Optional[str]], what: str,
) -> Dict[str, torch.Tensor]:
    """Rename every key of a reference checkpoint with ``convert_key``.

    Raises:
        ValueError: On a key ``convert_key`` cannot place (it returns None), naming the key and ``what`` was expected.
    """
    out = {}
    for key, value in state_dict.items():
        mapped = convert_key(key)
        if mapped is None:
            raise ValueError(f'Reference key {key!r} is not part of {what} checkpoint')
        out[mapped] = value
    return out


def reference_resolution(r: Any) -> Optional[int]:
    """The resolution of a reference subnet dict's ``'r'``, written as an int or as a one-element list."""
    if r is None:
        return None
    if isinstance(r, Sequence) and not isinstance(r, (str, bytes)):
        if len(r) != 1:
            raise ValueError(f"Reference subnet key 'r' must hold one resolution, got {list(r)}")
        r = r[0]
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"Reference subnet key 'r' must be an integer, got {r!r}")
    return r


# --- channel sorting -------------------------------------------------------------------------------------------------
def band_permutation(importance: torch.Tensor, boundaries: Sequence[int]) -> torch.Tensor:
    """Indices that sort ``importance`` descending within each band ``[boundaries[i-1], boundaries[i])``."""
    n = importance.shape[0]
    edges = sorted({b for b in boundaries if 0 < b < n} | {n})
    perm, start = [], 0
    for end in edges:
        perm.append(start + torch.argsort(importance[start:end], descending=True, stable=True))
        start = end
    return torch.cat(perm)


def input_importance(consumer_weight: torch.Tensor) -> torch.Tensor:
    """L1 norm per input channel of the conv that reads the channels (OFA's importance)."""
    return consumer_weight.detach().abs().sum(dim=(0, 2, 3))


@torch.no_grad()
def permute_channels(module: nn.Module, perm: torch.Tensor, dim: int = 0) -> None:
    """Reorder ``module``'s weight, bias and running statistics along ``dim`` in place."""
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        t = getattr(module, name, None)
        if t is not None and t.dim() > dim:
            t.data.copy_(t.data.index_select(dim, perm.to(t.device)))


# --- descriptions for cost models ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One layer of an extracted subnet, as cost models count it.

    Args:
        kind: ``'conv'``, ``'linear'``, ``'norm'`` (a batch or layer norm: two parameters per channel, no FLOPs
            counted), ``'attention'`` (the two matmuls of attention over ``in_chs`` = heads x head width channels: no
            parameters), ``'param'`` (``out_chs`` parameters used without FLOPs counted: a class token, a layer
            scale) or ``'embedding'`` (an ``out_chs``-wide parameter per position: a position embedding).
        in_chs: Input channels (features for a linear layer).
        out_chs: Output channels (equal to ``in_chs`` for a norm).
        kernel: Square kernel size.
        stride: Stride.
        groups: Conv groups.
        bias: Whether the layer has a bias.
        reduction: The layer's input is ``ceil(resolution / reduction)`` pixels (or patches) wide; 0 for a pooled 1x1
            input (SE, heads after pooling, linear layers).
        tokens: Positions the layer runs on besides its grid (a class token).
        floor: Sizes round down (``floor(resolution / reduction)``): unpadded strided convs, as a patch embedding or
            ConvNeXt's downsampling; timm's padded convs round up.
    """
    kind: str
    in_chs: int
    out_chs: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    bias: bool = False
    reduction: int = 1
    tokens: int = 0
    floor: bool = False

    def output_size(self, resolution: Any) -> Any:
        """Output width at input ``resolution`` (``ceil(in / stride)`` as timm's padded layers give, or the floor)."""
        if self.reduction == 0:
            return 1
        step = self.reduction * self.stride
        return resolution // step if self.floor else -(-resolution // step)

    def positions(self, resolution: Any) -> Any:
        """Output positions per image: the grid's, plus ``tokens``."""
        size = self.output_size(resolution)
        return size * size + self.tokens

    def params(self, resolution: Any = None) -> Any:
        """Parameters; an ``'embedding'``'s grow with the resolution (numbers or numpy arrays)."""
        if self.kind == 'norm':
            return 2 * self.out_chs
        if self.kind == 'attention':
            return 0
        if self.kind == 'param':
            return self.out_chs
        if self.kind == 'embedding':
            if resolution is None:
                raise ValueError('The parameters of a position embedding depend on the resolution: pass it')
            return self.out_chs * self.positions(resolution)
        weight = self.out_chs * (self.in_chs // self.groups) * self.kernel * self.kernel
        return weight + (self.out_chs if self.bias else 0)

    def flops(self, resolution: Any) -> Any:
        """Multiply-adds x 2 per image, as ``torch.utils.flop_counter`` counts convs and matmuls."""
        if self.kind in ('norm', 'param', 'embedding'):
            return 0
        n = self.positions(resolution)
        if self.kind == 'attention':
            return 4 * n * n * self.in_chs  # q @ k^T and attn @ v
        return 2 * self.out_chs * (self.in_chs // self.groups) * self.kernel * self.kernel * n


@dataclass(frozen=True)
class BlockSpec:
    """One block of a subnet (or its stem, or its head), described without building it.

    Two blocks with equal :attr:`key` compute the same thing on inputs of the same size: a latency table times each
    key once.

    Args:
        name: Name of the block in the extracted model (``'blocks.2.1'``, ``'layer3.0'``, ``'stem'``, ``'head'``).
        kind: Block type (``'ir'``, ``'ds'``, ``'cn'``, ``'bottleneck'``, ``'basic'``, ``'vit'``, ``'stem'``,
            ``'head'``).
        in_chs: Input channels.
        out_chs: Output channels.
        mid_chs: Hidden channels (the expanded width), or ``out_chs``.
        kernel: Spatial kernel size of the block's main conv (for an attention block: its head count).
        stride: Stride of the block.
        expand: Expand ratio (1.0 where there is none).
        reduction: The block's input is ``ceil(resolution / reduction)`` pixels (or patches) wide.
        se: Whether the block has squeeze-excitation.
        act: Activation name.
        skip: Whether the block adds its input to its output.
        layers: The layers of the block, in order.
        modules: Modules of the extracted model that run the block, in order (latency tables time them).
        genes: Positions of ``SearchSpace.genes`` whose choices the description depends on (resolution excluded:
            it only scales spatial sizes). A block that a subnet's depth removes depends on that depth gene.
        layout: ``'NCHW'`` (a feature map) or ``'NLC'`` (a sequence of tokens) input.
        tokens: Tokens of an ``'NLC'`` input besides the grid's (a class token).
        floor: The input is ``floor(resolution / reduction)`` wide (see :class:`LayerSpec`).
        fixed_resolution: The block's module is built for one input size (a position embedding): a latency table times
            it in a model extracted at each resolution.
    """
    name: str
    kind: str
    in_chs: int
    out_chs: int
    mid_chs: int
    kernel: int
    stride: int
    expand: float
    reduction: int
    se: bool = False
    act: str = ''
    skip: bool = False
    layers: Tuple[LayerSpec, ...] = ()
    modules: Tuple[str, ...] = ()
    genes: Tuple[int, ...] = field(default=(), compare=False)
    layout: str = 'NCHW'
    tokens: int = 0
    floor: bool = False
    fixed_resolution: bool = False

    @property
    def key(self) -> Tuple[Any, ...]:
        """What the block computes, position excluded (pair it with the input size)."""
        return (self.kind, self.in_chs, self.out_chs, self.mid_chs, self.kernel, self.stride, self.se, self.act,
                self.skip, self.layers, self.layout, self.tokens)

    def input_size(self, resolution: int) -> int:
        return resolution // self.reduction if self.floor else -(-resolution // self.reduction)

    def input_shape(self, resolution: int, batch_size: int = 1) -> List[int]:
        """The block's input: ``[B, C, s, s]``, or ``[B, s * s + tokens, C]`` for a sequence of tokens."""
        size = self.input_size(resolution)
        if self.layout == 'NLC':
            return [batch_size, size * size + self.tokens, self.in_chs]
        return [batch_size, self.in_chs, size, size]

    def params(self, resolution: Any = None) -> Any:
        return sum(layer.params(resolution) for layer in self.layers)

    def flops(self, resolution: Any) -> Any:
        return sum(layer.flops(resolution) for layer in self.layers)


def conv_layers(
        in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, groups: int = 1, bias: bool = False,
        reduction: int = 1, norm: bool = True,
) -> Tuple[LayerSpec, ...]:
    """A conv (and the batch norm after it) as layer specs."""
    conv = LayerSpec('conv', in_chs, out_chs, kernel, stride, groups, bias, reduction)
    return (conv, LayerSpec('norm', out_chs, out_chs, reduction=reduction * stride)) if norm else (conv,)


# --- the supernet base -----------------------------------------------------------------------------------------------
class ElasticSupernet(nn.Module, metaclass=abc.ABCMeta):
    """Base of the elastic supernets: a :class:`SearchSpace`, an active :class:`Subnet`, timm's model attributes,
    the extraction template and the forward passes over the active blocks.

    Subclasses set ``source_types``, ``space_options`` and ``timm_sources``, call :meth:`_adopt_source_attributes`
    and :meth:`_finish_init` (with the dimensions they declare), and implement the abstract methods.
    """
    #: timm model classes the family converts (``ofa_timm.elasticize`` dispatches on them).
    source_types: ClassVar[Tuple[type, ...]] = ()
    #: timm models the registry converts, each as ``ofa_<name>`` (``import ofa_timm`` registers them).
    timm_sources: ClassVar[Tuple[str, ...]] = ()
    #: Keyword arguments of ``__init__`` that shape the space (the timm registry separates them from model kwargs).
    space_options: ClassVar[Tuple[str, ...]] = ()
    #: The space options that leave the source model as the space's only subnet (besides the resolution).
    single_subnet_options: ClassVar[Dict[str, Any]] = {}
    #: Feature index -> number of stages run before it is taken (0: the stem output).
    stage_ends: Tuple[int, ...]
    #: ``features_only`` on an extracted subnet, as timm's own builder does it: ``timm.models.FeatureListNet``
    #: arguments, or ``feature_cls='getter'`` for a ``FeatureGetterNet`` (the model's ``forward_intermediates``).
    feature_cfg: ClassVar[Dict[str, Any]] = {}

    space: SearchSpace
    active_subnet: Subnet
    in_chans: int
    pretrained_cfg: dict

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this family converts ``model`` (it may still reject details of it with a ValueError)."""
        return isinstance(model, cls.source_types)

    # --- construction -------------------------------------------------------------------------------------------
    def _adopt_source_attributes(self, model: nn.Module) -> None:
        """Take the timm model attributes a supernet shares with its (already copied) source model."""
        self.num_classes = model.num_classes
        self.drop_rate = getattr(model, 'drop_rate', 0.)
        self.num_features = model.num_features
        self.head_hidden_size = model.head_hidden_size
        self.feature_info = copy.deepcopy(model.feature_info)
        self.grad_checkpointing = False
        source_cfg = getattr(model, 'pretrained_cfg', None)
        self.pretrained_cfg = copy.deepcopy(source_cfg) if source_cfg else self._default_cfg(model.num_classes)
        self.default_cfg = self.pretrained_cfg

    @staticmethod
    def _default_cfg(num_classes: int) -> Dict[str, Any]:
        """The ``pretrained_cfg`` of a source model built without one."""
        return imagenet_cfg(num_classes=num_classes)

    def _default_resolutions(self, resolutions: Optional[Sequence[int]]) -> Tuple[int, ...]:
        """An explicit list as given; by default OFA's 128..224 plus the source's own resolution."""
        if resolutions:
            return tuple(resolutions)
        return tuple(sorted(set(OFA_RESOLUTIONS) | {self.input_resolution}))

    def _resolution_dimension(self, resolutions: Optional[Sequence[int]]) -> Dimension:
        """The ``resolution`` dimension of the ``resolutions`` option (see :meth:`_default_resolutions`)."""
        return Dimension.network(RESOLUTION, self._default_resolutions(resolutions), shrink_order=0,
                                 doc='input resolution (pixels)')

    def _finish_init(
            self,
            stages: Sequence[nn.Sequential],
            dimensions: Sequence[Dimension],
            constraints: Sequence[Constraint] = (),
    ) -> None:
        """Build the space of the declared dimensions and activate its max subnet.

        Args:
            stages: Every stage of blocks, in order (elastic or not).
            dimensions: The family's dimensions, in gene order.
            constraints: Relations between them.
        """
        self._stages = list(stages)
        self._stage_depths: List[int] = [len(s) for s in self._stages]
        self.space = SearchSpace(dimensions, constraints)
        self.active_subnet = self.space.max()
        self.set_active(self.active_subnet)

    # --- subnets ------------------------------------------------------------------------------------------------
    def resolve(self, value: Union[str, SubnetLike, None]) -> Subnet:
        """Read a subnet in any form the package accepts and validate it against the space.

        ``None`` or ``'max'``, ``'min'``, a ``Subnet``, a dict (this project's form or the reference
        implementation's form of this family) or the path of a JSON file holding either form.
        """
        if value is None:
            return self.space.max()
        if isinstance(value, (str, bytes)) and value in ('max', 'min'):
            return self.space.resolve(value)
        if isinstance(value, (str, bytes)) or hasattr(value, '__fspath__'):
            return self.space.validate(self._parse_dict(read_json(self.space.resolve_path(value))))
        if isinstance(value, Mapping):
            return self.space.validate(self._parse_dict(value))
        return self.space.validate(value)

    def _parse_dict(self, d: Any) -> Subnet:
        if isinstance(d, Mapping) and d and set(d) <= _REFERENCE_KEYS:
            return self.subnet_from_reference(d)
        return Subnet.from_dict(d)

    def subnet_from_reference(self, d: Mapping[str, Any]) -> Subnet:
        """Read the reference implementation's subnet dict of this family.

        Raises:
            ValueError: If the family has no reference form, or the dict is malformed.
        """
        raise ValueError(f'{type(self).__name__} has no reference subnet form; got keys {sorted(d)}')

    def convert_reference_state_dict(
            self, state_dict: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """This supernet's state dict from a checkpoint of the reference implementation of this family, or None if
        ``state_dict`` is not one (it then is taken as this project's or timm's keys).

        Raises:
            ValueError: On a reference checkpoint with keys this family cannot place.
        """
        return None

    def added_state(self) -> Dict[str, torch.Tensor]:
        """What conversion adds to the source model (kernel transforms, per-resolution position embeddings), by
        state-dict key, at the value conversion gives it (identity, zero): each module's ``conversion_state``."""
        out: Dict[str, torch.Tensor] = {}
        for name, module in self.named_modules():
            added = getattr(module, 'conversion_state', None)
            if callable(added):
                out.update({f'{name}.{key}' if name else key: value for key, value in added().items()})
        return out

    def complete_state(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``state_dict`` (e.g. timm's weights of the source model) with what conversion adds and it lacks
        (:meth:`added_state`), so that it loads into the supernet."""
        out = dict(state_dict)
        for key, value in self.added_state().items():
            out.setdefault(key, value)
        return out

    @property
    def input_resolution(self) -> int:
        """The input size of the model's ``pretrained_cfg`` (the source model's)."""
        return int(self.pretrained_cfg.get('input_size', (3, 224, 224))[-1])

    def resolution_of(self, subnet: Optional[Subnet] = None) -> int:
        """The input resolution of ``subnet`` (default: the active one): its own, or the model's input size."""
        subnet = self.active_subnet if subnet is None else subnet
        return int(subnet.resolution or self.input_resolution)

    @property
    def has_batchnorm(self) -> bool:
        """Whether the supernet has batch norms (whose statistics each subnet recalibrates); ViT and ConvNeXt have
        none."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def default_out_indices(self, subnet: Subnet) -> Any:
        """The feature maps ``features_only`` gives by default for ``subnet``: the stem's and every stage's."""
        return tuple(range(len(self.stage_ends)))

    def zero_init_residual(self) -> int:
        """Zero the last norm scale of every residual branch, so each block starts as the identity (BigNAS; timm's
        ResNets' ``zero_init_last``); a run from scratch calls it. Returns the blocks initialised (0: the family
        starts its blocks otherwise, e.g. with a small layer scale)."""
        return 0

    def sample_active(self, seed: Any = None) -> Subnet:
        """Activate a random subnet of the space (see ``SearchSpace.sample``) and return it."""
        return self.set_active(self.space.sample(seed))

    @abc.abstractmethod
    def set_active(self, subnet: Optional[SubnetLike] = None) -> Subnet:
        """Make ``subnet`` (default: the max subnet; any form :meth:`resolve` reads) the one ``forward`` computes.
        Returns it validated."""

    # --- extraction ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, subnet: Optional[SubnetLike] = None) -> nn.Module:
        """Build a stock timm model carrying ``subnet``'s weights (default: the active subnet).

        The model is built on the meta device (no random init), filled with the subnet's tensors, independent of the
        supernet (no shared storage), in the supernet's train/eval mode, and its ``pretrained_cfg['input_size']``
        carries the subnet's resolution. ``extract`` does not change the active subnet.
        """
        subnet = self.active_subnet if subnet is None else self.resolve(subnet)
        state = self.static_state(subnet)
        model = assign_state(self.build_static(subnet, state), state)
        return self._finish_extracted(model, subnet)

    @abc.abstractmethod
    def static_state(self, subnet: Subnet) -> Dict[str, torch.Tensor]:
        """The state dict of ``subnet``'s stock timm model (fresh tensors, no storage shared with the supernet)."""

    @abc.abstractmethod
    def build_static(self, subnet: Subnet, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """``subnet``'s stock timm model on the meta device, shaped to take ``state``."""

    def _finish_extracted(self, model: nn.Module, subnet: Subnet) -> nn.Module:
        """Give an extracted model the supernet's train/eval mode and a ``pretrained_cfg`` with the subnet's
        resolution as ``input_size``."""
        model.train(self.training)
        cfg = copy.deepcopy(self.pretrained_cfg)
        if subnet.resolution is not None:
            cfg['input_size'] = (self.in_chans, subnet.resolution, subnet.resolution)
        model.pretrained_cfg = model.default_cfg = cfg
        return model

    # --- family hooks for training and search -------------------------------------------------------------------
    def rank(self, dimension: str, trained: int = 1) -> None:
        """Rank what the ranked ``dimension`` keeps (channels, heads) by importance, keeping each within the band of
        the ``trained`` largest choices it belongs to, without changing the function of any subnet whose value of
        ``dimension`` is one of those choices.

        Raises:
            ValueError: If the family does not rank ``dimension``.
        """
        raise ValueError(f'{type(self).__name__} does not rank {dimension!r}')

    def latency_module(self, model: nn.Module, spec: BlockSpec) -> nn.Module:
        """What a latency table times for block ``spec`` of the extracted ``model``: its modules in sequence."""
        modules = [model.get_submodule(m) for m in spec.modules]
        return modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    @abc.abstractmethod
    def describe(self, subnet: Optional[SubnetLike] = None) -> Tuple[BlockSpec, ...]:
        """The stem, every active block and the head of ``subnet`` (default: the active one), in order."""

    # --- timm model API -----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def active_blocks(self) -> List[nn.Module]:
        """The blocks the active subnet runs, in order."""
        return [b for stage, d in zip(self._stages, self._stage_depths) for b in stage[:d]]

    @abc.abstractmethod
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem, up to the first feature map (feature index 0)."""

    def _enter_stages(self, x: torch.Tensor) -> torch.Tensor:
        """What runs between the stem's feature map and the first stage (e.g. a ResNet's max pool)."""
        return x

    def _before_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """What runs before the blocks of stage ``index`` (e.g. ConvNeXt's downsampling)."""
        return x

    def _exit_stages(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward_features`` runs after the last stage."""
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._enter_stages(self.forward_stem(x))
        for index, (stage, depth) in enumerate(zip(self._stages, self._stage_depths)):
            x = self._before_stage(index, x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage[:depth], x, flatten=False)
                continue
            for i, block in enumerate(stage):
                if i == depth:
                    break
                x = block(x)
        return self._exit_stages(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Feature maps of the active subnet at the stem and stage ends, as timm's ``forward_intermediates``."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take = {self.stage_ends[i] for i in take_indices}
        last = self.stage_ends[max_index] if stop_early else len(self._stages)
        intermediates = []
        x = self.forward_stem(x)
        if 0 in take:
            intermediates.append(x)
        x = self._enter_stages(x)
        for idx, (stage, depth) in enumerate(zip(self._stages, self._stage_depths), start=1):
            if idx > last:
                break
            x = self._before_stage(idx - 1, x)
            for block in stage[:depth]:
                x = block(x)
            if idx in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return self._exit_stages(x) if last == len(self._stages) else x, intermediates

    @abc.abstractmethod
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, head layers and classifier of timm's model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
