"""Latency tables: built as they are measured, resumed after an interrupt, tied to one space and one setting."""
import json

import numpy as np
import pytest
import timm
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
import ofa_timm.search.latency as latency
from ofa_timm.search import LatencySettings, LatencyTable, build_latency_table, validate_latency_table

FAST = dict(warmup=1, repeats=3, min_sample_ms=0.05)


@pytest.fixture(scope='module')
def supernet():
    torch.manual_seed(0)
    return timm.create_model('ofa_mobilenetv3_small_100', num_classes=4, resolutions=(32,)).eval()


@pytest.fixture(scope='module')
def table_path(supernet, tmp_path_factory):
    path = tmp_path_factory.mktemp('latency') / 'table.json'
    build_latency_table(supernet, path, LatencySettings(threads=1, **FAST), calibrate=3, progress=False)
    return path


def test_round_trip_and_lookup(supernet, table_path):
    table = LatencyTable.load(table_path, space=supernet.space)
    assert table.complete and table.meta['backend'] == 'torch-cpu' and table.meta['threads'] == 1
    assert {'torch', 'timm', 'ofa_timm'} <= set(table.meta['versions']) and table.meta['device']
    assert table.calibration['scale'] > 0 and len(table.calibration['subnets']) == 3
    ms = {e['id']: e['ms'] for e in table.entries}
    space = supernet.space
    subnets = [space.min(), space.max()] + [space.sample(i) for i in range(20)]
    expected = [sum(ms[latency._entry_id(b, b.input_size(s.resolution))] for b in supernet.describe(s))
                for s in subnets]
    assert np.allclose(table.raw(space.encode(subnets)), expected)
    cal = table.calibration
    assert np.allclose(table(subnets), np.array(expected) * cal['scale'] + cal['offset'])
    assert table.minimum()[0] <= table(subnets).min() + 1e-9


def test_resume_after_an_interrupt(supernet, tmp_path, monkeypatch):
    path = tmp_path / 'table.json'
    real, calls, resumed = latency._median_ms, [], []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 6 and not resumed:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(latency, '_median_ms', interrupted)
    settings = LatencySettings(threads=1, **FAST)
    with pytest.raises(KeyboardInterrupt):
        build_latency_table(supernet, path, settings, calibrate=0, progress=False)
    partial = LatencyTable.load(path)
    assert not partial.complete and sum(e['ms'] is not None for e in partial.entries) == 5
    with pytest.raises(ValueError, match='incomplete'):
        partial(supernet.space.max())
    calls.clear()
    resumed.append(True)
    table = build_latency_table(supernet, path, settings, calibrate=0, progress=False)
    # only what was missing was measured: the first pass of all but 5 entries, then the second pass of every entry
    assert table.complete and len(calls) == 2 * len(table.entries) - 5
    assert all(len(e['passes']) == 2 and e['ms'] == min(e['passes']) for e in table.entries)
    assert table.calibration is None and np.all(table(supernet.space.max()) > 0)


def test_a_table_refuses_another_space_or_other_settings(supernet, table_path):
    other = timm.create_model('ofa_mobilenetv3_small_100', num_classes=4, resolutions=(32, 40))
    with pytest.raises(ValueError, match='another space'):
        LatencyTable.load(table_path, space=other.space)
    with pytest.raises(ValueError, match='another space'):
        build_latency_table(other, table_path, LatencySettings(threads=1, **FAST), progress=False)
    with pytest.raises(ValueError, match='other settings.*batch_size'):
        build_latency_table(supernet, table_path, LatencySettings(batch_size=2, threads=1, **FAST), progress=False)
    with pytest.raises(ValueError, match='another space'):
        validate_latency_table(LatencyTable.load(table_path), other, 1, progress=False)
    bad = table_path.parent / 'bad.json'
    bad.write_text(json.dumps({'format': 'something else'}))
    with pytest.raises(ValueError, match='not an ofa_timm latency table'):
        LatencyTable.load(bad)


def test_validation_reports_errors(supernet, table_path):
    table = LatencyTable.load(table_path)
    result = validate_latency_table(table, supernet, n=3, progress=False, rounds=1)
    assert result['n'] == 3 and len(result['rows']) == 3
    calibration = {json.dumps(s, sort_keys=True) for s in table.calibration['subnets']}
    assert not calibration & {json.dumps(r['subnet'], sort_keys=True) for r in result['rows']}  # held out
    row = result['rows'][0]
    assert row['error_pct'] == pytest.approx(100 * (row['predicted_ms'] / row['measured_ms'] - 1), abs=0.02)
    assert result['max_abs_pct'] >= result['median_abs_pct'] >= 0
    assert result['apart'] and 0 <= result['within_10_pct'] <= 100
    # the calibration subnets measured again give the drift since the build, and the error rescaled by it
    anchors = result['anchors']
    assert 1 <= anchors <= len(calibration) and result['drift'] > 0
    assert set(result['rescaled']) == {'median_abs_pct', 'max_abs_pct', 'within_10_pct'}
    assert table.validation is result
    from ofa_timm.search import validation_summary
    assert 'later, separate run' in validation_summary(result) and 'drift since the build' in validation_summary(result)


def test_settings_and_backends_are_checked(supernet, tmp_path):
    with pytest.raises(ValueError, match='Unknown latency backend'):
        LatencySettings('tensorrt')
    with pytest.raises(ValueError, match='torch-cpu and torch-cuda backends only'):
        LatencySettings('onnxruntime', amp='bf16')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='needs a CUDA device'):
            build_latency_table(supernet, tmp_path / 'cuda.json', LatencySettings('torch-cuda', **FAST),
                                progress=False)


def test_bf16_channels_last_and_onnxruntime_backends(supernet, tmp_path):
    pytest.importorskip('onnxruntime')
    for name, settings in (('bf16', LatencySettings(threads=1, amp='bf16', channels_last=True, **FAST)),
                           ('ort', LatencySettings('onnxruntime', threads=1, **FAST))):
        table = build_latency_table(supernet, tmp_path / f'{name}.json', settings, calibrate=2, progress=False)
        assert table.complete and table.meta['dtype'] == settings.dtype
        assert np.all(table([supernet.space.min(), supernet.space.max()]) > 0)
    assert 'onnxruntime' in table.meta['versions']
