"""Specialization benchmarks, side by side in one run.

``search`` (default): the reference ``EvolutionFinder`` and ``ofa_timm.search.specialize`` do the same work (OFA's
defaults: population 100, 500 generations, mutation/crossover ratios, the reference's 128-feature predictor with the
same random weights, a FLOPs constraint) on the canonical MobileNetV3 w1.2 space. Prints seconds, the ratio and the
best predicted accuracy each finds (the target is <= 2 s for ours on 2 CPU cores).

``flops``: analytic FLOPs and parameters against ``FlopCounterMode`` / parameter counts of the extracted models, for
random subnets of every registered space at its own resolutions.

Usage:
    python benchmarks/bench_search.py [search] [--budget 400] [--repeats 3] [--threads 2]
    python benchmarks/bench_search.py flops [--subnets 200]
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.search import (
    AccuracyPredictor, EvolutionConfig, SearchResult, count_params, flops_model, params_model, specialize)


def _reference_module(name: str):
    """A module of ``ofa.tutorial`` loaded on its own (the package's __init__ imports optional downloaders)."""
    import ofa
    path = os.path.join(os.path.dirname(ofa.__file__), 'tutorial', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'ofa_tutorial_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def search_side_by_side(budget: float = 400, repeats: int = 3, reference_repeats: Optional[int] = None
                        ) -> Tuple[Dict[str, List[float]], Dict[str, float], SearchResult]:
    """Time the reference ``EvolutionFinder`` and ``specialize`` on the same problem, ``repeats`` seeds each.

    Args:
        budget: MFLOPs budget.
        repeats: Runs of ours (seeds 0, 1, ...).
        reference_repeats: Runs of the reference (default ``repeats``).

    Returns:
        Seconds of each run and the best predicted top-1 (%) of the last run, keyed by ``'reference'`` / ``'ours'``,
        and our last result.
    """
    import random
    supernet = timm.create_model('ofa_mbv3_w12')
    space = supernet.space
    flops = flops_model(supernet)
    tutorial = _reference_module('accuracy_predictor').AccuracyPredictor(pretrained=False, device='cpu')
    torch.manual_seed(0)
    for p in tutorial.model.parameters():
        p.data.normal_(0, 0.05)
    ours = AccuracyPredictor.from_reference(tutorial.model.state_dict(), space)

    class Efficiency:  # the reference asks for MFLOPs one subnet at a time
        def predict_efficiency(self, sample):
            subnet = supernet.resolve({'ks': sample['ks'], 'e': sample['e'], 'd': sample['d'], 'r': sample['r']})
            return float(flops(subnet)[0]) / 1e6

    finder_cls = _reference_module('evolution_finder').EvolutionFinder
    config = EvolutionConfig()  # the reference's defaults
    times: Dict[str, List[float]] = {'reference': [], 'ours': []}
    best: Dict[str, float] = {}
    for repeat in range(repeats if reference_repeats is None else reference_repeats):
        random.seed(repeat)
        np.random.seed(repeat)
        finder = finder_cls('flops', budget, Efficiency(), tutorial, population_size=config.population_size,
                            max_time_budget=config.generations, mutate_prob=config.mutate_prob,
                            parent_ratio=config.parent_ratio, mutation_ratio=config.mutation_ratio)
        start = time.perf_counter()
        with open(os.devnull, 'w') as devnull:  # the reference draws a tqdm bar per generation
            stderr, sys.stderr = sys.stderr, devnull
            try:
                _, info = finder.run_evolution_search()
            finally:
                sys.stderr = stderr
        times['reference'].append(time.perf_counter() - start)
        best['reference'] = 100 * info[0]
    for repeat in range(repeats):
        start = time.perf_counter()
        result = specialize(supernet, ours, 'flops', [budget * 1e6], config, seed=repeat)[0]
        times['ours'].append(time.perf_counter() - start)
        best['ours'] = result.accuracy
    return times, best, result


def bench_search(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    times, best, _ = search_side_by_side(args.budget, args.repeats)
    config = EvolutionConfig()
    print(f'Population {config.population_size}, {config.generations} generations, FLOPs <= {args.budget} M, '
          f'{args.threads} threads, median of {args.repeats}:')
    for key, name in (('reference', 'reference EvolutionFinder'), ('ours', 'ofa_timm specialize')):
        print(f'  {name:28s} {statistics.median(times[key]):8.3f} s   best predicted top-1 {best[key]:.2f}%')
    ratio = statistics.median(times['reference']) / statistics.median(times['ours'])
    print(f'  speed-up: {ratio:.1f}x')


def bench_flops(args: argparse.Namespace) -> None:
    from torch.utils.flop_counter import FlopCounterMode
    names = sorted(set(timm.list_models('ofa_*')) - {'ofa_mbv3'})
    print('| space | subnets | resolutions | FLOPs exact | params exact | max rel. FLOPs error |')
    print('|---|---:|---|---:|---:|---:|')
    for name in names:
        supernet = timm.create_model(name, num_classes=1000).eval()
        space = supernet.space
        rng = np.random.default_rng(0)
        subnets = [space.min(), space.max()] + [space.sample(rng) for _ in range(args.subnets - 2)]
        codes = space.encode(subnets)
        predicted_flops, predicted_params = flops_model(supernet)(codes), params_model(supernet)(codes)
        exact_f = exact_p = 0
        worst = 0.0
        for subnet, f, p in zip(subnets, predicted_flops, predicted_params):
            model = supernet.extract(subnet)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(torch.zeros(1, 3, subnet.resolution, subnet.resolution))
            counted = counter.get_total_flops()
            exact_f += int(f == counted)
            exact_p += int(p == count_params(model))
            worst = max(worst, abs(f - counted) / counted)
        res = space.resolutions
        print(f'| {name} | {len(subnets)} | {res[0]}..{res[-1]} ({len(res)}) | {exact_f}/{len(subnets)} | '
              f'{exact_p}/{len(subnets)} | {worst:.1e} |', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', nargs='?', choices=('search', 'flops'), default='search')
    parser.add_argument('--budget', type=float, default=400, help='MFLOPs budget of the search')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--subnets', type=int, default=200)
    args = parser.parse_args()
    (bench_search if args.what == 'search' else bench_flops)(args)


if __name__ == '__main__':
    main()
