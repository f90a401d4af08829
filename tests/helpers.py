"""Test helpers: small models with non-trivial BN statistics, and the tolerance the issues specify."""
import timm
import torch
import torch.nn as nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Max abs difference relative to the largest magnitude."""
    scale = max(a.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item() / scale
    assert err <= rtol, f'relative error {err:.3g} > {rtol}'


def timm_model(name: str, num_classes: int = 10, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model in eval mode with seeded weights and randomized BN statistics."""
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model(name, num_classes=num_classes, **kwargs), seed).eval()
