"""Test helpers: small timm models with seeded weights and non-trivial BN statistics. The checks the tests share with
the benchmarks live in ``ofa_timm.testing``."""
import timm
import torch
import torch.nn as nn

from ofa_timm.testing import assert_close, randomize_bn

__all__ = ['assert_close', 'randomize_bn', 'timm_model']


def timm_model(name: str, num_classes: int = 10, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model in eval mode with seeded weights and randomized BN statistics."""
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model(name, num_classes=num_classes, **kwargs), seed).eval()
