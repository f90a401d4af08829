"""Print supernet/static ratios per benchmark group at the end of a pytest-benchmark run."""
from typing import Any


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    session = getattr(config, '_benchmarksession', None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, {})[bench.extra_info.get('role')] = bench.stats.median
    terminalreporter.section('supernet-at-subnet / extracted static subnet (median ratios)')
    for group, roles in sorted(groups.items()):
        if 'supernet' in roles and 'static' in roles:
            terminalreporter.write_line(f'{group:40s} {roles["supernet"] / roles["static"]:.3f}')
