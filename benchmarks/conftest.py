"""The CPU benchmark suite: ``python -m pytest benchmarks/ --benchmark-only``.

Every case times its functions interleaved (see ``harness.Interleaved``) inside one pytest-benchmark round loop,
asserts that the models it compares compute the same outputs, prints its ratio as it finishes, and adds a row to
the table printed at the end: each ratio next to its target, and the reference implementation's figure for the same
work where it has the space.

Options: ``--bench-rounds`` scales every case's rounds, ``--bench-threads`` sets torch's intra-op threads (default 1:
on a shared 2-core machine two threads make the timing of identical models differ by up to 6 %, one thread by about
2 %), ``--bench-json`` writes the table as JSON.

Timed rounds run under ``ofa_timm._malloc.steady_allocator``: with glibc's defaults, whether a buffer comes from the
heap or from fresh page-faulting memory depends on what ran before, which moved ratios by tens of percent.
"""
import contextlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping

import pytest
import timm
import torch

from ofa_timm._malloc import steady_allocator

from harness import Interleaved, Precision, Row, Space, build_space, format_row, format_table

BATCH, RES = 8, 128


_ROWS = pytest.StashKey[List[Row]]()


@dataclass
class Settings:
    batch: int
    res: int
    rounds_scale: float
    precision: Precision = field(default_factory=lambda: Precision(torch.device('cpu')))

    def rounds(self, n: int) -> int:
        return max(1, round(n * self.rounds_scale))


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup('ofa_timm benchmarks')
    group.addoption('--bench-rounds', type=float, default=1.0, help='scale the number of rounds of every case')
    group.addoption('--bench-threads', type=int, default=int(os.environ.get('OFA_BENCH_THREADS', 1)),
                    help='torch intra-op threads (default 1, or $OFA_BENCH_THREADS)')
    group.addoption('--bench-json', default=None, help='write the summary table to this JSON file')


def pytest_configure(config: Any) -> None:
    torch.set_num_threads(config.getoption('--bench-threads'))
    config.stash[_ROWS] = []


@pytest.fixture(scope='session')
def settings(pytestconfig: Any) -> Settings:
    return Settings(BATCH, RES, pytestconfig.getoption('--bench-rounds'))


@pytest.fixture(scope='session')
def spaces(settings: Settings) -> Callable[[str], Space]:
    """Space name -> the space, built once per session (the reference beside it where it has one)."""
    built: Dict[str, Space] = {}

    def get(name: str) -> Space:
        if name not in built:
            built[name] = build_space(name, settings.res)
        return built[name]
    return get


@pytest.fixture
def measure(benchmark: Any, request: Any) -> Callable[..., Dict[str, float]]:
    """Time ``fns`` interleaved for ``rounds`` pytest-benchmark rounds; return each one's median seconds."""
    def run(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> Dict[str, float]:
        timer = Interleaved(fns)
        with steady_allocator():  # freed buffers stay in the heap: no page-fault lottery between the compared models
            timer.warmup(warmup)
            benchmark.pedantic(timer.round, rounds=rounds, iterations=1)
        medians = timer.medians()
        benchmark.extra_info.update({f'median_ms_{k}': round(v * 1e3, 3) for k, v in medians.items()})
        return medians
    return run


@pytest.fixture
def record(request: Any, benchmark: Any) -> Callable[[Row], None]:
    """Add a row to the summary and print it now."""
    def add(row: Row) -> None:
        request.config.stash[_ROWS].append(row)
        benchmark.extra_info[row.case] = row.value
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin('terminalreporter'), plugins.get_plugin('capturemanager')
        if reporter is not None:
            with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                reporter.ensure_newline()
                reporter.write_line(format_row(row))
    return add


def environment() -> Dict[str, Any]:
    return {
        'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
        'cpus': os.cpu_count(), 'threads': torch.get_num_threads(),
        'machine': platform.processor() or platform.machine(),
        'batch': BATCH, 'res': RES,
    }


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    tr = terminalreporter
    tr.section('ofa_timm: ratios (supernet / static unless stated) next to their targets')
    env = environment()
    tr.write_line(f"torch {env['torch']}, timm {env['timm']}, {env['threads']} thread(s) of {env['cpus']} CPUs, "
                  f"batch {BATCH}, {RES} px; interleaved medians")
    for line in format_table(rows):
        tr.write_line(line)
    path = config.getoption('--bench-json')
    if path:
        with open(path, 'w') as f:
            json.dump({'environment': env, 'rows': [dict(asdict(r), met=r.met) for r in rows]}, f, indent=1)
        tr.write_line(f'written to {path}')
