"""The portable latency kit: made here, measured by its standalone measure.py (no torch, no ofa_timm), imported back."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.cli import main
from ofa_timm.search import LatencyTable, specialize
from ofa_timm.search.kit import import_kit_results, make_kit
from ofa_timm.search.kit.measure import results_checksum

pytest.importorskip('onnxruntime')
MODEL = 'ofa_mobilenetv3_small_100'

# A Python whose `import torch` (and `import ofa_timm`) fails: what a phone or a Raspberry Pi without PyTorch has.
BLOCK = '''
import builtins, sys
_real = builtins.__import__
def _guard(name, *args, **kwargs):
    if name.split('.')[0] in ('torch', 'ofa_timm', 'timm'):
        raise ImportError(f'{name} is not installed on this device')
    return _real(name, *args, **kwargs)
builtins.__import__ = _guard
'''


@pytest.fixture(scope='module')
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp('kit')
    supernet = timm.create_model(MODEL, num_classes=4, resolutions=(32, 48))
    return make_kit(supernet, root / 'kit', calibrate=4, validate=3, progress=False), supernet


def measure(kit_dir, *args, timeout=600, **popen):
    """Run the kit's measure.py in a Python where torch, timm and ofa_timm cannot be imported."""
    site = kit_dir.parent / 'sitecustomize_dir'
    site.mkdir(exist_ok=True)
    (site / 'sitecustomize.py').write_text(BLOCK)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE='1')
    cmd = [sys.executable, str(kit_dir / 'measure.py'), '--threads', '1', '--warmup', '1', '--repeats', '3',
           '--min-sample-ms', '0.1', *args]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=str(kit_dir.parent), **popen)
    return subprocess.run(cmd, env=env, cwd=str(kit_dir.parent), capture_output=True, text=True, timeout=timeout)


def test_kit_holds_graphs_without_weights_and_a_manifest(kit):
    kit_dir, supernet = kit
    manifest = json.loads((kit_dir / 'manifest.json').read_text())
    table = LatencyTable.from_dict(dict(manifest['table'], meta={}))
    assert table.space == supernet.space
    blocks = [m for m in manifest['models'] if m['part'] == 'blocks']
    assert sorted(m['id'] for m in blocks) == sorted(e['id'] for e in table.entries)  # every entry, stem and head
    assert [m['part'] for m in manifest['models']].count('calibration') == 4
    assert [m['part'] for m in manifest['models']].count('validation') == 3
    size = sum(f.stat().st_size for f in kit_dir.rglob('*') if f.is_file())
    weights = sum(4 * np.prod(t['shape']) for m in manifest['models'] for t in (m['weights'] or {}).get('tensors', []))
    assert size < weights / 20, (size, weights)  # the graphs carry no weights: measure.py draws them
    assert (kit_dir / 'measure.py').is_file() and (kit_dir / 'README.txt').is_file()


@pytest.mark.slow
def test_measure_runs_without_torch_and_imports_into_a_table_that_fits_its_calibration(kit, tmp_path):
    kit_dir, supernet = kit
    done = measure(kit_dir, '--part', 'all', '--out', str(tmp_path / 'results.json'))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['device']['provider'] == 'CPUExecutionProvider' and results['device']['onnxruntime']
    assert all(len(m['passes']) == 2 and m['ms'] == min(p['ms'] for p in m['passes'])
               for m in results['measurements'].values())
    table = import_kit_results(tmp_path / 'results.json', kit=kit_dir)
    assert table.complete and table.meta['kit'] and table.validation['n'] == 3
    assert not table.validation['apart']  # validation measured in the same run as the calibration
    cal = table.calibration
    measured = np.array(cal['measured_ms'])
    # After the fit, the table predicts its calibration subnets' measured times.
    predicted = table(table.space.encode([supernet.space.validate(s) for s in cal['subnets']]))
    assert np.median(np.abs(predicted - measured) / measured) < 0.25
    result = specialize(supernet, lambda codes: np.zeros(len(codes)), {'latency': table},
                        [float(np.median(measured))])[0]  # the table plugs into the search
    assert result.costs['latency'] <= np.median(measured)
    # and into the CLI
    assert main(['latency', 'import', str(tmp_path / 'results.json'), '--kit', str(kit_dir), '--out',
                 str(tmp_path / 'table.json')]) == 0
    assert LatencyTable.load(tmp_path / 'table.json', space=supernet.space).meta['provider'] == 'CPUExecutionProvider'


@pytest.mark.slow
def test_validation_measured_in_a_later_run_is_marked_apart(kit, tmp_path):
    kit_dir, _ = kit
    out = str(tmp_path / 'r.json')
    assert measure(kit_dir, '--out', out).returncode == 0  # blocks and calibration
    table = import_kit_results(out, kit=kit_dir)
    assert table.validation is None  # not measured yet
    done = measure(kit_dir, '--part', 'validation', '--out', out)
    assert done.returncode == 0, done.stderr
    table = import_kit_results(out, kit=kit_dir)
    assert table.validation['apart'] and table.validation['n'] == 3


@pytest.mark.slow
def test_interrupted_measure_continues_where_it_stopped(kit, tmp_path):
    kit_dir, _ = kit
    out = tmp_path / 'r.json'
    proc = measure(kit_dir, '--out', str(out), '--repeats', '20', stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and len(json.loads(out.read_text())['measurements']) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b'run the same command again to continue' in err
    partial = json.loads(out.read_text())
    done_before = {k for k, m in partial['measurements'].items() if len(m['passes']) >= 1}
    assert 5 <= len(done_before) < 2 * len(json.loads((kit_dir / 'manifest.json').read_text())['models'])
    again = measure(kit_dir, '--out', str(out), '--repeats', '20')
    assert again.returncode == 0, again.stderr
    final = json.loads(out.read_text())
    for k in done_before:  # kept, not measured again
        assert final['measurements'][k]['passes'][0] == partial['measurements'][k]['passes'][0]
    assert len(final['runs']) == 2
    import_kit_results(out, kit=kit_dir)


def test_mismatched_and_tampered_results_are_refused(kit, tmp_path):
    kit_dir, supernet = kit
    manifest = json.loads((kit_dir / 'manifest.json').read_text())
    results = {'format': 'ofa_timm.latency_kit_results.v1', 'kit': 'x' * 64, 'model': MODEL, 'batch_size': 1,
               'device': {'provider': 'CPUExecutionProvider', 'cpu': 'test', 'platform': 'test', 'threads': 1,
                          'onnxruntime': '1', 'python': '3', 'numpy': '2'},
               'settings': {}, 'runs': [{}],
               'measurements': {m['id']: {'part': m['part'], 'ms': 1.0, 'passes': [{'ms': 1.0, 'run': 0}]}
                                for m in manifest['models']}}
    path = tmp_path / 'results.json'

    def write(data):
        data = dict(data)
        data['checksum'] = results_checksum(data)
        path.write_text(json.dumps(data))

    write(results)
    with pytest.raises(ValueError, match='another kit'):
        import_kit_results(path, kit=kit_dir)
    from ofa_timm.search.kit.measure import load_kit
    results['kit'] = load_kit(str(kit_dir))[1]
    write(results)
    assert import_kit_results(path, kit=kit_dir).complete  # a well-formed file imports
    tampered = json.loads(path.read_text())
    first = next(iter(tampered['measurements']))
    tampered['measurements'][first]['ms'] = 0.5
    path.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match='changed after it was written'):
        import_kit_results(path, kit=kit_dir)
    missing = dict(results, measurements={k: v for k, v in results['measurements'].items() if k != first})
    write(missing)
    with pytest.raises(ValueError, match='lacks 1 of'):
        import_kit_results(path, kit=kit_dir)
    assert main(['latency', 'import', str(path), '--kit', str(kit_dir), '--out', str(tmp_path / 't.json')]) == 2


@pytest.mark.slow
def test_measure_refuses_a_changed_kit_and_an_unknown_provider(kit, tmp_path):
    kit_dir, _ = kit
    copy = tmp_path / 'kit'
    import shutil
    shutil.copytree(kit_dir, copy)
    done = measure(copy, '--provider', 'tensorrt')
    assert done.returncode == 2 and 'has no TensorrtExecutionProvider' in done.stderr
    graph = next((copy / 'blocks').glob('*.onnx'))
    graph.write_bytes(graph.read_bytes() + b'\0')
    done = measure(copy)
    assert done.returncode == 2 and 'does not match its checksum' in done.stderr


def test_drawn_weights_give_finite_outputs_and_graphs_can_be_written_for_other_runtimes(kit, tmp_path):
    """The weights measure.py draws keep each tensor's recorded range: whole subnets run without NaN or inf (a
    runtime's speed on NaNs or denormals would not be the model's), and --write-graphs hands them to other tools."""
    import onnxruntime as ort
    from ofa_timm.search.kit import measure as measure_module
    kit_dir, _ = kit
    assert measure_module.main(['--kit', str(kit_dir), '--write-graphs', str(tmp_path / 'graphs')]) == 0
    manifest = json.loads((kit_dir / 'manifest.json').read_text())
    for m in manifest['models'][-5:] + manifest['models'][:3]:  # whole subnets and the first blocks
        path = tmp_path / 'graphs' / m['file']
        assert path.is_file() and (not m['weights'] or (path.parent / m['weights']['file']).is_file())
        session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        x = np.random.default_rng(0).standard_normal(m['input']).astype(np.float32)
        out = session.run(None, {session.get_inputs()[0].name: x})[0]
        assert np.isfinite(out).all() and np.abs(out).max() < 1e6, m['id']
