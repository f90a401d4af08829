"""Vectorised constrained evolution: budgets respected, deterministic, immediate failure on unreachable budgets."""
import re

import numpy as np
import pytest
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.search import (
    AccuracyPredictor, EvolutionConfig, evolve, flops_model, format_cost, params_model, resolve_constraints, specialize)

FAST = EvolutionConfig(population_size=40, generations=60)


@pytest.fixture(scope='module')
def supernet():
    torch.manual_seed(0)
    return timm.create_model('ofa_mbv3_w12', num_classes=10).eval()


class GeneSum:
    """A stand-in predictor: more of every choice is better (so the best subnet spends its budget)."""

    def __init__(self, space):
        self.space = space
        self.calls = 0

    def predict(self, codes):
        self.calls += 1
        return np.asarray(codes, dtype=np.float64).sum(axis=1)


def test_search_respects_the_budget_and_spends_it(supernet):
    flops = flops_model(supernet)
    smallest, largest = flops.minimum()[0], flops.maximum()[0]
    budgets = [smallest + f * (largest - smallest) for f in (0.1, 0.3, 0.6)]
    results = specialize(supernet, GeneSum(supernet.space), 'flops', budgets, FAST)
    assert len(results) == 3
    for budget, r in zip(budgets, results):
        assert r.costs['flops'] == flops(r.subnet)[0] <= budget
        assert (r.population_costs['flops'] <= budget).all()
        assert np.allclose(r.population_costs['flops'], flops(r.population))
        assert r.costs['flops'] > 0.85 * budget  # a monotone predictor pushes the best subnet up to the budget
        assert r.accuracy == r.population_accuracy.max()
    assert results[0].accuracy <= results[1].accuracy <= results[2].accuracy


def test_search_is_deterministic_for_a_seed(supernet):
    torch.manual_seed(0)
    predictor = AccuracyPredictor(supernet.space)
    budget = flops_model(supernet).minimum()[0] * 2
    a = specialize(supernet, predictor, 'flops', [budget], FAST, seed=3)[0]
    b = specialize(supernet, predictor, 'flops', [budget], FAST, seed=3)[0]
    assert a.subnet == b.subnet and a.accuracy == b.accuracy
    assert np.array_equal(a.population, b.population) and np.array_equal(a.history, b.history)


def test_unreachable_budget_fails_at_once_naming_the_smallest_cost(supernet):
    predictor = GeneSum(supernet.space)
    smallest = flops_model(supernet).minimum()[0]
    with pytest.raises(ValueError, match=re.escape(f'smallest achievable flops is {format_cost(smallest, "flops")}')):
        specialize(supernet, predictor, 'flops', [smallest * 3, smallest * 0.5])
    assert predictor.calls == 0  # no budget was searched: the unreachable one is found first
    with pytest.raises(ValueError, match='smallest achievable params'):
        specialize(supernet, predictor, {'flops': 'flops', 'params': 'params'},
                   [{'flops': smallest * 3, 'params': 1e5}])


def test_a_budget_equal_to_the_minimum_returns_the_cheapest_subnet(supernet):
    flops = flops_model(supernet)
    smallest, cheapest = flops.minimum()
    r = specialize(supernet, GeneSum(supernet.space), 'flops', [smallest], FAST)[0]
    assert r.costs['flops'] == smallest and flops(r.subnet)[0] == smallest


def test_several_constraints_together(supernet):
    flops, params = flops_model(supernet), params_model(supernet)
    budget = {'flops': flops.minimum()[0] * 2.5, 'params': params.minimum()[0] * 1.5}
    r = specialize(supernet, GeneSum(supernet.space), ['flops', 'params'], [budget], FAST)[0]
    assert flops(r.subnet)[0] <= budget['flops'] and params(r.subnet)[0] <= budget['params']
    assert (r.population_costs['params'] <= budget['params']).all()


def test_space_only_search_and_bad_arguments(supernet):
    space = supernet.space
    flops = flops_model(supernet)
    r = evolve(space, GeneSum(space), {'flops': flops}, {'flops': flops.minimum()[0] * 2}, FAST)
    assert r.costs['flops'] <= flops.minimum()[0] * 2
    with pytest.raises(ValueError, match='needs the supernet'):
        resolve_constraints(space, 'flops')
    with pytest.raises(ValueError, match='Unknown constraint'):
        resolve_constraints(supernet, 'energy')
    other = timm.create_model('ofa_mbv3_w12', num_classes=10, resolutions=(160, 192, 224))
    with pytest.raises(ValueError, match='another space'):
        specialize(supernet, AccuracyPredictor(other.space), 'flops', [3e8], FAST)
    with pytest.raises(ValueError, match='another space'):
        specialize(supernet, GeneSum(space), flops_model(other), [3e8], FAST)
    with pytest.raises(ValueError, match='dict name -> value'):
        specialize(supernet, GeneSum(space), ['flops', 'params'], [3e8], FAST)


def test_mutation_groups_a_blocks_kernel_and_expand_as_ofa_does(supernet):
    space = supernet.space
    groups = space.gene_groups
    assert groups.shape == (len(space.genes),)
    for i in range(len(space.kernel_slots)):  # the same block slot: one group
        assert groups[space.gene_index('kernels', i)] == groups[space.gene_index('expands', i)]
    others = [space.gene_index('depths', s) for s in range(len(space.stages))] + [space.gene_index('resolution')]
    assert len({groups[i] for i in others}) == len(others)  # each depth and the resolution alone
    assert groups.max() + 1 == len(space.kernel_slots) + len(others)
    resnet = timm.create_model('ofa_resnet50').space  # no kernel genes: every expand is its own group
    assert len(set(resnet.gene_groups.tolist())) == len(resnet.genes)
