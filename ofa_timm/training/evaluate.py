"""Accuracy of one subnet, as everything in this package measures it: extracted, BN-recalibrated, evaluated."""
import contextlib
from typing import TYPE_CHECKING, Callable, ContextManager, Dict, Iterable, Optional, Union

import torch
import torch.nn as nn
from timm.utils import accuracy

from ..space import SubnetLike
from .bn import calibrate_bn
from .data import eval_loader, resize_to

if TYPE_CHECKING:
    from ..search.quantize import QuantizeConfig

__all__ = ['evaluate_subnet', 'SubnetEvaluator']


@torch.no_grad()
def evaluate_subnet(
        supernet: nn.Module,
        subnet: SubnetLike,
        calib_loader: Iterable,
        val_loader: Iterable,
        calib_images: int = 2000,
        device: Union[str, torch.device, None] = None,
        autocast: Optional[Callable[[], ContextManager]] = None,
        quantize: Optional['QuantizeConfig'] = None,
) -> Dict[str, float]:
    """Top-1 / top-5 (%) of ``subnet`` on ``val_loader`` after recalibrating its BN on ``calib_images`` images.

    The subnet is extracted first, so the supernet's weights and running statistics are untouched. With
    ``quantize``, the accuracy is that of its INT8 graph run by ONNX Runtime on the CPU (activations calibrated on
    images of ``calib_loader``), as a device running INT8 computes it.

    Args:
        supernet: An elastic supernet.
        subnet: The subnet (any form ``supernet.resolve`` reads).
        calib_loader: Training images (batches or ``(images, targets)``) for BN recalibration.
        val_loader: ``(images, targets)`` batches; images are resized to the subnet's resolution.
        calib_images: Images used for recalibration.
        device: Evaluation device (default: the supernet's).
        autocast: Returns the autocast context of the forward passes (default: none).
        quantize: Evaluate the INT8 graph quantized with these settings (default: the float model).
    """
    subnet = supernet.resolve(subnet)
    device = torch.device(device) if device is not None else next(supernet.parameters()).device
    model = supernet.extract(subnet).to(device)
    calibrate_bn(model, calib_loader, calib_images, resolution=subnet.resolution, device=device)
    model.eval()
    if quantize is not None:
        from ..search.quantize import quantized_classifier
        model = quantized_classifier(model, calib_loader, supernet.resolution_of(subnet), quantize,
                                     int(getattr(supernet, 'in_chans', 3)))
        device = torch.device('cpu')
    top1 = top5 = 0.
    count = 0
    for images, targets in val_loader:
        images, targets = resize_to(images.to(device), subnet.resolution), targets.to(device)
        with (autocast or contextlib.nullcontext)():
            logits = model(images)
        a1, a5 = accuracy(logits.float(), targets, topk=(1, min(5, logits.shape[1])))
        top1 += a1.item() * images.shape[0]
        top5 += a5.item() * images.shape[0]
        count += images.shape[0]
    if count == 0:
        raise ValueError('evaluate_subnet got an empty validation loader')
    return {'top1': top1 / count, 'top5': top5 / count}


class SubnetEvaluator:
    """Evaluates subnets as the whole package does: BN recalibrated on a fixed subset of training images (drawn once
    from ``seed``), then top-1/top-5 on an evaluation set.

    Args:
        calib_set: Training images with the evaluation transform.
        eval_set: The images to evaluate on (a validation or a test split).
        calib_images: Images used for BN recalibration.
        batch_size: Batch size of both loaders.
        seed: Seed of the calibration subset.
        workers: Data-loader workers.
        device: Evaluation device (default: the supernet's).
        autocast: Returns the autocast context of the forward passes (default: none).
        quantize: Evaluate INT8 graphs quantized with these settings (default: float models).
    """

    def __init__(self, calib_set: torch.utils.data.Dataset, eval_set: torch.utils.data.Dataset,
                 calib_images: int = 2000, batch_size: int = 64, seed: int = 0, workers: int = 0,
                 device: Union[str, torch.device, None] = None,
                 autocast: Optional[Callable[[], ContextManager]] = None,
                 quantize: Optional['QuantizeConfig'] = None):
        self.n_calib = min(calib_images, len(calib_set))
        g = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(calib_set), generator=g)[:self.n_calib].tolist()
        pin = torch.device(device).type == 'cuda' if device is not None else False
        self.calib = eval_loader(calib_set, batch_size, workers, pin, indices)
        self.eval = eval_loader(eval_set, batch_size, workers, pin)
        self.device, self.autocast, self.quantize = device, autocast, quantize

    def __call__(self, supernet: nn.Module, subnet: SubnetLike) -> Dict[str, float]:
        """``{'top1', 'top5'}`` (%) of ``subnet`` of ``supernet``."""
        return evaluate_subnet(supernet, subnet, self.calib, self.eval, self.n_calib, self.device, self.autocast,
                               self.quantize)
