"""Specialization: evolutionary search against the reference's tutorial ``EvolutionFinder`` on the same problem, and
the latency table's prediction error on held-out subnets.

The search reuses ``bench_search.py`` (OFA's defaults: population 100, 500 generations, the reference's predictor with
the same random weights, 400 MFLOPs, the canonical MobileNetV3 w1.2 space at the reference's 5 resolutions on both
sides, the reference's FLOPs from its own per-block lookup table), three interleaved rounds. The ``ofa.nas`` setup
(about 100 s a run) is left to ``python benchmarks/bench_search.py``.
The latency table is built for ``ofa_mbv3_w12`` at one resolution (128 px), batch 1, so it fits in the suite; the full
figures are in ``docs/search.md``.
"""
import statistics

import pytest
import timm
import torch

from harness import HAS_REFERENCE, Row

SEARCH_TARGET_S = 2.0
LATENCY_TARGET_PCT = 5.0
BUDGET_MFLOPS = 400


@pytest.mark.skipif(not HAS_REFERENCE, reason='the reference implementation (PyPI ofa) is not installed')
def test_search(benchmark, settings, record):
    from bench_search import search_side_by_side
    benchmark.group = 'search'
    results = benchmark.pedantic(
        search_side_by_side, args=(BUDGET_MFLOPS, settings.rounds(3), ('tutorial',)), rounds=1, iterations=1)
    runs = results['tutorial']
    assert all(mflops <= BUDGET_MFLOPS for side in runs.values() for _, _, mflops in side)  # answers meet the budget
    best = {side: statistics.median(acc for _, acc, _ in r) for side, r in runs.items()}
    # Same predictor, same space: ours finds a subnet at least about as good as the reference's.
    assert best['ours'] >= best['reference'] - 0.5, best
    ours, ref = (statistics.median(s for s, _, _ in runs[side]) for side in ('ours', 'reference'))
    record(Row('search: evolution 100 x 500 (s)', ours, SEARCH_TARGET_S, 's', reference=ref,
               note=f'{ref / ours:.0f}x faster than the reference tutorial EvolutionFinder + FLOPsTable, interleaved; '
                    f'best predicted top-1 {best["ours"]:.2f}% vs {best["reference"]:.2f}%'))


def test_latency_table_error(benchmark, settings, record, tmp_path):
    from ofa_timm.search import LatencySettings, build_latency_table
    torch.manual_seed(0)
    supernet = timm.create_model('ofa_mbv3_w12', resolutions=(settings.res,)).eval()
    latency = LatencySettings('torch-cpu', batch_size=1, threads=torch.get_num_threads())
    benchmark.group = 'latency table'
    table = benchmark.pedantic(
        build_latency_table, args=(supernet, tmp_path / 'table.json', latency),
        kwargs=dict(calibrate=10, validate=10, progress=False), rounds=1, iterations=1)
    v = table.validation
    assert v['n'] == 10 and all(r['measured_ms'] > 0 and r['predicted_ms'] > 0 for r in v['rows'])
    record(Row('latency table: median % error, 10 held-out subnets', v['median_abs_pct'], LATENCY_TARGET_PCT, '%',
               note=f'{v["within_10_pct"]:.0f}% within ±10%, max {v["max_abs_pct"]:.1f}%, plain sum '
                    f'{v["plain_median_abs_pct"]:.1f}%; validated in the same rounds as the calibration; ofa_mbv3_w12 '
                    f'{settings.res} px, batch 1, {len(table.entries)} entries'))
