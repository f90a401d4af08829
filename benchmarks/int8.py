"""INT8 against FP32 on ONNX Runtime's CPU provider: latency of the min, mid and max subnets, and test top-1.

``latency``: for each ``--models`` supernet (random weights: the weights' values do not change the time), the min,
mid and max subnets are extracted, exported to an FP32 ONNX graph and quantized to a QDQ graph (per-channel weights,
activations calibrated on random images by min and max; ``int8`` and ``uint8`` activations). The graphs of one subnet
are timed interleaved, ``--rounds`` rounds of ``--runs`` runs each with the order rotating every round; each round's
median gives a ratio to the FP32 graph of the same round, so a slow spell of the machine cancels out. Reported: the
median time of each graph and the median (min-max) of the per-round ratios.

``accuracy``: the trained supernet of an ``ofa-timm run`` / ``ofa-timm demo`` folder (``--run``, its data with
``--data-dir``, the split the run carved): the min, mid and max subnets, BN-recalibrated on training images, as FP32
and as INT8 graphs for each calibration method and size in ``--methods`` / ``--images``. Top-1 is given on the
validation split (what a default would be chosen on) and on the test split (reported, never chosen on).

Usage:
    python benchmarks/int8.py latency --models ofa_mobilenetv3_large_100 ofa_efficientnet_b0 --resolution 224
    python benchmarks/int8.py accuracy --run ofa_timm_demo/run --data-dir ofa_timm_demo/data
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.search.export import load_supernet
from ofa_timm.search.quantize import QuantizeConfig, cpu_session, onnx_bytes, quantize_onnx

SUBNETS = ('min', 'mid', 'max')


def _subnets(space) -> Dict[str, Any]:
    return {'min': space.min(), 'mid': space.mid(), 'max': space.max()}


def time_graphs(graphs: Dict[str, bytes], shape, rounds: int, runs: int, threads: int) -> Dict[str, Dict[str, float]]:
    """Median time (ms) of each graph, and its per-round ratio to the first graph, timed interleaved."""
    sessions = {k: cpu_session(g, threads, timing=True) for k, g in graphs.items()}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    names = list(sessions)
    per_round = {k: [] for k in names}
    for k in names:  # warm-up
        for _ in range(3):
            sessions[k].run(None, feeds[k])
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times.append(time.perf_counter() - t)
            per_round[k].append(1e3 * statistics.median(times))
    base = names[0]
    out = {}
    for k in names:
        ratios = [a / b for a, b in zip(per_round[k], per_round[base])]
        out[k] = dict(ms=statistics.median(per_round[k]), ratio=statistics.median(ratios), ratio_min=min(ratios),
                      ratio_max=max(ratios))
    return out


def latency(args: argparse.Namespace) -> List[Dict[str, Any]]:
    rows = []
    calib = [np.random.default_rng(i).standard_normal((1, 3, args.resolution, args.resolution)).astype(np.float32)
             for i in range(8)]
    for model in args.models:
        supernet = load_supernet(model, resolutions=[args.resolution]).eval()
        for name, subnet in _subnets(supernet.space).items():
            net = supernet.extract(subnet).eval()
            fp32 = onnx_bytes(net, torch.zeros(1, 3, args.resolution, args.resolution))
            graphs = {'fp32': fp32}
            with tempfile.TemporaryDirectory() as tmp:
                for act in ('int8', 'uint8'):
                    path = quantize_onnx(fp32, Path(tmp) / f'{act}.onnx', calib,
                                         QuantizeConfig(len(calib), method='minmax', activations=act))
                    graphs[f'int8 ({act} act.)'] = path.read_bytes()
            timed = time_graphs(graphs, (args.batch_size, 3, args.resolution, args.resolution), args.rounds,
                                args.runs, args.threads)
            row = dict(model=model, subnet=name, resolution=args.resolution, timed=timed)
            rows.append(row)
            cells = ', '.join(f'{k} {v["ms"]:.2f} ms ({v["ratio"]:.2f}x)' for k, v in timed.items())
            print(f'{model} {name}: {cells}', flush=True)
    print('\n| model | subnet | FP32 (ms) | INT8, int8 activations (ms) | ratio | INT8, uint8 activations (ms) '
          '| ratio |\n|---|---|---:|---:|---|---:|---|')
    for row in rows:
        t = row['timed']
        a, b = t['int8 (int8 act.)'], t['int8 (uint8 act.)']
        print(f'| {row["model"]} | {row["subnet"]} | {t["fp32"]["ms"]:.2f} | {a["ms"]:.2f} | {a["ratio"]:.2f}x '
              f'({a["ratio_min"]:.2f}-{a["ratio_max"]:.2f}) | {b["ms"]:.2f} | {b["ratio"]:.2f}x '
              f'({b["ratio_min"]:.2f}-{b["ratio_max"]:.2f}) |')
    return rows


def accuracy(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from ofa_timm.pipeline import demo_config
    from ofa_timm.pipeline.data import load_splits
    from ofa_timm.training import DataConfig
    from ofa_timm.training.evaluate import SubnetEvaluator
    run = Path(args.run)
    supernet = load_supernet(args.model, checkpoint=run / 'train' / 'supernet.safetensors').eval()
    size = max(supernet.space.resolutions)
    cfg = demo_config(args.data_dir, run, size)
    splits = load_splits(DataConfig(args.data_dir, image_size=size), cfg.test_dir, cfg.test_fraction, cfg.seed)
    rows = []
    configs = [None] + [QuantizeConfig(n, method=m, activations=a) for a in args.activations for m in args.methods
                        for n in args.images]
    for name, subnet in _subnets(supernet.space).items():
        for q in configs:
            row = dict(subnet=name, precision='fp32' if q is None else
                       f'int8 {q.method}, {q.calibration_images} images, {q.activations} activations')
            for split in ('val', 'test'):
                evaluator = SubnetEvaluator(splits.calib, splits.val if split == 'val' else splits.test,
                                            args.calib_images, 64, cfg.seed, quantize=q)
                row[split] = evaluator(supernet, subnet)['top1']
            rows.append(row)
            print(f'{name} {row["precision"]}: val {row["val"]:.2f} test {row["test"]:.2f}', flush=True)
    print(f'\n{len(splits.val)} validation / {len(splits.test)} test images\n\n| subnet | graph | val top-1 | '
          f'test top-1 |\n|---|---|---:|---:|')
    for row in rows:
        print(f'| {row["subnet"]} | {row["precision"]} | {row["val"]:.2f} | {row["test"]:.2f} |')
    if args.random:
        rows.append(_ranking(args, supernet, splits, cfg.seed))
    return rows


def _ranking(args: argparse.Namespace, supernet, splits, seed: int) -> Dict[str, Any]:
    """Does INT8 reorder subnets? FP32 and INT8 (default calibration) validation top-1 of ``--random`` random
    subnets, and the rank correlation between them: what an FP32 predictor would get wrong about INT8."""
    from ofa_timm.search.predictor import spearman
    from ofa_timm.training.evaluate import SubnetEvaluator
    fp32 = SubnetEvaluator(splits.calib, splits.val, args.calib_images, 64, seed)
    int8 = SubnetEvaluator(splits.calib, splits.val, args.calib_images, 64, seed, quantize=QuantizeConfig())
    pairs = []
    for i in range(args.random):
        subnet = supernet.space.sample(seed=1000 + i)
        pairs.append((fp32(supernet, subnet)['top1'], int8(supernet, subnet)['top1']))
        print(f'random {i}: fp32 {pairs[-1][0]:.2f} int8 {pairs[-1][1]:.2f}', flush=True)
    a, b = np.array(pairs).T
    drop = a - b
    rho = spearman(a, b)
    print(f'\n{args.random} random subnets, validation top-1: FP32 {a.mean():.2f} (std {a.std():.2f}), INT8 '
          f'{b.mean():.2f}; INT8 drop mean {drop.mean():.2f}, std {drop.std():.2f}, max {drop.max():.2f} points; '
          f'Spearman(FP32, INT8) {rho:.3f}')
    return dict(random=args.random, spearman=rho, fp32=a.tolist(), int8=b.tolist())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='part', required=True)
    a = sub.add_parser('latency')
    a.add_argument('--models', nargs='+', default=['ofa_mobilenetv3_large_100', 'ofa_efficientnet_b0'])
    a.add_argument('--resolution', type=int, default=224)
    a.add_argument('--batch-size', type=int, default=1)
    a.add_argument('--threads', type=int, default=2)
    a.add_argument('--rounds', type=int, default=10)
    a.add_argument('--runs', type=int, default=20)
    b = sub.add_parser('accuracy')
    b.add_argument('--run', required=True, help='an ofa-timm run / demo folder')
    b.add_argument('--data-dir', required=True, help='its data')
    b.add_argument('--model', default='ofa_mobilenetv3_large_100')
    b.add_argument('--methods', nargs='+', default=['minmax', 'entropy', 'percentile'])
    b.add_argument('--images', nargs='+', type=int, default=[64, 256])
    b.add_argument('--activations', nargs='+', default=['int8', 'uint8'], choices=('int8', 'uint8'))
    b.add_argument('--calib-images', type=int, default=256, help='images of the BN recalibration')
    b.add_argument('--random', type=int, default=30, help='random subnets whose FP32 and INT8 ranking is compared')
    for q in (a, b):
        q.add_argument('--json', default=None, help='also write the rows here')
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    start = time.time()
    rows = latency(args) if args.part == 'latency' else accuracy(args)
    print(f'\n{time.time() - start:.0f} s; torch {torch.__version__}, '
          f'onnxruntime {__import__("onnxruntime").__version__}')
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
