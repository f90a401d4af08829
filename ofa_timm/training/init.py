"""Initialisation of a supernet trained from scratch."""
import torch
import torch.nn as nn

__all__ = ['zero_init_residual']


@torch.no_grad()
def zero_init_residual(model: nn.Module) -> int:
    """Zero the scale of the last norm of every residual branch, so that each block starts as the identity.

    BigNAS (Yu et al., 2020) found this essential to train a supernet from scratch, and timm's ResNets do it by default
    (``zero_init_last``). For elastic depth it also means that a block which some subnets skip starts out skippable.
    Each family knows its blocks: this is ``ElasticSupernet.zero_init_residual``.

    Returns:
        The number of blocks initialised.

    Raises:
        ValueError: If ``model`` is not an elastic supernet.
    """
    init = getattr(model, 'zero_init_residual', None)
    if not callable(init):
        raise ValueError(f'zero_init_residual needs an ofa_timm elastic supernet, got {type(model).__name__}')
    return init()
