"""Batch-norm recalibration: running statistics of a subnet, re-estimated on training images."""
from typing import Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn

from .data import resize_to

__all__ = ['calibrate_bn']


@torch.no_grad()
def calibrate_bn(
        model: nn.Module,
        loader: Iterable[Union[torch.Tensor, Tuple[torch.Tensor, ...]]],
        num_images: int = 2000,
        resolution: Optional[int] = None,
        device: Optional[torch.device] = None,
) -> int:
    """Re-estimate every batch norm's running mean/var as exact averages over ``num_images`` images.

    Works on an elastic supernet (for its active subnet) and on any extracted or plain model. Only batch-norm layers
    run in training mode, so dropout and drop-path neither fire nor consume random numbers; each layer's momentum and
    the model's modes are restored afterwards.

    Args:
        model: The model to calibrate, in place.
        loader: Yields image batches (or tuples whose first item is the batch).
        num_images: How many images to use (at least one batch is used).
        resolution: Resize batches to this square resolution first (a subnet's resolution).
        device: Device for the images (default: the model's).

    Returns:
        The number of images used (0 for a model without batch norms, which is left alone).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    if not bns:  # a transformer's or ConvNeXt's layer norms keep no statistics: nothing to recalibrate
        return 0
    device = device or next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: the exact mean over all batches seen
            bn.train()
        seen = 0
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = resize_to(images[:num_images - seen].to(device), resolution)
            model(images)
            seen += images.shape[0]
            if seen >= num_images:
                break
        if seen == 0:
            raise ValueError('calibrate_bn got an empty loader')
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return seen
