"""Shared fixtures: small inputs, timm models with non-trivial BN statistics."""
import pytest
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
    """Max abs difference relative to the largest magnitude, the tolerance the issue specifies."""
    scale = max(a.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item() / scale
    assert err <= rtol, f'relative error {err:.3g} > {rtol}'


@pytest.fixture(scope='session')
def mbv3_large() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model('mobilenetv3_large_100', num_classes=10)).eval()


@pytest.fixture(scope='session')
def mbv3_supernet(mbv3_large):
    import ofa_timm
    return ofa_timm.elasticize(mbv3_large).eval()
