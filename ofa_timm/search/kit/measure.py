"""Measure an ofa_timm latency kit on this device. Needs only Python >= 3.8, numpy and onnxruntime.

    python measure.py                      # CPU execution provider, onnxruntime's default threads
    python measure.py --provider cuda      # or tensorrt, coreml, nnapi, openvino, qnn, directml, or a full EP name
    python measure.py --threads 4 --out my_results.json
    python measure.py --part validation    # later: the held-out subnets alone, for an error measured apart in time
    python measure.py --list-providers

It times every block model of the kit (the distinct block computations of a supernet's space, and its stem and head)
and the whole calibration and validation subnets, and writes ``results.json``: the device's description and each
model's median latency in milliseconds. Bring that file back and import it with
``ofa-timm latency import results.json --out table.json``.

The kit ships graphs without weights: latency does not depend on weight values, and a kit made from a trained
supernet carries nothing of it. Before a model is timed, its weights are drawn here (seeded, with the value range the
kit records for each tensor), written next to a copy of the graph in a temporary folder and loaded from there as
ONNX external data, so the runtime folds and pre-packs them exactly as it would real weights.

Each model is warmed up, then timed ``--repeats`` times (a sample repeats the call until it lasts ``--min-sample-ms``),
and its median kept. After every model has been timed once, a second pass times each again and keeps the smaller
median: a slow spell of the device (another app, a thermal limit) only ever adds time. ``results.json`` is rewritten
after every model, so an interrupted run (a phone that went to sleep) continues where it stopped when started again
with the same options.
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

RESULTS_FORMAT = 'ofa_timm.latency_kit_results.v1'
KIT_FORMAT = 'ofa_timm.latency_kit.v1'
PARTS = ('blocks', 'calibration', 'validation')
PROVIDERS = {
    'cpu': 'CPUExecutionProvider', 'cuda': 'CUDAExecutionProvider', 'tensorrt': 'TensorrtExecutionProvider',
    'coreml': 'CoreMLExecutionProvider', 'nnapi': 'NnapiExecutionProvider', 'openvino': 'OpenVINOExecutionProvider',
    'qnn': 'QNNExecutionProvider', 'directml': 'DmlExecutionProvider', 'rocm': 'ROCMExecutionProvider',
    'xnnpack': 'XnnpackExecutionProvider', 'acl': 'ACLExecutionProvider',
}


class KitError(Exception):
    """Something the user can fix: a changed kit, a provider this onnxruntime lacks, results of other settings."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def results_checksum(results):
    """sha256 of the results without their ``checksum`` field, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in results.items() if k != 'checksum'}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def load_kit(kit_dir):
    path = os.path.join(kit_dir, 'manifest.json')
    try:
        with open(path, 'rb') as f:
            raw = f.read()
        manifest = json.loads(raw.decode())
    except (OSError, ValueError) as e:
        raise KitError('Cannot read the kit manifest {}: {}'.format(path, e))
    if manifest.get('format') != KIT_FORMAT:
        raise KitError('{} is not an ofa_timm latency kit manifest (format {})'.format(path, KIT_FORMAT))
    return manifest, hashlib.sha256(raw).hexdigest()


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key = line.split(':', 1)[0].strip().lower()
                if key in ('model name', 'hardware', 'processor', 'cpu model') and ':' in line:
                    value = line.split(':', 1)[1].strip()
                    if value and not value.isdigit():
                        return value
    except OSError:
        pass
    if sys.platform == 'darwin':
        try:
            import subprocess
            return subprocess.check_output(['sysctl', '-n', 'machdep.cpu.brand_string'], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return platform.processor() or platform.machine()


def device_info(ort, provider, threads):
    return {
        'platform': platform.platform(), 'machine': platform.machine(), 'cpu': cpu_name(),
        'cpu_count': os.cpu_count(), 'python': platform.python_version(), 'numpy': np.__version__,
        'onnxruntime': ort.__version__, 'provider': provider, 'threads': threads,
    }


def resolve_provider(ort, name):
    full = PROVIDERS.get(name.lower(), name)
    available = ort.get_available_providers()
    if full not in available:
        raise KitError('This onnxruntime ({}) has no {}; it has {}. Install the onnxruntime build for that provider '
                       '(e.g. onnxruntime-gpu for CUDA and TensorRT, onnxruntime-openvino, onnxruntime-qnn).'
                       .format(ort.__version__, full, ', '.join(available)))
    return full


def materialise(model, kit_dir, folder, seed):
    """Copy the model's graph into ``folder`` and draw its weights next to it; returns the graph's path there."""
    graph = os.path.join(folder, os.path.basename(model['file']))
    shutil.copyfile(os.path.join(kit_dir, model['file']), graph)
    weights = model.get('weights')
    if weights:
        buffer = np.zeros(weights['size'], dtype=np.uint8)
        for i, t in enumerate(weights['tensors']):
            rng = np.random.default_rng([seed, i])
            if t.get('dtype', 'float32') == 'int8':  # a QDQ graph's quantized weights
                values = rng.normal(t['mean'], t['std'] or 0.0, size=t['length']).round().clip(
                    t['min'], t['max']).astype(np.int8)
            else:
                n = t['length'] // 4
                values = rng.normal(t['mean'], t['std'] or 0.0, size=n).clip(t['min'], t['max']).astype('<f4')
            buffer[t['offset']:t['offset'] + t['length']] = values.view(np.uint8)
        buffer.tofile(os.path.join(folder, weights['file']))
    return graph


class Timer:
    def __init__(self, session, feed):
        self.session, self.feed = session, feed

    def sample(self, number):
        t0 = time.perf_counter()
        for _ in range(number):
            self.session.run(None, self.feed)
        return (time.perf_counter() - t0) * 1e3 / number

    def measure(self, warmup, repeats, min_sample_ms):
        for _ in range(warmup):
            self.session.run(None, self.feed)
        once = self.sample(1)
        number = max(1, int(-(-min_sample_ms // max(once, 1e-6))))
        samples = sorted(self.sample(number) for _ in range(repeats))
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        return statistics.median(samples), q[2] - q[0]


def measure_model(ort, model, kit_dir, provider, threads, args):
    with tempfile.TemporaryDirectory(prefix='ofa_kit_') as folder:
        path = materialise(model, kit_dir, folder, args.seed)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=[provider])
        x = np.random.default_rng(0).standard_normal(model['input']).astype(np.float32)
        feed = {session.get_inputs()[0].name: x}
        return Timer(session, feed).measure(args.warmup, args.repeats, args.min_sample_ms)


def write_atomic(path, data):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    """A bar on a terminal, a line every 15 s otherwise (a log file, a phone's shell in the background)."""

    def __init__(self, total, done):
        self.total, self.done, self.base = total, done, done
        self.start, self.last = time.time(), 0.0
        self.tty = sys.stdout.isatty()

    def update(self, label):
        self.done += 1
        now = time.time()
        if not self.tty and now - self.last < 15 and self.done < self.total:
            return
        self.last = now
        left = (now - self.start) / (self.done - self.base) * (self.total - self.done)
        line = '[{:5d}/{:5d}] {}  ~{:.0f} s left'.format(self.done, self.total, label[:60], left)
        print(('\r' + line.ljust(100)) if self.tty else line, end='' if self.tty else '\n', flush=True)

    def close(self):
        if self.tty:
            print(flush=True)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--kit', default=here, help='kit folder (default: the folder of this script)')
    p.add_argument('--out', default=None, help='results file (default: KIT/results.json)')
    p.add_argument('--provider', default='cpu', help='execution provider: ' + ', '.join(PROVIDERS) +
                   ', or a full name such as CPUExecutionProvider')
    p.add_argument('--threads', type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    p.add_argument('--part', nargs='+', choices=PARTS + ('all',), default=['blocks', 'calibration'],
                   help='what to measure (default: blocks and calibration; validation later, apart in time)')
    p.add_argument('--warmup', type=int, default=10, help='untimed calls per model')
    p.add_argument('--repeats', type=int, default=30, help='timed samples per model (median)')
    p.add_argument('--min-sample-ms', type=float, default=1.0, help='a sample repeats the call this long')
    p.add_argument('--passes', type=int, default=2, help='passes over the models; the smallest median is kept')
    p.add_argument('--seed', type=int, default=0, help='seed of the drawn weights')
    p.add_argument('--list-providers', action='store_true', help="print this onnxruntime's providers and exit")
    p.add_argument('--write-graphs', default=None, metavar='DIR',
                   help='write every graph with its drawn weights into DIR (for another runtime to time) and exit')
    args = p.parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        print('measure.py needs onnxruntime: pip install onnxruntime (or the build for your accelerator)',
              file=sys.stderr)
        return 2
    if args.list_providers:
        print('\n'.join(ort.get_available_providers()))
        return 0
    try:
        if args.write_graphs:
            return write_graphs(args)
        return run(ort, args)
    except KitError as e:
        print('measure.py: error: {}'.format(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('\nmeasure.py: interrupted; run the same command again to continue', file=sys.stderr)
        return 130


def write_graphs(args):
    """Every graph of the kit with its weights drawn, for runtimes other than onnxruntime (trtexec, benchmark_app,
    a TFLite converter): ``DIR/<file>.onnx`` next to its ``.weights`` file."""
    manifest, _ = load_kit(args.kit)
    for m in manifest['models']:
        folder = os.path.join(args.write_graphs, os.path.dirname(m['file']))
        os.makedirs(folder, exist_ok=True)
        materialise(m, args.kit, folder, args.seed)
    print('Wrote {} graphs with their weights into {}'.format(len(manifest['models']), args.write_graphs))
    return 0


def run(ort, args):
    kit_dir = args.kit
    manifest, kit_id = load_kit(kit_dir)
    parts = PARTS if 'all' in args.part else tuple(args.part)
    models = [m for m in manifest['models'] if m['part'] in parts]
    provider = resolve_provider(ort, args.provider)
    out = args.out or os.path.join(kit_dir, 'results.json')
    settings = {'warmup': args.warmup, 'repeats': args.repeats, 'min_sample_ms': args.min_sample_ms,
                'passes': args.passes, 'seed': args.seed}
    device = device_info(ort, provider, args.threads)
    results = {'format': RESULTS_FORMAT, 'kit': kit_id, 'model': manifest['model'],
               'batch_size': manifest['batch_size'], 'device': device, 'settings': settings, 'runs': [],
               'measurements': {}}
    if os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        if old.get('kit') != kit_id:
            raise KitError('{} holds results of another kit; pass another --out'.format(out))
        differ = [k for k in ('provider', 'threads', 'platform', 'cpu', 'onnxruntime')
                  if old['device'].get(k) != device[k]] + [k for k in settings if old['settings'].get(k) != settings[k]]
        if differ:
            raise KitError('{} was measured with other settings ({}); pass the same options to continue it, or '
                           'another --out'.format(out, ', '.join('{}: {!r}'.format(k, old['device'].get(
                               k, old['settings'].get(k))) for k in differ)))
        results = old
    for m in models:  # a changed kit would time something else than the manifest describes
        if sha256_file(os.path.join(kit_dir, m['file'])) != m['sha256']:
            raise KitError('{} does not match its checksum in manifest.json: the kit was changed after it was made; '
                           'make it again with ofa-timm latency kit'.format(m['file']))
    measured = results['measurements']
    todo = [(p, m) for p in range(args.passes) for m in models
            if len(measured.get(m['id'], {}).get('passes', [])) <= p]
    if not todo:
        print('Nothing left to measure in {} ({} models).'.format(out, len(models)))
        return 0
    run_id = len(results['runs'])
    results['runs'].append({'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'parts': list(parts)})
    print('Measuring {} models ({}) of kit {} on {} with {}, {} threads'.format(
        len(models), ', '.join(parts), kit_id[:12], device['cpu'], provider, args.threads or 'default'), flush=True)
    progress = Progress(len(models) * args.passes, len(models) * args.passes - len(todo))
    try:
        for _, m in todo:
            ms, iqr = measure_model(ort, m, kit_dir, provider, args.threads, args)
            entry = measured.setdefault(m['id'], {'part': m['part'], 'passes': []})
            entry['passes'].append({'ms': ms, 'iqr': iqr, 'run': run_id, 'at': time.time()})
            entry['ms'] = min(p['ms'] for p in entry['passes'])
            results['runs'][run_id]['ended'] = time.strftime('%Y-%m-%dT%H:%M:%S%z')
            results['checksum'] = results_checksum(results)
            write_atomic(out, results)
            progress.update('{} {:.3f} ms'.format(m['id'], ms))
    finally:
        progress.close()
    print('Wrote {}. Import it where ofa_timm is installed: ofa-timm latency import {} --out table.json'.format(
        out, out))
    if 'validation' not in parts and any(m['part'] == 'validation' and m['id'] not in measured
                                         for m in manifest['models']):
        print('Later (another time, so that the error is measured apart from the table), measure the held-out '
              'subnets with the same options: python measure.py --part validation')
    return 0


if __name__ == '__main__':
    sys.exit(main())
