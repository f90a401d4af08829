"""Specialization benchmarks, side by side in one run.

``search`` (default): evolutionary search on one problem by ``ofa_timm.search.specialize`` and by the two search setups
the reference implementation (PyPI ``ofa``) ships, each at its own speed, timed in interleaved rounds (the order of the
setups rotates every round, one seed per round):

- **tutorial**: ``ofa.tutorial.EvolutionFinder`` with ``ofa.tutorial.FLOPsTable``, the reference's tutorial setup. Its
  FLOPs come from a per-block lookup table (a few dict lookups per candidate); the table is filled with this package's
  exact per-block FLOPs, so both sides enforce the same constraint (checked on 200 subnets before timing), and its
  predictor is the tutorial's 128-feature ``AccuracyPredictor``.
- **ofa.nas**: ``ofa.nas.search_algorithm.EvolutionFinder`` with ``ofa.nas.efficiency_predictor.Mbv3FLOPsModel`` (which
  sets the reference supernet to each candidate and counts its FLOPs layer by layer from the network config) and
  ``ofa.nas.accuracy_predictor.AccuracyPredictor``. It counts a multiply-add once where this package counts it twice
  (as ``FlopCounterMode`` does); the budget is halved for it, and the two counts are checked to agree.

Both run OFA's defaults (population 100, 500 generations, parent ratio 0.25, mutation ratio 0.5, mutation probability
0.1) on the canonical MobileNetV3 w1.2 space at the reference's five resolutions (160-224, step 16), under a FLOPs
budget. Ours searches the same space with the same predictor weights (``AccuracyPredictor.from_reference`` of each
reference predictor, random weights seeded once), so the best predicted accuracies compare the same problem.

What differs in the algorithms (same population, parents and children per generation):

- mutation: ours and the tutorial redraw a block's kernel and expand together, each stage's depth and the resolution
  with probability 0.1; ``ofa.nas`` the same per block and stage, and the resolution with probability 0.5;
- crossover: all three take each gene (the resolution included) from either parent;
- an infeasible child: ours redraws it at most 10 times, then keeps its (feasible) parent; both reference setups
  redraw it until it fits, which never ends when nothing fits.

``quality``: the best predicted accuracy of the tutorial setup and ours over ``--seeds`` seeds, without timing.

``flops``: analytic FLOPs and parameters against ``FlopCounterMode`` / parameter counts of the extracted models, for
random subnets of every registered space at its own resolutions.

Usage:
    python benchmarks/bench_search.py [search] [--budget 400] [--repeats 3] [--threads 2] [--setups tutorial nas]
    python benchmarks/bench_search.py quality [--seeds 10]
    python benchmarks/bench_search.py flops [--subnets 200]
"""
import argparse
import importlib.util
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.search import AccuracyPredictor, EvolutionConfig, flops_model, specialize

RESOLUTIONS = (160, 176, 192, 208, 224)  # the reference's search resolutions (tutorial and ofa.nas)
SETUPS = ('tutorial', 'nas')
NAMES = {'tutorial': 'tutorial EvolutionFinder + FLOPsTable', 'nas': 'ofa.nas EvolutionFinder + Mbv3FLOPsModel'}


def _reference_module(name: str):
    """A module of ``ofa.tutorial`` loaded on its own (the package's __init__ imports optional downloaders)."""
    import ofa
    path = os.path.join(os.path.dirname(ofa.__file__), 'tutorial', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'ofa_tutorial_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with stdout and stderr silenced (the reference prints and draws a bar per generation)."""
    with open(os.devnull, 'w') as devnull:
        streams, (sys.stdout, sys.stderr) = (sys.stdout, sys.stderr), (devnull, devnull)
        try:
            return fn()
        finally:
            sys.stdout, sys.stderr = streams


def _random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.normal_(0, 0.05)


def _ref_arch(subnet, resolution_key: str) -> Dict[str, Any]:
    r = subnet.resolution
    return {'ks': list(subnet.kernels), 'e': [int(e) for e in subnet.expands], 'd': list(subnet.depths),
            resolution_key: [r] if resolution_key == 'r' else r}


def _flops_table(supernet: torch.nn.Module) -> Any:
    """The tutorial's ``FLOPsTable`` holding this package's exact FLOPs per block (MFLOPs, multiply-add = 2).

    Its own ``predict_efficiency`` then prices a candidate with the same per-block lookups as the tutorial's table.
    """
    cls = _reference_module('flops_table').FLOPsTable
    table = cls.__new__(cls)  # skip __init__: it would measure every block with thop on a GPU
    space = supernet.space
    table.efficiency_dict = {}
    for res in space.resolutions:
        blocks: List[Dict[Tuple[int, int], float]] = [{} for _ in range(len(space['kernels'].choices) + 1)]
        other: Dict[int, float] = {}
        for k in (3, 5, 7):
            for e in (3, 4, 6):
                subnet = space.max().replace(kernels=[k] * len(space['kernels'].choices),
                                             expands=[e] * len(space['expands'].choices), resolution=res)
                specs = supernet.describe(subnet)  # stem, first block, the 20 slots, final conv, head
                assert len(specs) == len(space['kernels'].choices) + 4, [s.name for s in specs]
                blocks[0][(3, 1)] = specs[1].flops(res) / 1e6
                for i, spec in enumerate(specs[2:-2]):
                    blocks[i + 1][(k, e)] = spec.flops(res) / 1e6
                other = {0: specs[0].flops(res) / 1e6, 1: specs[-2].flops(res) / 1e6, 2: specs[-1].flops(res) / 1e6}
        table.efficiency_dict[res] = {'mobile_inverted_blocks': blocks, 'other_blocks': other}
    return table


@dataclass
class Setup:
    """One reference search setup and ours on the same problem."""
    name: str
    run_reference: Callable[[int], Tuple[float, float]]  # seed -> (best predicted top-1 %, its MFLOPs in our units)
    run_ours: Callable[[int], Tuple[float, float]]


def _tutorial_setup(supernet: torch.nn.Module, budget: float, config: EvolutionConfig) -> Setup:
    low, high = 150, 600
    if not low <= budget <= high:  # outside it, the tutorial's EvolutionFinder waits for a new budget on stdin
        raise ValueError(f'The tutorial EvolutionFinder takes FLOPs budgets in [{low}, {high}] M, got {budget:g}')
    space = supernet.space
    flops = flops_model(supernet)
    table = _flops_table(supernet)
    check = [space.min(), space.max()] + [space.sample(i) for i in range(198)]
    got = np.array([table.predict_efficiency(_ref_arch(s, 'r')) for s in check])
    assert np.allclose(got, flops(check) / 1e6, rtol=1e-9), 'the lookup table prices subnets as our FLOPs model'
    tutorial = _reference_module('accuracy_predictor').AccuracyPredictor(pretrained=False, device='cpu')
    _random_weights(tutorial.model)
    ours = AccuracyPredictor.from_reference(tutorial.model.state_dict(), space)
    finder_cls = _reference_module('evolution_finder').EvolutionFinder

    def reference(seed: int) -> Tuple[float, float]:
        random.seed(seed)
        np.random.seed(seed)
        finder = finder_cls('flops', budget, table, tutorial, population_size=config.population_size,
                            max_time_budget=config.generations, mutate_prob=config.mutate_prob,
                            parent_ratio=config.parent_ratio, mutation_ratio=config.mutation_ratio)
        _, (acc, _, mflops) = _quiet(finder.run_evolution_search)
        return 100 * acc, mflops

    return Setup('tutorial', reference, _ours(supernet, ours, budget * 1e6, config))


def _nas_setup(supernet: torch.nn.Module, budget: float, config: EvolutionConfig) -> Setup:
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3
    from ofa.nas.accuracy_predictor import AccuracyPredictor as RefPredictor, MobileNetArchEncoder
    from ofa.nas.efficiency_predictor import Mbv3FLOPsModel
    from ofa.nas.search_algorithm import EvolutionFinder
    space = supernet.space
    flops = flops_model(supernet)
    ofa_net = OFAMobileNetV3(n_classes=supernet.num_classes, width_mult=1.2, ks_list=[3, 5, 7],
                             expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
    efficiency = Mbv3FLOPsModel(ofa_net)
    check = [space.min(), space.max()] + [space.sample(i) for i in range(48)]
    got = np.array([efficiency.get_efficiency(_ref_arch(s, 'image_size')) for s in check])
    assert np.allclose(2 * got, flops(check) / 1e6, rtol=1e-9), 'Mbv3FLOPsModel counts multiply-adds once'
    encoder = MobileNetArchEncoder(image_size_list=list(RESOLUTIONS), ks_list=[3, 5, 7], expand_list=[3, 4, 6],
                                   depth_list=[2, 3, 4], n_stage=5)
    predictor = RefPredictor(encoder, device='cpu')
    _random_weights(predictor)
    ours = AccuracyPredictor.from_reference(predictor.state_dict(), space)

    def reference(seed: int) -> Tuple[float, float]:
        random.seed(seed)
        np.random.seed(seed)
        finder = EvolutionFinder(efficiency, predictor, arch_mutate_prob=config.mutate_prob,
                                 population_size=config.population_size, max_time_budget=config.generations,
                                 parent_ratio=config.parent_ratio, mutation_ratio=config.mutation_ratio)
        with torch.no_grad():
            _, (acc, _, mflops) = _quiet(lambda: finder.run_evolution_search(budget / 2))
        return 100 * acc, 2 * mflops

    return Setup('nas', reference, _ours(supernet, ours, budget * 1e6, config))


def _ours(supernet: torch.nn.Module, predictor: AccuracyPredictor, budget: float,
          config: EvolutionConfig) -> Callable[[int], Tuple[float, float]]:
    def run(seed: int) -> Tuple[float, float]:
        result = specialize(supernet, predictor, 'flops', [budget], config, seed=seed)[0]
        return result.accuracy, result.costs['flops'] / 1e6
    return run


def search_side_by_side(budget: float = 400, repeats: int = 3, setups: Sequence[str] = SETUPS
                        ) -> Dict[str, Dict[str, List[Tuple[float, float, float]]]]:
    """Time each reference setup and ours on the same problem, in interleaved rounds (one seed per round).

    Args:
        budget: FLOPs budget in MFLOPs (a multiply-add counts 2).
        repeats: Rounds; round ``i`` runs every search with seed ``i``, in an order that rotates every round.
        setups: Reference setups to run: ``'tutorial'`` and/or ``'nas'``.

    Returns:
        ``{setup: {'reference' | 'ours': [(seconds, best predicted top-1 %, its MFLOPs), ...]}}``.
    """
    supernet = timm.create_model('ofa_mbv3_w12', resolutions=RESOLUTIONS).eval()
    config = EvolutionConfig()  # the reference's defaults
    builders = {'tutorial': _tutorial_setup, 'nas': _nas_setup}
    built = [builders[name](supernet, budget, config) for name in setups]
    runs = [(s.name, side, fn) for s in built for side, fn in (('reference', s.run_reference), ('ours', s.run_ours))]
    out: Dict[str, Dict[str, List[Tuple[float, float, float]]]] = {s.name: {'reference': [], 'ours': []}
                                                                   for s in built}
    for seed in range(repeats):
        shift = seed % len(runs)
        for name, side, fn in runs[shift:] + runs[:shift]:
            start = time.perf_counter()
            acc, mflops = fn(seed)
            out[name][side].append((time.perf_counter() - start, acc, mflops))
    return out


def bench_search(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    results = search_side_by_side(args.budget, args.repeats, args.setups)
    config = EvolutionConfig()
    print(f'ofa_mbv3_w12 at {len(RESOLUTIONS)} resolutions {RESOLUTIONS[0]}-{RESOLUTIONS[-1]}, population '
          f'{config.population_size}, {config.generations} generations, FLOPs <= {args.budget:g} M, {args.threads} '
          f'threads, {args.repeats} interleaved rounds (median):')
    print('| setup | reference s | ours s | reference / ours | best predicted top-1: reference | ours |')
    print('|---|---:|---:|---:|---:|---:|')
    for name, sides in results.items():
        ref, ours = (statistics.median(r[0] for r in sides[k]) for k in ('reference', 'ours'))
        best = {k: statistics.median(r[1] for r in sides[k]) for k in sides}
        assert all(r[2] <= args.budget + 1e-6 for k in sides for r in sides[k]), 'every answer meets the budget'
        print(f'| {NAMES[name]} | {ref:.2f} | {ours:.2f} | {ref / ours:.1f}x | {best["reference"]:.2f}% | '
              f'{best["ours"]:.2f}% |')


def bench_quality(args: argparse.Namespace) -> None:
    """Best predicted accuracy of the tutorial setup and ours over ``--seeds`` seeds (no timing): three interleaved
    rounds say little about search quality."""
    torch.set_num_threads(args.threads)
    supernet = timm.create_model('ofa_mbv3_w12', resolutions=RESOLUTIONS).eval()
    setup = _tutorial_setup(supernet, args.budget, EvolutionConfig())
    ref, ours = [], []
    for seed in range(args.seeds):
        ref.append(setup.run_reference(seed)[0])
        ours.append(setup.run_ours(seed)[0])
        print(f'seed {seed}: reference {ref[-1]:.2f}%, ours {ours[-1]:.2f}%', flush=True)
    print(f'{args.seeds} seeds, tutorial predictor, FLOPs <= {args.budget:g} M: median reference '
          f'{statistics.median(ref):.2f}%, ours {statistics.median(ours):.2f}%; mean {statistics.mean(ref):.2f}% / '
          f'{statistics.mean(ours):.2f}%; ours below the reference in {sum(o < r for o, r in zip(ours, ref))} of '
          f'{args.seeds}')


def bench_flops(args: argparse.Namespace) -> None:
    from ofa_timm.testing import cost_mismatches
    names = sorted(set(timm.list_models('ofa_*')) - {'ofa_mbv3'})
    print('| space | subnets | resolutions | FLOPs exact | params exact | max rel. FLOPs error |')
    print('|---|---:|---|---:|---:|---:|')
    for name in names:
        supernet = timm.create_model(name, num_classes=1000).eval()
        space = supernet.space
        rng = np.random.default_rng(0)
        subnets = [space.min(), space.max()] + [space.sample(rng) for _ in range(args.subnets - 2)]
        wrong = cost_mismatches(supernet, subnets)
        bad = {kind: sum(k == kind for _, k, _, _ in wrong) for kind in ('flops', 'params')}
        worst = max((abs(p - c) / c for _, k, p, c in wrong if k == 'flops'), default=0.0)
        res = space.resolutions
        print(f'| {name} | {len(subnets)} | {res[0]}..{res[-1]} ({len(res)}) | {len(subnets) - bad["flops"]}/'
              f'{len(subnets)} | {len(subnets) - bad["params"]}/{len(subnets)} | {worst:.1e} |', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', nargs='?', choices=('search', 'quality', 'flops'), default='search')
    parser.add_argument('--budget', type=float, default=400, help='MFLOPs budget of the search')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--subnets', type=int, default=200)
    parser.add_argument('--seeds', type=int, default=10, help='quality: seeds of each search')
    parser.add_argument('--setups', nargs='+', choices=SETUPS, default=list(SETUPS), help='reference setups to run')
    args = parser.parse_args()
    {'search': bench_search, 'quality': bench_quality, 'flops': bench_flops}[args.what](args)


if __name__ == '__main__':
    main()
