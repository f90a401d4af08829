"""Fast construction of static models whose every tensor is about to be replaced."""
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.init as init
from torch.overrides import TorchFunctionMode

__all__ = ['build_on_meta', 'assign_state', 'reshape_on_meta', 'skip_meta_init']

_INIT_FNS = frozenset({
    init.normal_, init.uniform_, init.trunc_normal_, init.zeros_, init.ones_, init.constant_,
    init.kaiming_normal_, init.kaiming_uniform_, init.xavier_uniform_, init.xavier_normal_, init.orthogonal_,
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
})


class _SkipMetaInit(TorchFunctionMode):
    """Turn weight-init calls on meta tensors into no-ops.

    Random init on the meta device runs through Python reference decompositions and costs more than building the
    modules; the values would be discarded anyway.
    """

    def __torch_function__(self, func: Callable, types: Any, args: Tuple = (), kwargs: Dict = None) -> Any:
        kwargs = kwargs or {}
        if func in _INIT_FNS:
            tensor = args[0] if args else kwargs.get('tensor')
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def skip_meta_init() -> TorchFunctionMode:
    """Context in which weight-init calls on meta tensors do nothing."""
    return _SkipMetaInit()


def build_on_meta(factory: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """Call ``factory(*args, device='meta', **kwargs)`` without running weight init."""
    with skip_meta_init():
        return factory(*args, device='meta', **kwargs)


def assign_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Put ``state``'s tensors into ``model`` (built on meta) in place of its own, checking names and shapes.

    A lean ``load_state_dict(strict=True, assign=True)``: extraction calls it on hundreds of tensors per model.

    Raises:
        ValueError: Naming missing, unexpected and mis-shaped keys.
    """
    expected = {}
    for mod_name, module in model.named_modules():
        prefix = f'{mod_name}.' if mod_name else ''
        for name, p in module._parameters.items():
            if p is not None:
                expected[prefix + name] = (module, name, p, True)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                expected[prefix + name] = (module, name, b, False)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f'{k}: {tuple(state[k].shape)} vs {tuple(expected[k][2].shape)}'
        for k in expected if k in state and state[k].shape != expected[k][2].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f'State does not fit the model: missing {missing}, unexpected {unexpected}, shape mismatch {mismatched}')
    for key, (module, name, old, is_param) in expected.items():
        if is_param:
            module._parameters[name] = nn.Parameter(state[key], requires_grad=old.requires_grad)
        else:
            module._buffers[name] = state[key]
    return model


def reshape_on_meta(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Resize ``model``'s (meta) convs, norms and linears to the shapes of ``state``, in place.

    A lean ``timm.models.adapt_model_from_string`` for models about to take ``state`` through :func:`assign_state`:
    no deep copy, no module rebuilt, only the tensors and size attributes that differ.
    """
    for name, module in model.named_modules():
        prefix = f'{name}.' if name else ''
        for tensors in (module._parameters, module._buffers):
            for key, t in tensors.items():
                new = state.get(prefix + key)
                if t is None or new is None or new.shape == t.shape:
                    continue
                empty = torch.empty(new.shape, device='meta', dtype=t.dtype)
                tensors[key] = nn.Parameter(empty, requires_grad=t.requires_grad) if tensors is module._parameters \
                    else empty
        weight = module._parameters.get('weight')
        if weight is None:
            continue
        if isinstance(module, nn.Conv2d):
            if module.groups > 1 and module.groups == module.in_channels:  # depthwise: groups follow the channels
                module.groups = weight.shape[0]
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = weight.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
    return model
