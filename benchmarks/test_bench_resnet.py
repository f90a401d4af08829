"""pytest-benchmark: elastic ResNet at a subnet vs the same subnet extracted as a stock timm ResNet (CPU).

Run: python -m pytest benchmarks/test_bench_resnet.py --benchmark-columns=median,iqr,rounds
The ratio table printed at the end is the result; the target is <= 1.05 on CPU.
"""
import pytest
import timm
import torch

import ofa_timm

BATCH, RES = 8, 128
SUBNETS = ('max', 'min', 'random')


@pytest.fixture(scope='module')
def supernet():
    torch.manual_seed(0)
    return ofa_timm.elasticize(timm.create_model('resnet50d'))


def _subnet(sn, which):
    return {'max': sn.space.max(), 'min': sn.space.min(), 'random': sn.space.sample(0)}[which]


def _models(sn, which):
    subnet = sn.set_active(_subnet(sn, which))
    return {'supernet': sn, 'static': sn.extract(subnet)}


@pytest.mark.parametrize('role', ['supernet', 'static'])
@pytest.mark.parametrize('which', SUBNETS)
def test_forward(benchmark, supernet, which, role):
    model = _models(supernet, which)[role].eval()
    x = torch.randn(BATCH, 3, RES, RES)
    benchmark.group = f'resnet50d eval forward {which}'
    benchmark.extra_info['role'] = role
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=15, warmup_rounds=2)


@pytest.mark.parametrize('role', ['supernet', 'static'])
@pytest.mark.parametrize('which', SUBNETS)
def test_train_step(benchmark, supernet, which, role):
    model = _models(supernet, which)[role].train()
    x = torch.randn(BATCH, 3, RES, RES)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).mean().backward()

    benchmark.group = f'resnet50d train step {which}'
    benchmark.extra_info['role'] = role
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
