"""The examples run as a user runs them (tiny settings)."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'


@pytest.mark.slow
@pytest.mark.parametrize('extra', [[], ['--supernet', '--model', 'ofa_resnet26d']])
def test_finetune_subnet_example(tmp_path, extra):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / 'finetune_subnet.py'), '--epochs', '1', '--output', str(tmp_path), *extra],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'reloaded' in result.stdout and (tmp_path / 'finetuned.pth').is_file()


@pytest.mark.slow
def test_nni_experiment_example(tmp_path):
    pytest.importorskip('nni')
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / 'nni_experiment.py'), '--output', str(tmp_path), '--epochs-scale', '0.2',
         '--trials', '4'], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '[3/3] Best subnet' in result.stdout and (tmp_path / 'results' / 'subnet_top1.json').is_file()
    output = result.stdout + result.stderr  # not a terminal: no colour codes, no noise the package causes
    assert '\x1b[' not in output and 'litlogger' not in output
    assert 'Checkpoint callback is found to be None' not in output
