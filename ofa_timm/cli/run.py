"""``ofa-timm run`` (the one-command pipeline) and ``ofa-timm demo`` (the pipeline on handwritten digits, offline)."""
import argparse
import time
from pathlib import Path
from typing import Any

from ._common import HelpFormatter, config_from_args, init_distributed
from .specialize import add_int8_args
from .train import add_model_arguments, add_training_arguments

__all__ = ['add_parsers']


def add_parsers(sub: Any) -> None:
    from ..pipeline import DEFAULT_SUBNETS, STEPS
    from ..search.export import EXPORT_FORMATS
    from ..training import TrainConfig
    r = sub.add_parser('run', help='from a timm model and a dataset to a tested, exported subnet per budget, in one '
                                   'resumable command (torchrun for several processes)', formatter_class=HelpFormatter)
    g = r.add_argument_group('model')
    add_model_arguments(g)
    g.add_argument('--checkpoint', default=None, help='a trained supernet (supernet.safetensors): skip training')
    g = r.add_argument_group('data')
    g.add_argument('--data-dir', required=True, help='ImageFolder root with train/ and validation/ (or a timm '
                                                     'dataset root with --dataset)')
    g.add_argument('--dataset', default='', help="timm dataset name ('' = ImageFolder)")
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--test-dir', default=None, help='ImageFolder of test images (default: carved from the '
                                                    'validation split)')
    g.add_argument('--test-fraction', type=float, default=0.5, help='share of the validation split held out as '
                                                                    'the test split, stratified')
    g.add_argument('--img-size', type=int, default=None, help='loader resolution (default: max resolution)')
    g.add_argument('--aa', default=None, help="auto-augment policy, e.g. 'rand-m9-mstd0.5'")
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random-resized-crop area range')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal-flip probability (0 for digits, text)')
    g.add_argument('--workers', type=int, default=TrainConfig().workers,
                   help='data-loader workers per process (default: 4, or the CPUs here if fewer)')
    g = r.add_argument_group('specialization')
    g.add_argument('--budgets', required=True,
                   help='one exported subnet per budget: 5ms,10ms | 300MFLOPs | 3Mparams | 10ms+300MFLOPs | '
                        '25%%latency (a share of the way from the cheapest subnet to the most expensive)')
    g.add_argument('--latency', default='auto',
                   help="torch-cpu | torch-cuda | onnxruntime (measured here), TABLE.json, kit:RESULTS.json (a kit "
                        "measured on another device), none, or auto (torch-cpu; onnxruntime with --precision int8)")
    g.add_argument('--precision', choices=('fp32', 'int8'), default='fp32',
                   help='int8: INT8 latency (QDQ graphs), finalists scored by their INT8 validation top-1, onnx-int8 '
                        'export, INT8 beside FP32 test top-1 in the report')
    add_int8_args(g)
    g.add_argument('--latency-batch-size', type=int, default=1)
    g.add_argument('--threads', type=int, default=None, help="intra-op threads of the latency measurements")
    g.add_argument('--calibrate', type=int, default=10, help='calibration subnets of a latency table built here')
    g.add_argument('--validate', type=int, default=20, help='held-out subnets of a latency table built here')
    g.add_argument('--subnets', type=int, default=DEFAULT_SUBNETS, help='random subnets evaluated for the predictor')
    g.add_argument('--finalists', type=int, default=5, help='best candidates per budget measured on validation')
    g.add_argument('--formats', default='timm,onnx', help=f"comma-separated of {', '.join(EXPORT_FORMATS)}")
    add_training_arguments(r)
    r.add_argument('--out', default='ofa_run', help='work folder (a rerun continues it)')
    r.add_argument('--until', choices=STEPS, default=None, help='stop after this step')
    r.set_defaults(func=_run)

    d = sub.add_parser('demo', help='the pipeline on handwritten digits, offline: train, measure, search, export, '
                                    'report', formatter_class=HelpFormatter)
    d.add_argument('--model', default='ofa_mobilenetv3_large_100', help="registered ofa_* name")
    d.add_argument('--output', default='ofa_timm_demo', help='folder for the data and the run (a rerun continues it)')
    d.add_argument('--image-size', type=int, default=32, help='digits are upscaled from 8x8 to this size')
    d.add_argument('--epochs-scale', type=float, default=None)
    d.add_argument('--min-steps', type=int, default=None,
                   help="floor in optimizer steps (default: the recipe's; 0 with --epochs-scale 0.1 for a quick "
                        'look)')
    d.add_argument('--subnets', type=int, default=DEFAULT_SUBNETS, help='random subnets evaluated for the predictor')
    d.add_argument('--precision', choices=('fp32', 'int8'), default='fp32',
                   help='int8: latency of INT8 graphs (onnxruntime), finalists scored and tested as INT8 graphs, and '
                        'an onnx-int8 export; rerun an fp32 demo folder with it to reuse its training')
    d.add_argument('--seed', type=int, default=0)
    d.add_argument('--no-progress', action='store_true')
    d.set_defaults(func=_demo)


def _run(args: argparse.Namespace) -> int:
    from ..pipeline import RunConfig, run
    from ..search.quantize import QuantizeConfig
    from ..training import TrainConfig
    rank = init_distributed()
    config = RunConfig(
        model=args.model, model_kwargs=args.model_kwargs, data_dir=args.data_dir, budgets=args.budgets, out=args.out,
        latency=None if args.latency == 'none' else args.latency, precision=args.precision,
        quantize=QuantizeConfig(args.int8_images, args.int8_method, args.int8_activations), pretrained=args.pretrained,
        pretrained_file=args.pretrained_file, checkpoint=args.checkpoint, resolutions=args.resolutions,
        image_size=args.img_size, dataset=args.dataset, train_split=args.train_split, val_split=args.val_split,
        test_dir=args.test_dir, test_fraction=args.test_fraction, auto_augment=args.aa, scale=tuple(args.scale),
        hflip=args.hflip, schedule=args.schedule, epochs_scale=args.epochs_scale, min_steps=args.min_steps,
        lr_scale=args.lr_scale, sampling=args.sampling, subnets=args.subnets, finalists=args.finalists,
        formats=[f for f in args.formats.split(',') if f], latency_batch_size=args.latency_batch_size,
        latency_threads=args.threads, calibrate=args.calibrate, validate=args.validate,
        train=config_from_args(TrainConfig, args), seed=args.seed, progress=args.progress)
    result = run(config, until=args.until)
    if rank == 0 and result is not None:
        print(f'\n{result.report.read_text()}\nReport: {result.report}; plot: {result.plot}')
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..example_data import make_digits_dataset
    from ..pipeline import demo_config, run
    start = time.time()
    out = Path(args.output)
    size = args.image_size
    root = make_digits_dataset(out / 'data', val_per_class=100, image_size=size, seed=args.seed)
    print(f"Handwritten digits (scikit-learn's 1,797 real 8x8 scans, 10 classes) written as a {size} px ImageFolder "
          f"in {root}: 797 training and 1,000 validation images, half of which the run holds out as its test split")
    config = demo_config(root, out / 'run', size, model=args.model, epochs_scale=args.epochs_scale,
                         min_steps=args.min_steps, subnets=args.subnets, seed=args.seed, progress=not args.no_progress,
                         precision=args.precision)
    result = run(config)
    print(f'\n{result.report.read_text()}\nReport: {result.report}; plot: {result.plot}; run folder: {out / "run"}')
    print(f'Done in {time.time() - start:.0f} s.')
    return 0
