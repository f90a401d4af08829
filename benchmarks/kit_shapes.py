"""Latency kit: does one ONNX model with a dynamic spatial size time the same on ONNX Runtime as a model made for each
input size? And how large is the kit?

For a sample of the block computations of ``ofa_mbv3_w12`` at the reference's five resolutions (160-224, step 16),
each block is exported twice: once per input size (fixed shapes, what a deployed subnet is), once with dynamic height
and width. Both are timed at every input size with ONNX Runtime's CPU provider, interleaved (fixed, dynamic, fixed,
...; the order flips every round), and the ratio dynamic / fixed is reported per block and size. Then the kit of the
whole space is made and its size reported next to what the same graphs would weigh with their weights inside.

Usage: python benchmarks/kit_shapes.py [--blocks 24] [--threads 2] [--rounds 6] [--kit /tmp/kit_w12]
"""
import argparse
import io
import json
import statistics
import sys
import time
import warnings

import numpy as np
import timm
import torch
import torch.nn as nn

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.search.cost import BlockLayout
from ofa_timm.search.kit import make_kit
from ofa_timm.search.latency import LatencySettings, entry_modules, plan_entries

RESOLUTIONS = (160, 176, 192, 208, 224)


def export(module: nn.Module, shape, dynamic: bool) -> bytes:
    buffer = io.BytesIO()
    axes = {'input': {2: 'h', 3: 'w'}} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        torch.onnx.export(module.eval(), (torch.randn(*shape),), buffer, dynamo=False, input_names=['input'],
                          output_names=['output'], dynamic_axes=axes)
    return buffer.getvalue()


def session(ort, graph: bytes, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(graph, options, providers=['CPUExecutionProvider'])


def sample_ms(sess, x, number: int) -> float:
    feed = {'input': x}
    t0 = time.perf_counter()
    for _ in range(number):
        sess.run(None, feed)
    return (time.perf_counter() - t0) * 1e3 / number


def main() -> None:
    import onnxruntime as ort
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--blocks', type=int, default=24, help='block computations sampled')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--kit', default='/tmp/kit_w12', help='where to make the kit whose size is reported')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    supernet = timm.create_model('ofa_mbv3_w12', resolutions=RESOLUTIONS).eval()
    layout = BlockLayout.from_supernet(supernet)
    entries, sources, _ = plan_entries(layout, LatencySettings('onnxruntime', 1))
    # one entry per distinct computation (key), then all the input sizes of the sampled keys
    by_key = {}
    for i, e in enumerate(entries):
        by_key.setdefault(e['id'].split('@')[0], []).append(i)
    rng = np.random.default_rng(args.seed)
    keys = sorted(by_key)
    chosen = [keys[k] for k in rng.choice(len(keys), size=min(args.blocks, len(keys)), replace=False)]
    wanted = sorted(i for k in chosen for i in by_key[k])
    modules = dict(entry_modules(supernet, layout, sources, wanted))
    ratios, rows = [], []
    for key in chosen:
        first = by_key[key][0]
        module = modules[first]
        dynamic = session(ort, export(module, entries[first]['input'], True), args.threads)
        for i in by_key[key]:
            shape = entries[i]['input']
            fixed = session(ort, export(module, shape, False), args.threads)
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            for s in (fixed, dynamic):  # warm up, and size a sample to about 2 ms
                for _ in range(5):
                    s.run(None, {'input': x})
            number = max(1, int(2.0 / max(sample_ms(fixed, x, 1), 1e-3)))
            times = {'fixed': [], 'dynamic': []}
            for r in range(args.rounds):
                order = ('fixed', 'dynamic') if r % 2 == 0 else ('dynamic', 'fixed')
                for name in order:
                    times[name].append(sample_ms(fixed if name == 'fixed' else dynamic, x, number))
            ratio = statistics.median(times['dynamic']) / statistics.median(times['fixed'])
            ratios.append(ratio)
            rows.append((entries[i]['desc'], statistics.median(times['fixed']), ratio))
            print(f'{entries[i]["desc"]:60s} fixed {rows[-1][1]:.3f} ms, dynamic / fixed {ratio:.3f}', flush=True)
    q = np.percentile(ratios, [10, 50, 90])
    print(f'\n{len(ratios)} block entries ({len(chosen)} computations x their input sizes), ONNX Runtime '
          f'{ort.__version__} CPU, {args.threads} threads: dynamic / fixed median {q[1]:.3f} (10th-90th percentile '
          f'{q[0]:.3f}-{q[2]:.3f}, max {max(ratios):.3f}, min {min(ratios):.3f})')
    tick = time.time()
    kit = make_kit(supernet, args.kit, batch_size=1, calibrate=10, validate=30, progress=False)
    size = sum(f.stat().st_size for f in kit.rglob('*') if f.is_file())
    manifest = json.loads((kit / 'manifest.json').read_text())
    weights = sum(m['weights']['size'] for m in manifest['models'] if m['weights'])
    blocks = sum(m['weights']['size'] for m in manifest['models'] if m['weights'] and m['part'] == 'blocks')
    per_key = {m['id'].split('@')[0]: m['weights']['size'] for m in manifest['models']
               if m['weights'] and m['part'] == 'blocks'}
    keys_only = sum(per_key.values())
    print(f'Kit of ofa_mbv3_w12 at {len(RESOLUTIONS)} resolutions, batch 1 ({len(manifest["models"])} graphs: '
          f'{len(entries)} block entries, 10 calibration and 30 validation subnets): {size / 1e6:.1f} MB, made in '
          f'{time.time() - tick:.0f} s. With their weights inside, the same graphs would weigh {weights / 1e6:.0f} '
          f'MB ({blocks / 1e6:.0f} MB of block models with a fixed size each, {keys_only / 1e6:.0f} MB with one '
          f'dynamic-size model per computation).')
    print(f'Done in {time.time() - start:.0f} s', file=sys.stderr)


if __name__ == '__main__':
    main()
