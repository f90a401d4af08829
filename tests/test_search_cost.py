"""Analytic cost models: exact against FlopCounterMode / parameter counts of extracted models, for every space."""
import itertools

import numpy as np
import pytest
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.search import AdditiveCost, as_codes, flops_model
from ofa_timm.space import SearchSpace, StageChoices
from ofa_timm.testing import cost_mismatches

# Small and odd resolutions keep the property test fast and exercise the ceil of every strided layer.
RESOLUTIONS = (33, 48, 57, 64)
# The canonical MobileNetV3 and ResNet spaces get the full property test (200 random subnets); the converted ones share
# their implementations and get 40 each; efficientnet_b0 stands for the EfficientNet-builder families with 30 (their
# descriptions are checked against FlopCounterMode for every listed model in test_efficientnet.py).
SPACES = [
    ('ofa_mbv3_w10', 40), ('ofa_mbv3_w12', 200), ('ofa_mobilenetv3_large_100', 40),
    ('ofa_mobilenetv3_large_075', 40), ('ofa_mobilenetv3_small_100', 40), ('ofa_resnet50', 200),
    ('ofa_resnet50d', 40), ('ofa_resnet26d', 40), ('ofa_resnet101', 40), ('ofa_resnet34', 40),
    ('ofa_efficientnet_b0', 30),
]


@pytest.fixture(scope='module')
def _supernets():
    return {}


def _supernet(name, cache):
    if name not in cache:
        torch.manual_seed(0)
        cache[name] = timm.create_model(name, num_classes=10, resolutions=RESOLUTIONS).eval()
    return cache[name]


@pytest.mark.slow
@pytest.mark.parametrize('name, n', SPACES)
def test_flops_and_params_equal_the_extracted_model(name, n, _supernets):
    """Random subnets per space (plus min and max) at several resolutions: FLOPs and parameters are exact."""
    supernet = _supernet(name, _supernets)
    space = supernet.space
    rng = np.random.default_rng(0)
    subnets = [space.min(), space.max()] + [space.sample(rng) for _ in range(n)]
    assert cost_mismatches(supernet, subnets) == []


@pytest.mark.parametrize('name', ['ofa_mbv3_w12', 'ofa_resnet50', 'ofa_resnet34'])
def test_vectorised_cost_equals_the_description_sum(name, _supernets):
    supernet = _supernet(name, _supernets)
    space = supernet.space
    subnets = [space.sample(i) for i in range(300)]
    expected = [sum(b.flops(s.resolution) for b in supernet.describe(s)) for s in subnets]
    flops = flops_model(supernet)
    assert flops(space.encode(subnets)).tolist() == expected
    assert flops(subnets).tolist() == expected  # subnets, a single subnet and codes are all accepted
    assert flops(subnets[3])[0] == expected[3] and flops(space.encode(subnets[3]))[0] == expected[3]
    assert flops(space.encode(subnets)).dtype == np.int64


def test_minimum_and_maximum_are_exact(_supernets):
    supernet = _supernet('ofa_resnet50', _supernets)
    flops = flops_model(supernet)
    smallest, subnet = flops.minimum()
    assert smallest == flops(supernet.space.min())[0] == flops(subnet)[0]
    assert flops.maximum()[0] == flops(supernet.space.max())[0]


def test_minimum_of_a_non_monotonic_cost_matches_brute_force():
    """Measured costs need not grow with every choice: the exact minimum comes from variable elimination."""
    space = SearchSpace.from_stages(
        (StageChoices((1, 2, 3), ((3, 5), (3, 5, 7), (3,)), ((2., 3.), (2.,), (2., 4.))),
         StageChoices((1, 2), ((3, 5), (3, 5)), ())),
        widths=((0.5, 1.),), resolutions=(8, 16))
    counts = space.choice_counts
    everything = np.array(list(itertools.product(*(range(c) for c in counts))))
    rng = np.random.default_rng(0)
    for trial in range(5):
        blocks = [(0, 3, 6), (1, 4, 8, 9), (0, 1), (9,), (2, 5, 7), ()]
        tables = [rng.normal(size=(int(np.prod(counts[list(b)])), 2)) for b in blocks]
        cost = AdditiveCost(space, blocks, tables, scale=1.5, offset=2.0)
        values = cost(everything)
        smallest, subnet = cost.minimum()
        largest, big = cost.maximum()
        assert np.isclose(smallest, values.min()) and np.isclose(cost(subnet)[0], smallest)
        assert np.isclose(largest, values.max()) and np.isclose(cost(big)[0], largest)


def test_bad_codes_are_rejected(_supernets):
    space = _supernet('ofa_mbv3_w12', _supernets).space
    with pytest.raises(ValueError, match='shape'):
        as_codes(space, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match='outside'):
        as_codes(space, np.full((1, len(space.genes)), 7, dtype=np.int64))
    with pytest.raises(ValueError, match='not allowed'):
        as_codes(space, [space.max().replace(resolution=999)])
