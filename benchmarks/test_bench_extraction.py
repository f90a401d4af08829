"""Subnet extraction (supernet -> stock timm model with the subnet's weights) in milliseconds, against the reference
implementation's ``set_active_subnet`` + ``get_active_subnet(preserve_weight=True)`` where it has the space."""
import pytest
import torch

from harness import SPACES, Row, assert_close

TARGET_MS = 30.0
ROUNDS = 15


@pytest.mark.parametrize('which', ['min', 'random0', 'max'])
@pytest.mark.parametrize('name', SPACES)
def test_extraction(benchmark, spaces, settings, measure, record, name, which):
    space = spaces(name)
    supernet = space.supernet.eval()
    subnet = space.subnet(which)
    x, _ = settings.precision.inputs(2, settings.res)
    with torch.no_grad():
        ours = supernet.extract(subnet).eval()(x)
        supernet.set_active(subnet)
        assert_close(ours, supernet(x), 1e-5, f'{name} {which}: extracted vs supernet')
        if space.reference is not None:
            assert_close(ours, space.extract_reference(subnet).eval()(x), 1e-4, f'{name} {which}: ours vs reference')

    fns = {'ours': lambda: supernet.extract(subnet)}
    if space.reference is not None:
        fns['reference'] = lambda: space.extract_reference(subnet)
    benchmark.group = 'extraction'
    t = measure(fns, settings.rounds(ROUNDS))
    ref = t['reference'] * 1e3 if 'reference' in t else None
    note = f'ours / reference {t["ours"] / t["reference"]:.3f}' if 'reference' in t else ''
    record(Row(f'extraction {name} {which}', t['ours'] * 1e3, TARGET_MS, 'ms', reference=ref, note=note))
