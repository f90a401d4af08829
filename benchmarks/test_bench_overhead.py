"""Elastic overhead: a supernet set to a subnet against the same subnet extracted as a static timm model.

Eval forward and train step (forward, cross entropy, backward), batch 8, 128 px, for the canonical OFA MobileNetV3
w1.2, ``mobilenetv3_large_100``, ``resnet50d``, the canonical OFA-ResNet50, ``vit_small_patch16_224`` (built at 128
px) and ``convnext_atto``, at the max, min and three fixed random subnets. Where the reference implementation has
the space, its supernet and its own extracted subnet are timed in the same rounds. Also the max subnet against the
source timm model, whose outputs must be identical.
"""
import pytest
import torch

from harness import SPACES, SUBNETS, Row, assert_close, build_space, eval_forward, train_step

OVERHEAD_TARGET = 1.05
SOURCE_TARGET = 1.02
ROUNDS = {'eval': 15, 'train': 9}


def _forward(mode: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train(mode == 'train')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model(x)


def _work(mode: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision):
    model.train(mode == 'train')
    return train_step(model, x, y, precision) if mode == 'train' else eval_forward(model, x, precision)


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('which', SUBNETS)
@pytest.mark.parametrize('name', SPACES)
def test_elastic_overhead(benchmark, spaces, settings, measure, record, name, which, mode):
    space = spaces(name)
    p = settings.precision
    x, y = p.inputs(settings.batch, settings.res)
    supernet = space.supernet
    subnet = supernet.set_active(space.subnet(which))
    models = {'ours': supernet, 'ours_static': supernet.extract(subnet)}
    if space.reference is not None:
        models['reference_static'] = space.extract_reference(subnet)  # also sets the reference to the subnet
        models['reference'] = space.reference
    # The compared models compute the same function, in the mode that is timed (train mode: batch statistics, the
    # same RNG state for each model).
    with torch.no_grad():
        outputs = {k: _forward(mode, m, x) for k, m in models.items()}
    assert_close(outputs['ours'], outputs['ours_static'], 1e-5, f'{name} {which} {mode}: supernet vs extracted')
    if space.reference is not None:
        assert_close(outputs['reference_static'], outputs['reference'], 1e-5, f'{name} {which} {mode}: reference')
        assert_close(outputs['ours'], outputs['reference'], 1e-4, f'{name} {which} {mode}: ours vs reference')

    benchmark.group = f'elastic overhead {mode}'
    t = measure({k: _work(mode, m, x, y, p) for k, m in models.items()}, settings.rounds(ROUNDS[mode]))
    supernet.zero_grad(set_to_none=True)
    ref = t['reference'] / t['reference_static'] if space.reference is not None else None
    record(Row(f'overhead {mode} {name} {which}', t['ours'] / t['ours_static'], OVERHEAD_TARGET, reference=ref))


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('name', [n for n in SPACES if not n.startswith('ofa_')])
def test_max_subnet_vs_source(benchmark, settings, measure, record, name, mode):
    space = build_space(name, settings.res)  # its own: train steps elsewhere move the shared space's BN statistics
    p = settings.precision
    x, y = p.inputs(settings.batch, settings.res)
    supernet, source = space.supernet, space.source
    supernet.set_active('max')
    with torch.no_grad():
        assert torch.equal(supernet.eval()(x), source.eval()(x)), f'{name}: max subnet and source differ'
        assert torch.equal(supernet.train()(x), source.train()(x)), f'{name}: max subnet and source differ (train)'

    benchmark.group = f'max subnet vs source {mode}'
    t = measure({'ours': _work(mode, supernet, x, y, p), 'source': _work(mode, source, x, y, p)},
                settings.rounds(ROUNDS[mode]))
    supernet.zero_grad(set_to_none=True)
    record(Row(f'max subnet vs source {mode} {name}', t['ours'] / t['source'], SOURCE_TARGET))
