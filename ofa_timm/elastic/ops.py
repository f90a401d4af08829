"""Elastic layers: static PyTorch / timm layers whose active size can shrink.

Each elastic layer is built *from* a static layer (``from_static``), reuses its parameters under the same names (so
state dicts keep timm's keys) and turns *back into* a static layer for the active setting (``to_static``), or hands
out just the tensors of that static layer (``static_state``) for fast whole-model extraction.

Conventions, shared by every layer here:
  * Input channels are read from the input tensor, so a layer follows whatever its predecessor produced.
  * Output sizes and kernel sizes are set explicitly (``active_out_channels``, ``active_kernel_size``) by the
    supernet's ``set_active``; ``forward`` never writes them.
  * Width shrinking keeps leading channels (a prefix slice), as in OFA.
  * When the active setting is the full layer, the parameters are used as they are, so the max subnet costs the
    same as the source model.
  * In training, a weight's leading block is taken through :func:`prefix_slice`, whose backward adds the gradient
    straight into that block of ``.grad`` instead of building a full-size gradient per subnet, so a step over several
    subnets costs what their static models cost.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Type, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, get_padding, make_divisible

from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask

from .._timm import SqueezeExcite

__all__ = [
    'ElasticConv2d', 'ElasticBatchNorm2d', 'ElasticBatchNormAct2d', 'ElasticLinear', 'ElasticLayerNorm',
    'ElasticLayerScale', 'ElasticAttention', 'ElasticSqueezeExcite', 'is_elastic', 'prefix_slice',
]

M = TypeVar('M', bound=nn.Module)


def _adopt(new: M, old: nn.Module) -> M:
    """Move the parameters, buffers and children of ``old`` into ``new`` (built on the meta device)."""
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in old.named_buffers(recurse=False):
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    for name, child in old.named_children():
        setattr(new, name, child)
    new.train(old.training)
    return new


def _detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Extraction must not share storage with the supernet: an exported model is trained on its own.
    return None if t is None else t.detach().clone(memory_format=torch.contiguous_format)


def _engine_writes_grad(node: Any) -> Optional[bool]:
    """Whether the running backward pass will accumulate into the ``.grad`` of the leaf behind ``node``.

    True for ``Tensor.backward()`` (and ``backward(inputs=...)`` naming the leaf), False for ``backward(inputs=...)``
    that leaves it out, None when gradients are returned instead (``torch.autograd.grad``) or cannot be told apart.
    """
    try:
        return torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # RuntimeError: torch.autograd.grad() running on a leaf
        return None


class _PrefixSlice(torch.autograd.Function):
    """A leading block of a parameter, whose gradient goes straight into the same block of the parameter's ``.grad``.

    Autograd's backward of ``weight[:o, :i]`` allocates a zero gradient of the full weight, copies the block into it,
    and ``AccumulateGrad`` then adds that full tensor into ``.grad``: three passes over the whole weight per subnet.
    Here the block's gradient is added where it belongs and ``None`` goes on to ``AccumulateGrad``, whose hooks still
    run (DDP's reducer reads ``.grad`` when they do). Gradients are the same values as plain slicing; ``.grad`` is
    zero outside every block of the step. ``torch.autograd.grad`` and double backward get autograd's full-size
    gradient instead, as plain slicing gives.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, index: Tuple[slice, ...]) -> torch.Tensor:
        ctx.weight = weight  # a leaf parameter: no reference cycle, and no version check on the values
        ctx.index = index
        block = weight[index]
        if weight.dim() != 4 or block.is_contiguous() or block.is_contiguous(memory_format=torch.channels_last):
            return block  # matmuls take strided operands as they are
        # A strided conv weight: one dense copy in the layout its strides suggest, the copy the conv would otherwise
        # make itself, in its forward and again in its backward (and with that layout, the same conv algorithm).
        return block.clone(memory_format=torch.preserve_format)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        weight, index = ctx.weight, ctx.index
        node = ctx.next_functions[0][0]
        writes = None
        if isinstance(node, torch._C._functions.AccumulateGrad) and not torch.is_grad_enabled():
            writes = _engine_writes_grad(node)
        if writes is None:
            full = grad.new_zeros(weight.shape)
            full[index] = grad
            return full, None
        if writes:
            if weight.grad is None:
                weight_grad = torch.zeros_like(weight, memory_format=torch.preserve_format)
                weight_grad[index] = grad
                weight.grad = weight_grad
            else:
                weight.grad[index] += grad
        return None, None


# Below this many elements autograd's full-size passes over a weight cost less than the Python of a custom autograd
# function (about 15 us a call, forward and backward); measured on CPU, the two break even near 150k elements.
_DIRECT_GRAD_MIN_NUMEL = 1 << 17


def prefix_slice(weight: torch.Tensor, *sizes: Optional[int]) -> torch.Tensor:
    """``weight[:sizes[0], :sizes[1], ...]`` (None keeps a dim whole), for use in a forward pass.

    With autograd recording and ``weight`` a large parameter that requires grad, the block comes back dense and its
    gradient is accumulated in place into the block of ``weight.grad`` (see :class:`_PrefixSlice`). Otherwise it is
    the plain view.
    """
    index = tuple(slice(None) if s is None else slice(0, s) for s in sizes)
    if weight.numel() < _DIRECT_GRAD_MIN_NUMEL or not (
            torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf) or torch.compiler.is_compiling():
        return weight[index]
    return _PrefixSlice.apply(weight, index)


class ElasticConv2d(nn.Conv2d):
    """A dense or depthwise ``nn.Conv2d`` with elastic channels and, for depthwise convs, elastic kernel size.

    Dense convs slice the leading ``active_out_channels`` filters and the leading input channels of the input.
    Depthwise convs follow their input's channel count. A smaller depthwise kernel is the centre of the next larger
    one passed through a learned ``k² x k²`` transform (OFA's kernel transformation), applied from the largest kernel
    down: 7 -> 5 -> 3. The transforms are initialised to identity, so at first a small kernel is the plain centre
    crop.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            stride: int = 1,
            dilation: int = 1,
            groups: int = 1,
            bias: bool = True,
            kernel_sizes: Optional[Sequence[int]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            in_channels: Maximum input channels.
            out_channels: Maximum output channels.
            kernel_size: Maximum (square) kernel size; odd where it shrinks.
            stride: Convolution stride.
            dilation: Convolution dilation.
            groups: 1 (dense) or ``in_channels`` (depthwise).
            bias: Whether the conv has a bias.
            kernel_sizes: Allowed kernel sizes, depthwise only; defaults to ``(kernel_size,)``.
        """
        if groups not in (1, in_channels) or (groups > 1 and in_channels != out_channels):
            raise ValueError(
                f'ElasticConv2d supports dense (groups=1) or depthwise (groups=in=out) convs, '
                f'got in={in_channels}, out={out_channels}, groups={groups}')
        kernel_sizes = tuple(sorted(set(kernel_sizes or (kernel_size,))))
        # A kernel that shrinks keeps its centre: it is odd. A fixed one may be even (a patch embedding's).
        if kernel_sizes[-1] != kernel_size or any(k < 1 for k in kernel_sizes) or len(kernel_sizes) > 1 and any(
                k % 2 == 0 for k in kernel_sizes):
            raise ValueError(
                f'kernel_sizes {list(kernel_sizes)} must be odd and top out at the kernel size {kernel_size}')
        if len(kernel_sizes) > 1 and groups == 1:
            raise ValueError('Elastic kernel sizes are only supported for depthwise convs')
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride,
            padding=get_padding(kernel_size, stride, dilation), dilation=dilation, groups=groups, bias=bias,
            device=device, dtype=dtype)
        self.kernel_sizes = kernel_sizes
        self.depthwise = groups > 1
        self.active_out_channels: Optional[int] = None
        self.active_kernel_size: int = kernel_size
        self._inference_cache: Optional[Tuple[Tuple[Any, ...], torch.Tensor]] = None
        self._transform_names: Tuple[str, ...] = tuple(
            self.transform_name(big, small) for big, small in zip(kernel_sizes[::-1], kernel_sizes[-2::-1]))
        for name in self._transform_names:
            small = int(name.rsplit('to', 1)[1])
            self.register_parameter(name, nn.Parameter(torch.eye(small * small, device=device, dtype=dtype)))

    def conversion_state(self) -> Dict[str, torch.Tensor]:
        """What conversion adds to a source conv, at the value it starts from: identity kernel transforms."""
        return {name: torch.eye(getattr(self, name).shape[0], dtype=self.weight.dtype)
                for name in self._transform_names}

    @staticmethod
    def transform_name(big: int, small: int) -> str:
        """Parameter name of the ``big -> small`` kernel transform matrix."""
        return f'kernel_transform_{big}to{small}'

    @classmethod
    def from_static(cls, conv: nn.Conv2d, kernel_sizes: Optional[Sequence[int]] = None) -> 'ElasticConv2d':
        """Build an elastic conv that reuses ``conv``'s parameters.

        Args:
            conv: A dense or depthwise conv with timm's symmetric padding.
            kernel_sizes: Allowed kernel sizes (depthwise only). A maximum above the conv's kernel grows the kernel by
                zero padding, which leaves the function unchanged.
        """
        k = conv.kernel_size[0]
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1] \
                or conv.dilation[0] != conv.dilation[1]:
            raise ValueError(f'ElasticConv2d needs square kernels, strides and dilations, got {conv}')
        expected_padding = (get_padding(k, conv.stride[0], conv.dilation[0]),) * 2
        # A kernel that shrinks pads as timm pads a conv of that size; a fixed one keeps its own static padding (a
        # patch embedding's 0).
        fixed = not kernel_sizes or len(set(kernel_sizes)) == 1
        symmetric = isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
        if type(conv) is not nn.Conv2d or conv.padding_mode != 'zeros' or not (
                conv.padding == expected_padding or fixed and symmetric):
            raise ValueError(
                f"ElasticConv2d needs a plain nn.Conv2d with timm's symmetric static padding; {conv} is a "
                f"{type(conv).__name__} with padding {conv.padding!r} (TF 'same' padding models such as tf_* variants "
                f"are not supported)")
        max_k = max(kernel_sizes) if kernel_sizes else k
        if max_k < k:
            raise ValueError(f'kernel_sizes {list(kernel_sizes)} must include the source kernel size {k}')
        new = cls(
            conv.in_channels, conv.out_channels, max_k, stride=conv.stride[0], dilation=conv.dilation[0],
            groups=conv.groups, bias=conv.bias is not None, kernel_sizes=kernel_sizes, device='meta',
            dtype=conv.weight.dtype)
        for name, param in new.named_parameters(recurse=False):
            if name.startswith('kernel_transform_'):
                setattr(new, name, nn.Parameter(torch.eye(param.shape[0], device=conv.weight.device,
                                                          dtype=conv.weight.dtype)))
        new.weight = conv.weight if max_k == k else nn.Parameter(F.pad(conv.weight.detach(), [(max_k - k) // 2] * 4))
        new.bias = conv.bias
        if max_k == k:
            new.padding = conv.padding
        new.train(conv.training)
        return new

    @property
    def max_kernel_size(self) -> int:
        return self.kernel_sizes[-1]

    def set_active(self, out_channels: Optional[int] = None, kernel_size: Optional[int] = None) -> None:
        """Set the active output channels (dense convs) and kernel size (depthwise convs); None means the maximum."""
        if out_channels is not None:
            if self.depthwise:
                raise ValueError('A depthwise conv follows its input channels; do not set out_channels')
            if not 0 < out_channels <= self.out_channels:
                raise ValueError(f'out_channels={out_channels} outside 1..{self.out_channels}')
        if kernel_size is not None and kernel_size not in self.kernel_sizes:
            raise ValueError(f'kernel_size={kernel_size} not allowed; allowed {list(self.kernel_sizes)}')
        self.active_out_channels = out_channels
        self.active_kernel_size = kernel_size or self.max_kernel_size

    def active_weight(self, in_channels: int) -> torch.Tensor:
        """The weight of the active setting for ``in_channels`` input channels."""
        return self.weight_for(in_channels, self.active_out_channels, self.active_kernel_size)

    def weight_for(
            self, in_channels: int, out_channels: Optional[int] = None, kernel_size: Optional[int] = None,
    ) -> torch.Tensor:
        """The weight of an explicit setting (None means the maximum), without touching the active one."""
        if self.depthwise:
            weight = self.weight if in_channels == self.out_channels else prefix_slice(self.weight, in_channels)
            return self._transformed_kernel(weight, kernel_size or self.max_kernel_size)
        out_channels = out_channels or self.out_channels
        if out_channels == self.out_channels and in_channels == self.in_channels:
            return self.weight
        return prefix_slice(self.weight, out_channels, in_channels)

    def _transformed_kernel(self, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
        channels = weight.shape[0]
        for big, small in zip(self.kernel_sizes[::-1], self.kernel_sizes[-2::-1]):
            if big <= kernel_size:
                break
            start = (big - small) // 2
            centre = weight[:, :, start:start + small, start:start + small].reshape(channels, small * small)
            weight = F.linear(centre, getattr(self, self.transform_name(big, small)))
            weight = weight.view(channels, 1, small, small)
        return weight

    def active_bias(self, out_channels: int) -> Optional[torch.Tensor]:
        if self.bias is None or out_channels == self.out_channels:
            return self.bias
        return self.bias[:out_channels]

    def _inference_weight(self, in_channels: int) -> torch.Tensor:
        # Without autograd, a sliced or transformed weight is the same tensor until a parameter changes in place
        # (optimizer step, load_state_dict) or the active setting changes: reuse one contiguous copy, so inference
        # (search, BN calibration, evaluation) costs what the static subnet costs.
        weight = self.weight
        key = (in_channels, self.active_out_channels, self.active_kernel_size,
               id(weight), weight._version, weight.device, weight.dtype)
        if self.active_kernel_size != self.max_kernel_size:  # the transforms only enter a smaller kernel
            key += tuple((id(p), p._version) for p in (self._parameters[n] for n in self._transform_names))
        cache = self._inference_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        weight = self.active_weight(in_channels)
        if weight is not self.weight:
            weight = weight.contiguous()
            self._inference_cache = (key, weight)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_channels = x.shape[1]
        if in_channels == self.in_channels and self.active_out_channels in (None, self.out_channels) \
                and self.active_kernel_size == self.kernel_size[0]:
            # The full layer, as the source conv runs it: no per-call work, so the max subnet costs the source model.
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            weight = self.active_weight(in_channels)
        else:
            weight = self._inference_weight(in_channels)
        k = weight.shape[-1]
        padding = self.padding if k == self.kernel_size[0] else get_padding(k, self.stride[0], self.dilation[0])
        return F.conv2d(
            x, weight, self.active_bias(weight.shape[0]), self.stride, padding, self.dilation,
            in_channels if self.depthwise else 1)

    def static_state(
            self, in_channels: int, out_channels: Optional[int] = None, kernel_size: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        """Tensors of the static ``nn.Conv2d`` of a setting, keyed as in its state dict.

        Args:
            in_channels: Input channels of the static conv.
            out_channels: Output channels (dense convs); defaults to the active setting.
            kernel_size: Kernel size (depthwise convs); defaults to the active setting.
        """
        with torch.no_grad():
            weight = self.weight_for(
                in_channels, out_channels or self.active_out_channels, kernel_size or self.active_kernel_size)
            state = {'weight': _detached(weight)}
            if self.bias is not None:
                state['bias'] = _detached(self.active_bias(weight.shape[0]))
        return state

    def to_static(self, in_channels: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the active setting's weights."""
        state = self.static_state(in_channels)
        out_channels, _, k, _ = state['weight'].shape
        conv = nn.Conv2d(
            in_channels, out_channels, k, stride=self.stride,
            padding=self.padding if k == self.kernel_size[0] else get_padding(k, self.stride[0], self.dilation[0]),
            dilation=self.dilation, groups=in_channels if self.depthwise else 1, bias=self.bias is not None,
            device='meta')
        conv.load_state_dict(state, assign=True)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if len(self.kernel_sizes) > 1:
            s += f', kernel_sizes={list(self.kernel_sizes)}'
        return s


class _ElasticBatchNormMixin:
    """Batch norm over a leading subset of channels, read from the input.

    Running statistics of the active channels are updated in place through views, so statistics of each width stay
    where the corresponding channels live.
    """
    num_features: int
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    momentum: Optional[float]
    eps: float
    training: bool
    track_running_stats: bool

    def _elastic_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        weight, bias, mean, var = self.weight, self.bias, self.running_mean, self.running_var
        if c != self.num_features:  # views: the running statistics of the active channels update in place
            weight = None if weight is None else weight[:c]
            bias = None if bias is None else bias[:c]
            mean = None if mean is None else mean[:c]
            var = None if var is None else var[:c]
        momentum = 0.0 if self.momentum is None else self.momentum
        if not self.training:
            return F.batch_norm(x, mean, var, weight, bias, mean is None and var is None, momentum, self.eps)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        if not self.track_running_stats:
            mean = var = None
        return F.batch_norm(x, mean, var, weight, bias, True, momentum, self.eps)

    def static_state(self, num_features: int) -> Dict[str, torch.Tensor]:
        """Tensors of the static batch norm over the first ``num_features`` channels."""
        state = {}
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            t = getattr(self, name)
            if t is not None:
                state[name] = _detached(t[:num_features])
        if self.num_batches_tracked is not None:
            state['num_batches_tracked'] = _detached(self.num_batches_tracked)
        return state


class ElasticBatchNorm2d(_ElasticBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over the leading channels of its input."""

    @classmethod
    def from_static(cls, bn: nn.BatchNorm2d) -> 'ElasticBatchNorm2d':
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device='meta')
        return _adopt(new, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._elastic_batch_norm(x)

    def to_static(self, num_features: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(
            num_features, self.eps, self.momentum, self.affine, self.track_running_stats, device='meta')
        bn.load_state_dict(self.static_state(num_features), assign=True)
        return bn.train(self.training)


class ElasticBatchNormAct2d(_ElasticBatchNormMixin, BatchNormAct2d):
    """timm ``BatchNormAct2d`` (norm, drop, activation) over the leading channels of its input."""

    @classmethod
    def from_static(cls, bn: BatchNormAct2d) -> 'ElasticBatchNormAct2d':
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device='meta')
        return _adopt(new, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._elastic_batch_norm(x)))

    def to_static(self, num_features: int) -> BatchNormAct2d:
        bn = BatchNormAct2d(
            num_features, self.eps, self.momentum, self.affine, self.track_running_stats, device='meta')
        bn.act, bn.drop = self.act, self.drop
        bn.load_state_dict(self.static_state(num_features), assign=True)
        return bn.train(self.training)


class ElasticLinear(nn.Linear):
    """``nn.Linear`` whose input features follow its input (the leading ``in_features``) and whose output features
    can shrink to the leading ``active_out_features`` (set by ``set_active``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.active_out_features: Optional[int] = None

    @classmethod
    def from_static(cls, linear: nn.Linear) -> 'ElasticLinear':
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device='meta')
        return _adopt(new, linear)

    def set_active(self, out_features: Optional[int] = None) -> None:
        """Set the active output features; None means all of them."""
        if out_features is not None and not 0 < out_features <= self.out_features:
            raise ValueError(f'out_features={out_features} outside 1..{self.out_features}')
        self.active_out_features = None if out_features == self.out_features else out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, out = x.shape[-1], self.active_out_features
        if c == self.in_features and out is None:
            return F.linear(x, self.weight, self.bias)
        weight = prefix_slice(self.weight, out, None if c == self.in_features else c)
        bias = self.bias if self.bias is None or out is None else self.bias[:out]
        return F.linear(x, weight, bias)

    def static_state(self, in_features: int, out_features: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Tensors of the static ``nn.Linear`` over the leading ``in_features`` and ``out_features`` (default: the
        active ones)."""
        out = out_features or self.active_out_features or self.out_features
        state = {'weight': _detached(self.weight[:out, :in_features])}
        if self.bias is not None:
            state['bias'] = _detached(self.bias[:out])
        return state

    def to_static(self, in_features: int) -> nn.Linear:
        state = self.static_state(in_features)
        linear = nn.Linear(in_features, state['weight'].shape[0], bias=self.bias is not None, device='meta')
        linear.load_state_dict(state, assign=True)
        return linear.train(self.training)


class ElasticLayerNorm(nn.LayerNorm):
    """A layer norm over the last dimension that normalises the leading channels its input has (AutoFormer's
    LayerNormSuper): the statistics are those of the active channels, and weight and bias are sliced with them."""

    @classmethod
    def from_static(cls, norm: nn.LayerNorm) -> 'ElasticLayerNorm':
        if len(norm.normalized_shape) != 1:
            raise ValueError(f'ElasticLayerNorm normalises one dimension, got normalized_shape {norm.normalized_shape}')
        new = cls(norm.normalized_shape[0], eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                  bias=norm.bias is not None, device='meta')
        return _adopt(new, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        if c == self.normalized_shape[0]:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight[:c]
        bias = None if self.bias is None else self.bias[:c]
        return F.layer_norm(x, (c,), weight, bias, self.eps)

    def static_state(self, channels: int) -> Dict[str, torch.Tensor]:
        return {name: _detached(t[:channels]) for name, t in (('weight', self.weight), ('bias', self.bias))
                if t is not None}


class ElasticLayerScale(nn.Module):
    """timm's ``LayerScale`` (a learned scale per channel) over the leading channels of its input."""

    def __init__(self, dim: int, inplace: bool = False, device=None, dtype=None):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    @classmethod
    def from_static(cls, scale: nn.Module) -> 'ElasticLayerScale':
        new = cls(scale.gamma.shape[0], inplace=getattr(scale, 'inplace', False), device='meta')
        return _adopt(new, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        gamma = self.gamma if c == self.gamma.shape[0] else self.gamma[:c]
        return x.mul_(gamma) if self.inplace else x * gamma

    def static_state(self, channels: int) -> Dict[str, torch.Tensor]:
        return {'gamma': _detached(self.gamma[:channels])}


class ElasticAttention(Attention):
    """timm's multi-head self-attention with an elastic head count (the leading ``active_heads``; each head keeps its
    width) over an elastic input width.

    ``qkv`` is timm's one ``Linear`` laid out ``[q | k | v]``, each heads-major: the rows of the leading heads of
    each part are gathered. ``proj`` (an :class:`ElasticLinear`) reads the leading ``heads x head_dim`` channels and
    writes the active width. At the full setting ``forward`` is timm's own, so the max subnet computes the source.
    """

    @classmethod
    def from_static(cls, attn: Attention) -> 'ElasticAttention':
        """Build from a timm ``Attention`` (without a gate or an attention-output norm, which no elastic width has).

        Raises:
            ValueError: Naming what the attention has that cannot shrink.
        """
        if type(attn) is not Attention:
            raise ValueError(f'{type(attn).__name__} attention is not supported (timm Attention only)')
        if getattr(attn, 'gate', None) is not None or not isinstance(attn.norm, nn.Identity):
            raise ValueError('Attention with a gate or a norm of its output (scale_norm) is not supported')
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ('num_heads', 'head_dim', 'attn_dim', 'scale', 'fused_attn'):
            setattr(new, name, getattr(attn, name))
        new.gate = None
        _adopt(new, attn)
        new.proj = ElasticLinear.from_static(attn.proj)
        new.active_heads = None
        return new

    def set_active(self, heads: Optional[int] = None, out_features: Optional[int] = None) -> None:
        """Set the active head count (None: all) and the width ``proj`` writes (None: its full width)."""
        if heads is not None and not 0 < heads <= self.num_heads:
            raise ValueError(f'heads={heads} outside 1..{self.num_heads}')
        self.active_heads = None if heads == self.num_heads else heads
        self.proj.set_active(out_features)

    def qkv_weight(self, in_features: int, heads: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``qkv``'s weight and bias for the leading ``heads`` and ``in_features``."""
        qkv = self.qkv
        if heads == self.num_heads and in_features == qkv.in_features:
            return qkv.weight, qkv.bias
        weight = qkv.weight.view(3, self.num_heads, self.head_dim, -1)[:, :heads, :, :in_features]
        weight = weight.reshape(3 * heads * self.head_dim, in_features)
        bias = None if qkv.bias is None else qkv.bias.view(3, self.num_heads, self.head_dim)[:, :heads].reshape(-1)
        return weight, bias

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        heads = self.active_heads or self.num_heads
        if heads == self.num_heads and C == self.qkv.in_features:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        qkv = F.linear(x, *self.qkv_weight(C, heads))
        q, k, v = qkv.reshape(B, N, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0., is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, heads * self.head_dim)
        return self.proj_drop(self.proj(x))

    def static_state(self, in_features: int, heads: int) -> Dict[str, torch.Tensor]:
        """Tensors of a timm ``Attention`` over ``in_features`` with ``heads`` heads, keyed as in its state dict."""
        with torch.no_grad():
            weight, bias = self.qkv_weight(in_features, heads)
            state = {'qkv.weight': _detached(weight)}
            if bias is not None:
                state['qkv.bias'] = _detached(bias)
            for name in ('q_norm', 'k_norm'):
                state.update({f'{name}.{k}': _detached(v) for k, v in getattr(self, name).state_dict().items()})
            proj = self.proj.static_state(heads * self.head_dim, out_features=in_features)
        state.update({f'proj.{k}': v for k, v in proj.items()})
        return state


class ElasticSqueezeExcite(SqueezeExcite):
    """timm ``SqueezeExcite`` whose channels follow its input.

    The reduced width is ``make_divisible(channels * rd_ratio, rd_divisor)``, recomputed for the active channels as
    timm does when it builds an SE block for that width (and as OFA does in its dynamic SE).
    """

    def __init__(self, in_chs: int, rd_ratio: float = 0.25, rd_divisor: int = 8, device=None, dtype=None):
        super().__init__(
            in_chs, rd_channels=make_divisible(in_chs * rd_ratio, rd_divisor), device=device, dtype=dtype)
        self.rd_ratio = rd_ratio
        self.rd_divisor = rd_divisor

    @classmethod
    def from_static(cls, se: SqueezeExcite, rd_ratio: float = 0.25, rd_divisor: int = 8) -> 'ElasticSqueezeExcite':
        """Build from a timm ``SqueezeExcite`` whose reduced width follows ``make_divisible(c * rd_ratio)``.

        Raises:
            ValueError: If the SE block was built with another reduction rule.
        """
        in_chs, rd = se.conv_reduce.in_channels, se.conv_reduce.out_channels
        if make_divisible(in_chs * rd_ratio, rd_divisor) != rd:
            raise ValueError(
                f'SE block with {in_chs} -> {rd} channels does not follow '
                f'make_divisible(c * {rd_ratio}, {rd_divisor}); '
                f'its reduced width cannot be recomputed for smaller widths')
        new = cls(in_chs, rd_ratio, rd_divisor, device='meta')
        return _adopt(new, se)

    def reduced_channels(self, channels: int) -> int:
        return make_divisible(channels * self.rd_ratio, self.rd_divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.conv_reduce.in_channels:
            return super().forward(x)
        rd = self.reduced_channels(c)
        x_se = x.mean((2, 3), keepdim=True)
        x_se = F.conv2d(x_se, prefix_slice(self.conv_reduce.weight, rd, c), self.conv_reduce.bias[:rd])
        x_se = self.act1(x_se)
        x_se = F.conv2d(x_se, prefix_slice(self.conv_expand.weight, c, rd), self.conv_expand.bias[:c])
        return x * self.gate(x_se)

    def static_state(self, channels: int) -> Dict[str, torch.Tensor]:
        rd = self.reduced_channels(channels)
        return {
            'conv_reduce.weight': _detached(self.conv_reduce.weight[:rd, :channels]),
            'conv_reduce.bias': _detached(self.conv_reduce.bias[:rd]),
            'conv_expand.weight': _detached(self.conv_expand.weight[:channels, :rd]),
            'conv_expand.bias': _detached(self.conv_expand.bias[:channels]),
        }

    def to_static(self, channels: int) -> SqueezeExcite:
        se = SqueezeExcite(channels, rd_channels=self.reduced_channels(channels), device='meta')
        se.act1, se.gate = self.act1, self.gate
        se.load_state_dict(self.static_state(channels), assign=True)
        return se.train(self.training)


ELASTIC_TYPES: tuple[Type[nn.Module], ...] = (
    ElasticConv2d, ElasticBatchNorm2d, ElasticBatchNormAct2d, ElasticLinear, ElasticLayerNorm, ElasticLayerScale,
    ElasticAttention, ElasticSqueezeExcite)


def is_elastic(module: nn.Module) -> bool:
    """Whether ``module`` is one of the elastic layers of this module."""
    return isinstance(module, ELASTIC_TYPES)
