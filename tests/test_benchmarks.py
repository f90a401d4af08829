"""Benchmark scripts run end to end (smoke runs): the GPU benchmark on CPU, so that it works the first time a GPU is
there, and the subnet-quality matrix on a few steps.

Timings and accuracies are not asserted: only that every case ran, checked its models' outputs, and wrote a sane
table.
"""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
GPU_SCRIPT = BENCHMARKS / 'gpu.py'


@pytest.mark.slow
def test_gpu_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / 'gpu.json'
    cmd = [sys.executable, str(GPU_SCRIPT), '--device', 'cpu', '--batch', '8', '--res', '32', '--quick',
           '--subnets', 'min', 'random', '--timm-models', 'mobilenetv3_large_100', '--json', str(out),
           '--output', str(tmp_path / 'ps')]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    env, rows = data['environment'], {r['case']: r for r in data['rows']}
    assert env['batch'] == 8 and env['res'] == 32 and env['amp'] == 'bf16' and env['channels_last']
    expected = [f'overhead {mode} {space} {which}' for space in ('ofa_mbv3_w12', 'ofa_resnet50')
                for which in ('min', 'random') for mode in ('train', 'eval')]
    expected += ['PS step / ideal, ofa_mbv3_w12, 4 subnets', 'timm mobilenetv3_large_100 train (img/s)']
    assert all(case in rows for case in expected), sorted(rows)
    for row in rows.values():
        assert math.isfinite(row['value']) and row['value'] > 0, row
        if row['case'].startswith(('overhead', 'PS step')):
            assert 0.1 < row['value'] < 10, row  # a ratio of two timings of the same work
    if env['reference_installed']:
        assert rows['overhead train ofa_mbv3_w12 min']['reference'] > 0
        assert 'PS step / reference PS step' in rows
    for case in expected:  # the printed table has every row
        assert case in result.stdout


@pytest.mark.slow
def test_quality_matrix_smoke(tmp_path):
    pytest.importorskip('sklearn')
    results = tmp_path / 'results.md'
    cmd = [sys.executable, str(BENCHMARKS / 'ps_quality.py'), '--model', 'ofa_mobilenetv3_small_100', '--image-size',
           '16', '--parts', 'scratch', 'pretrained', 'small', '--source-steps', '4', '--smoke', '--output',
           str(tmp_path / 'out'), '--results', str(results), '--floor-scale', '2', '--ema-decay', '0.9',
           '--alone-lr-scales', '1', '2']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    doc = results.read_text()
    # A budget-curve, EMA or other-source run has sections of its own
    for part in ('scratch', 'pretrained', 'small'):
        key = f'ps_quality:ofa_mobilenetv3_small_100:{part}:floor2:source4:ema0.9'
        assert f'<!-- {key}:begin -->' in doc and f'<!-- {key}:end -->' in doc
    assert doc.count('--floor-scale 2 --source-steps 4 --ema-decay 0.9') == 3 and doc.count('EMA 0.9 deployed') == 3
    assert 'Max within 0.5 point of the source' in doc and 'Within 2 points of each subnet alone' in doc
    assert '| PS |' in doc and 'Alone,' in doc
    # The baselines' lr is chosen on validation, per subnet, from the scales given (a line per baseline row)
    assert doc.count('lr chosen on validation from ') == 4 and doc.count(' --alone-lr-scales 1 2') == 3
    # Each part also reports the run's own weights beside their EMA: a row and a stage-end line
    shared = 'shared weights, EMA not deployed'
    assert f'| PS, {shared} |' in doc and f'| PS from the source, {shared} |' in doc
    assert doc.count(f'{shared}: ') == 3 and f'PS, {shared}: full ' in doc  # a line per part


@pytest.mark.slow
def test_keep_source_smoke(tmp_path):
    pytest.importorskip('sklearn')
    results = tmp_path / 'results.md'
    out = tmp_path / 'out'
    cmd = [sys.executable, str(BENCHMARKS / 'keep_source.py'), '--model', 'ofa_mobilenetv3_small_100', '--image-size',
           '16', '--variants', 'recipe', 'frozen KD', '--source-steps', '4', '--smoke', '--output', str(out),
           '--results', str(results)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    doc = results.read_text()
    assert '<!-- keep_source:ofa_mobilenetv3_small_100:pretrained:source4:begin -->' in doc
    assert '**Validation** top-1' in doc
    assert '--variants recipe "frozen KD" --source-steps 4`' in doc  # the command as run
    rows = [line for line in doc.splitlines() if line.startswith('| recipe |') or line.startswith('| frozen KD |')]
    assert len(rows) == 2 and all(line.count(' → ') == 3 for line in rows)  # the max at each of the four stage ends
    assert 'source trained alone' in result.stdout
    assert 'Source (the max subnet before training), validation top-1: ' in result.stdout  # the trainer's check
    again = subprocess.run(cmd[:-2] + ['--results', str(results), '--variants', 'kernel lr x0.5', '--start', 'scratch',
                                       '--floor-scale', '0.5', '--resolutions', '12', '16'],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'source trained alone' not in again.stdout  # the scratch start trains the full stage instead
    assert 'full stage:' in again.stdout
    doc = results.read_text()
    # Another floor or resolutions: a section of its own, beside the default one's
    assert '<!-- keep_source:ofa_mobilenetv3_small_100:scratch:floor0.5:res12-16:source4:begin -->' in doc
    assert "the full stage's max subnet scores" in doc and '| kernel lr x0.5 |' in doc
    assert '--start scratch --variants "kernel lr x0.5" --floor-scale 0.5 --resolutions 12 16 --source-steps 4`' in doc
    # and a title of its own, so that each section has its own anchor
    assert ('### Keeping the full stage: `ofa_mobilenetv3_small_100`, scratch, '
            '`--floor-scale 0.5 --resolutions 12 16 --source-steps 4`' in doc)
    assert '### Keeping the source: `ofa_mobilenetv3_small_100`, pretrained, `--source-steps 4`\n' in doc
    # The source is trained once, and a later run with the same settings reuses it.
    reuse = subprocess.run(cmd[:-2] + ['--results', '', '--variants', 'recipe'], capture_output=True, text=True,
                           timeout=600)
    assert reuse.returncode == 0, reuse.stderr[-3000:]
    assert 'source trained alone' not in reuse.stdout and 'pretrained start:' in reuse.stdout


def test_bench_resolutions_must_end_at_the_image_size(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / 'ps_quality.py'), '--image-size', '16', '--resolutions', '12', '20',
           '--output', str(tmp_path), '--results', '']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert '--resolutions must be positive, ascending, without repeats, and end at the image size (16)' in result.stderr


def test_bench_section_names_the_seed_and_source_steps():
    """A section's command line and key carry every setting that changes the data split or the source, so that a
    rerun reproduces it and a run at another seed keeps its own section."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from ps_quality import SOURCE_STEPS, setting_flags, setting_key
    finally:
        sys.path.remove(str(BENCHMARKS))
    default = argparse.Namespace(floor_scale=1.0, floor_weight=None, resolutions=None, source_steps=SOURCE_STEPS,
                                 seed=0)
    assert setting_flags(default) == '' and setting_key(default) == ''
    other = argparse.Namespace(floor_scale=0.5, floor_weight=None, resolutions=[24], source_steps=SOURCE_STEPS + 1,
                               seed=1)
    assert setting_flags(other) == f' --floor-scale 0.5 --resolutions 24 --source-steps {SOURCE_STEPS + 1} --seed 1'
    assert setting_key(other) == f':floor0.5:res24:source{SOURCE_STEPS + 1}:seed1'
