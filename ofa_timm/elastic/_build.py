"""Fast construction of static models whose every tensor is about to be replaced."""
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.init as init
from torch.overrides import TorchFunctionMode

__all__ = ['build_on_meta', 'assign_state', 'skip_meta_init']

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
