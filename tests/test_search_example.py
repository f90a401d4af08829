"""The specialization example runs as a user runs it (tiny settings)."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'


@pytest.mark.slow
def test_specialize_example(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / 'specialize.py'), '--model', 'ofa_mobilenetv3_small_100', '--resolutions',
         '32', '40', '--subnets', '8', '--threads', '1', '--output', str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '[4/4] Exported 3 subnets' in result.stdout
    assert (tmp_path / 'pareto.png').is_file() and (tmp_path / 'budget2' / 'config.json').is_file()
