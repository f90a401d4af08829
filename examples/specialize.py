"""Specialize a trained supernet for this machine: latency table, accuracy predictor, search per budget, export.

The Python API behind ``ofa-timm latency | predictor | search | export``. Runs offline on a generated shapes dataset
unless ``--data-dir`` points at an ImageFolder (``train/`` and ``validation/``); without ``--checkpoint`` the
supernet is randomly initialised (the pipeline runs the same, the accuracies mean nothing). Example::

    python examples/specialize.py --model ofa_mobilenetv3_large_100 --checkpoint run/supernet.safetensors
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import ofa_timm  # noqa: F401  registers the ofa_* models
from ofa_timm.example_data import make_shapes_dataset
from ofa_timm.search import (
    FitConfig, LatencySettings, build_accuracy_dataset, build_latency_table, export_subnet, fit_predictor,
    flops_model, load_supernet, read_accuracy_dataset, specialize, validate_latency_table)
from ofa_timm.search.report import plot_pareto, results_table
from ofa_timm.training import DataConfig, build_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='ofa_mobilenetv3_large_100')
    parser.add_argument('--checkpoint', default=None, help='supernet.safetensors of ofa-timm train')
    parser.add_argument('--data-dir', default=None, help='ImageFolder root (default: a generated shapes dataset)')
    parser.add_argument('--resolutions', type=int, nargs='+', default=[48, 56, 64])
    parser.add_argument('--subnets', type=int, default=24, help='evaluated subnets for the predictor')
    parser.add_argument('--batch-size', type=int, default=1, help='latency batch size')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--output', default=None, help='folder for the table, predictor, exports and plot')
    args = parser.parse_args()

    output = Path(args.output or tempfile.mkdtemp(prefix='ofa_specialize_'))
    data_dir = args.data_dir or make_shapes_dataset(output / 'data', num_classes=4, image_size=max(args.resolutions))
    supernet = load_supernet(args.model, args.checkpoint, num_classes=None if args.checkpoint else 4,
                             resolutions=None if args.checkpoint else args.resolutions)
    space = supernet.space
    print(f'[1/4] {args.model}: {space.size():.3e} subnets, resolutions {list(space.resolutions)}')

    # A latency table measured here: every distinct block once, then a fitted calibration on whole subnets.
    settings = LatencySettings('torch-cpu', batch_size=args.batch_size, threads=args.threads, warmup=3, repeats=10)
    table = build_latency_table(supernet, output / 'latency.json', settings, calibrate=6, progress=False)
    check = validate_latency_table(table, supernet, n=6, progress=False)
    table.save(output / 'latency.json')
    print(f"[2/4] Latency table: {len(table.entries)} entries; held-out error median {check['median_abs_pct']:.1f}%, "
          f"max {check['max_abs_pct']:.1f}% (plain sum: {check['plain_median_abs_pct']:.1f}%)")

    # The accuracy predictor: BN-recalibrated subnets evaluated on the validation split, then an MLP.
    _, val_set, calib_set, _ = build_datasets(DataConfig(str(data_dir), image_size=max(space.resolutions)))
    calib = DataLoader(calib_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_set, batch_size=64)
    build_accuracy_dataset(supernet, calib, val, output / 'accuracy.jsonl', n=args.subnets, calib_images=128,
                           progress=False)
    codes, top1 = read_accuracy_dataset(output / 'accuracy.jsonl', space)
    predictor, metrics = fit_predictor(space, codes, top1, FitConfig(steps=500))
    predictor.save(output / 'predictor.safetensors', model=args.model)
    print(f"[3/4] Predictor on {len(top1)} subnets: held-out RMSE {metrics['rmse']:.2f}, "
          f"Spearman {metrics['spearman']:.2f}")

    # One search per latency budget, FLOPs bounded too; export the best subnets.
    smallest, largest = table.minimum()[0], table.maximum()[0]
    budgets = [{'latency': float(b), 'flops': float(flops_model(supernet).maximum()[0])}
               for b in np.linspace(smallest * 1.1, largest, 3)]
    results = specialize(supernet, predictor, {'latency': table, 'flops': 'flops'}, budgets)
    print(results_table(results, units={'latency': 'ms'}))
    for i, r in enumerate(results):
        export_subnet(supernet, r.subnet, output / f'budget{i}', formats=('timm',), model_name=args.model)
    plot_pareto(results, 'latency', output / 'pareto.png', unit='ms')
    print(f"[4/4] Exported {len(results)} subnets to {output}/budget*/ "
          f"(timm.create_model('local-dir:{output / 'budget0'}', pretrained=True)); plot: {output / 'pareto.png'}")


if __name__ == '__main__':
    main()
