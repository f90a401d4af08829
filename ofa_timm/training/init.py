"""Initialisation of a supernet trained from scratch."""
import torch
import torch.nn as nn

__all__ = ['zero_init_residual']


@torch.no_grad()
def zero_init_residual(model: nn.Module) -> int:
    """Zero the scale of the last batch norm of every residual branch, so that each block starts as the identity.

    BigNAS (Yu et al., 2020) found this essential to train a supernet from scratch, and timm's ResNets do it by default
    (``zero_init_last``). For elastic depth it also means that a block which some subnets skip starts out skippable.
    Blocks are found through timm's own conventions, so every family built from timm blocks is covered: a block with a
    ``zero_init_last`` method (ResNet) calls it; a block with ``has_skip`` set (the EfficientNet-builder blocks of
    MobileNetV3) zeroes the last batch norm among its children, the one that feeds the residual sum.

    Returns:
        The number of blocks initialised.
    """
    count = 0
    for module in model.modules():
        if callable(getattr(module, 'zero_init_last', None)):
            module.zero_init_last()
            count += 1
        elif getattr(module, 'has_skip', False):
            bns = [m for m in module.children() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
            if bns:
                nn.init.zeros_(bns[-1].weight)
                count += 1
    return count
