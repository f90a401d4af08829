"""The CPU benchmark suite: ``python -m pytest benchmarks/ --benchmark-only``.

Every case times its functions interleaved (see ``harness.Interleaved``) inside one pytest-benchmark round loop,
asserts that the models it compares compute the same outputs, prints its ratio as it finishes, and adds a row to
the table printed at the end: each ratio next to its target, and the reference implementation's figure for the same
work where it has the space.

Options: ``--bench-rounds`` scales every case's rounds, ``--bench-threads`` sets torch's intra-op threads (default 1:
on a shared 2-core machine two threads make the timing of identical models differ by up to 6 %, one thread by about
2 %), ``--bench-json`` writes the table as JSON.
"""
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import pytest
import timm
import torch

from harness import Interleaved, Precision, Space, build_space

BATCH, RES = 8, 128


@dataclass
class Row:
    """One line of the summary table."""
    case: str
    value: Optional[float]  # None: not measured
    target: Optional[float] = None  # value <= target is met
    unit: str = 'x'  # 'x' (a ratio) or 'ms'
    reference: Optional[float] = None  # the reference implementation's figure for the same work
    note: str = ''

    @property
    def met(self) -> Optional[bool]:
        return None if self.value is None or self.target is None else self.value <= self.target


# Rows kept for measurements whose code does not exist yet, so the table shows where they go.
PENDING = (
    Row('search: evolution 100 x 500 vs reference EvolutionFinder (s)', None, 2.0, 's',
        note='not measured: search / specialization not implemented yet'),
    Row('latency table: median % error on held-out subnets', None, 5.0, '%',
        note='not measured: latency tables not implemented yet'),
)

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
        reporter = request.config.pluginmanager.get_plugin('terminalreporter')
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(_format(row))
    return add


def _fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return '-'
    return f'{value:.3f}' if unit == 'x' else f'{value:.1f} {unit}'


def _format(row: Row) -> str:
    target = '' if row.target is None else f'<= {_fmt(row.target, row.unit)}'
    met = {None: '', True: 'met', False: 'NOT MET'}[row.met]
    ref = f'  reference {_fmt(row.reference, row.unit)}' if row.reference is not None else ''
    note = f'  ({row.note})' if row.note else ''
    return f'{row.case}: {_fmt(row.value, row.unit)} {target} {met}{ref}{note}'


def environment() -> Dict[str, Any]:
    return {
        'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
        'cpus': os.cpu_count(), 'threads': torch.get_num_threads(), 'machine': platform.processor() or platform.machine(),
        'batch': BATCH, 'res': RES,
    }


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    rows = rows + list(PENDING)
    width = max(len(r.case) for r in rows)
    tr = terminalreporter
    tr.section('ofa_timm: ratios (supernet / static unless stated) next to their targets')
    env = environment()
    tr.write_line(f"torch {env['torch']}, timm {env['timm']}, {env['threads']} thread(s) of {env['cpus']} CPUs, "
                  f"batch {BATCH}, {RES} px; interleaved medians")
    tr.write_line(f'{"case":{width}s}  {"ours":>10s}  {"target":>10s}  {"met":>7s}  {"reference":>10s}')
    for r in rows:
        target = '-' if r.target is None else f'<= {_fmt(r.target, r.unit)}'
        met = {None: '-', True: 'yes', False: 'NO'}[r.met]
        ref = _fmt(r.reference, r.unit)
        tr.write_line(f'{r.case:{width}s}  {_fmt(r.value, r.unit):>10s}  {target:>10s}  {met:>7s}  {ref:>10s}'
                      + (f'  {r.note}' if r.note else ''))
    path = config.getoption('--bench-json')
    if path:
        with open(path, 'w') as f:
            json.dump({'environment': env, 'rows': [dict(asdict(r), met=r.met) for r in rows]}, f, indent=1)
        tr.write_line(f'written to {path}')
