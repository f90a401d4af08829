"""Checks that the test suite and the benchmarks share: models with non-trivial batch-norm statistics, one measure of
closeness between outputs, and the exactness of the analytic cost models against counted FLOPs and parameters."""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .space import Subnet

__all__ = ['randomize_bn', 'relative_error', 'assert_close', 'cost_mismatches']


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial affine parameters and running statistics (fresh ones would hide slicing and
    copying errors behind ones and zeros)."""
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


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the largest magnitude of either tensor."""
    a, b = a.detach().float(), b.detach().float()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return (a - b).abs().max().item() / scale


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, what: str = '') -> None:
    """Assert ``relative_error(a, b) <= rtol``, naming ``what`` was compared."""
    err = relative_error(a, b)
    assert err <= rtol, f'{what + ": " if what else ""}outputs differ, relative error {err:.3g} > {rtol}'


def cost_mismatches(supernet: nn.Module, subnets: Sequence[Subnet]) -> List[Tuple[Subnet, str, int, int]]:
    """The subnets whose analytic FLOPs or parameters (``flops_model`` / ``params_model``) differ from what
    ``FlopCounterMode`` counts on the extracted model, and from its parameter count: ``(subnet, 'flops' | 'params',
    predicted, counted)``. Empty when the cost models are exact."""
    from .search import count_flops, count_params, flops_model, params_model
    codes = supernet.space.encode(list(subnets))
    flops, params = flops_model(supernet)(codes), params_model(supernet)(codes)
    out = []
    for subnet, f, p in zip(subnets, flops, params):
        model = supernet.extract(subnet)
        res = supernet.resolution_of(subnet)
        counted_f, counted_p = count_flops(model, res), count_params(model)
        if f != counted_f:
            out.append((subnet, 'flops', int(f), counted_f))
        if p != counted_p:
            out.append((subnet, 'params', int(p), counted_p))
    return out
