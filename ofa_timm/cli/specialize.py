"""Specialization verbs of ``ofa-timm``: ``latency`` (build, kit, import, validate), ``predictor`` (dataset, fit),
``search`` and ``export``."""
import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ._common import HelpFormatter, data_loaders, load_supernet_from_args

__all__ = ['add_parsers']


def _latency(args: argparse.Namespace) -> int:
    from ..search.latency import LatencySettings, build_latency_table, validation_summary
    settings = LatencySettings(args.backend, args.batch_size, args.threads, args.amp, args.channels_last,
                               args.warmup, args.repeats, passes=args.passes, precision=args.precision)
    supernet = load_supernet_from_args(args)
    table = build_latency_table(supernet, args.out, settings, calibrate=args.calibrate, seed=args.seed,
                                model=args.model, progress=not args.no_progress, validate=args.validate)
    _print_table(table, args.out)
    if args.validate and table.validation:
        print(f'Validation: {validation_summary(table.validation)}')
    return 0


def _print_table(table: Any, path: str) -> None:
    print(f'Latency table: {path} ({len(table.entries)} block entries; {table.describe()})')
    cal = table.calibration
    if cal:
        print(f"Calibration on {len(cal['subnets'])} subnets: latency = {cal['scale']:.4f} x sum of blocks "
              f"{cal['offset']:+.3f} ms")
    smallest, largest = table.minimum()[0], table.maximum()[0]
    print(f'Predicted latency of the space: {smallest:.3f} .. {largest:.3f} ms')


def _latency_kit(args: argparse.Namespace) -> int:
    from ..search.kit import make_kit
    supernet = load_supernet_from_args(args)
    out = make_kit(supernet, args.out, batch_size=args.batch_size, calibrate=args.calibrate, validate=args.validate,
                   seed=args.seed, model=args.model, progress=not args.no_progress, precision=args.precision)
    size = sum(f.stat().st_size for f in out.rglob('*') if f.is_file())
    print(f'Latency kit: {out} ({size / 1e6:.1f} MB). Copy the folder to the device and run there (Python >= 3.8 '
          f'with numpy and onnxruntime):\n  python measure.py [--provider cuda|tensorrt|coreml|nnapi|openvino|qnn|'
          f'directml] [--threads N]\nthen bring results.json back and run\n'
          f'  ofa-timm latency import {out / "results.json"} --out table.json')
    return 0


def _latency_import(args: argparse.Namespace) -> int:
    from ..search.kit import import_kit_results
    from ..search.latency import validation_summary
    table = import_kit_results(args.results, kit=args.kit)
    table.save(args.out)
    _print_table(table, args.out)
    if table.validation:
        print(f'Validation: {validation_summary(table.validation)}')
    else:
        print('No validation yet: measure the held-out subnets on the device (python measure.py --part validation) '
              'and import again')
    return 0


def _latency_validate(args: argparse.Namespace) -> int:
    from ..search.export import load_supernet
    from ..search.latency import LatencyTable, validate_latency_table, validation_summary
    if args.model is None:  # the table names its model, class count and resolutions; weights do not change latency
        table = LatencyTable.load(args.table)
        if not table.meta.get('model'):
            raise ValueError(f'{args.table} does not name its model: pass --model')
        supernet = load_supernet(table.meta['model'], args.checkpoint,
                                 num_classes=args.num_classes or table.meta.get('num_classes'),
                                 resolutions=args.resolutions or table.space.resolutions)
    else:
        supernet = load_supernet_from_args(args)
    table = LatencyTable.load(args.table, space=supernet.space)
    result = validate_latency_table(table, supernet, n=args.n, seed=args.seed, progress=not args.no_progress)
    table.save(args.table)
    print(f'Validation of {args.table}: {validation_summary(result)}')
    return 0


def _predictor_dataset(args: argparse.Namespace) -> int:
    from ..search.predictor import build_accuracy_dataset
    supernet = load_supernet_from_args(args)
    space = supernet.space
    image_size = args.img_size or max(space.resolutions or (supernet.input_resolution,))
    calib, val = data_loaders(args.data_dir, image_size, args.batch_size, args.workers, args.seed)
    rows = build_accuracy_dataset(supernet, calib, val, args.out, n=args.n, seed=args.seed,
                                  calib_images=args.calib_images, device=args.device, progress=not args.no_progress,
                                  model=args.model)
    top1 = [r['top1'] for r in rows]
    print(f'Accuracy dataset: {args.out} ({len(rows)} subnets, top-1 {min(top1):.2f} .. {max(top1):.2f}%)')
    return 0


def _predictor_fit(args: argparse.Namespace) -> int:
    from ..search.predictor import FitConfig, dataset_space, fit_predictor, read_accuracy_dataset
    space, model = dataset_space(args.data)
    codes, targets = read_accuracy_dataset(args.data, space, metric=args.metric)
    config = FitConfig(hidden_size=args.hidden_size, n_layers=args.layers, steps=args.steps, lr=args.lr,
                       val_fraction=args.val_fraction, seed=args.seed)
    predictor, metrics = fit_predictor(space, codes, targets, config, progress=not args.no_progress)
    predictor.save(args.out, model=model)
    scores = (f"held-out RMSE {metrics['rmse']:.3f} % points, Spearman {metrics['spearman']:.3f} "
              f"({metrics['n_val']} subnets)") if metrics.get('n_val') else 'no held-out rows'
    print(f"Predictor: {args.out} (trained on {metrics['n_train']} subnets; {scores})")
    return 0


def _budget_text(args: argparse.Namespace) -> str:
    """``--budgets`` in the one budget grammar (``ofa_timm.search.parse_budgets``). 0.2.0's form, bare numbers after
    ``--flops`` or ``--params`` (``--flops --budgets 150M,300M``), still reads, with a note saying what to write."""
    old = 'flops' if args.flops else 'params' if args.params else None
    if old is None:
        return args.budgets
    terms = [t.strip() for t in args.budgets.split(',') if t.strip()]
    new = ','.join(t if re.search(r'(ms|flops|params)$', t, re.I) else f'{t}{"FLOPs" if old == "flops" else "params"}'
                   for t in terms)
    print(f'ofa-timm search: note: --{old} --budgets {args.budgets} is the old form; write --budgets {new}',
          file=sys.stderr)
    return new


def _search(args: argparse.Namespace) -> int:
    import numpy as np
    from ..search import AccuracyPredictor, EvolutionConfig, flops_model, params_model, parse_budgets, specialize
    from ..search.budget import COSTS
    from ..search.export import export_subnet
    from ..search.latency import LatencyTable
    from ..search.report import plot_pareto, write_results

    supernet = load_supernet_from_args(args)
    space = supernet.space
    predictor = AccuracyPredictor.load(args.predictor, space=space)
    budgets = parse_budgets(_budget_text(args))
    models = {'flops': flops_model(supernet), 'params': params_model(supernet)}
    if args.latency_table:
        models['latency'] = LatencyTable.load(args.latency_table, space=space)
    limits = [b.resolve(models) for b in budgets]
    used = {k: models[k] for k in dict.fromkeys(k for limit in limits for k in limit)}
    config = EvolutionConfig(population_size=args.population, generations=args.generations)
    start = time.time()
    results = specialize(supernet, predictor, used, limits, config, seed=args.seed, progress=not args.no_progress)
    elapsed = time.time() - start
    out = Path(args.out)
    calib = _calibration_loader(args, supernet, max(space.resolutions or (supernet.input_resolution,)),
                                'onnx-int8' in args.export_format)
    for budget, r in zip(budgets, results):
        folder = out / budget.label
        if args.export_format == 'none':
            r.subnet.to_json(folder / 'subnet.json')
        else:
            export_subnet(supernet, r.subnet, folder, formats=args.export_format.split(','), calib_loader=calib,
                          model_name=args.model)
        costs = ', '.join(f'{k} {r.costs[k]:.4g}' for k in r.budgets)
        print(f'  {budget.label}: predicted top-1 {r.accuracy:.2f}%, {costs} -> {folder}')
    main = next(iter(used))  # the Pareto plot's axis: the first budget's first cost
    rng = np.random.default_rng(args.seed)
    sample = rng.integers(0, space.choice_counts, size=(2000, len(space.genes)))
    plot_pareto(results, main, out / 'pareto.png', unit=COSTS[main], background=(
        used[main](sample), predictor.predict(sample)), title=f'{args.model}: best subnet per budget')
    header = (f'# Search results: {args.model}\n\n{len(results)} budgets, population {config.population_size}, '
              f'{config.generations} generations, {elapsed:.2f} s. Predictor: `{args.predictor}`'
              + (f' (held-out RMSE {predictor.metrics["rmse"]:.2f}, Spearman {predictor.metrics["spearman"]:.3f})'
                 if 'rmse' in predictor.metrics else '') + '. Costs: ' + ', '.join(
                  f'latency table `{args.latency_table}` ({models["latency"].describe()})' if k == 'latency' else k
                  for k in used) + '.\n')
    write_results(results, out / 'results.md', units={k: COSTS[k] for k in used}, header=header)
    print(f'Searched {len(results)} budgets in {elapsed:.2f} s. Wrote {out / "results.md"} and {out / "pareto.png"}')
    return 0


def _calibration_loader(args: argparse.Namespace, supernet: Any, resolution: int, int8: bool = False) -> Any:
    """Training images of ``--calibrate-bn`` at ``resolution`` (BN recalibration, INT8 calibration), or None: none
    asked for, or a supernet without batch norm and no INT8 graph to calibrate (which says so)."""
    if not args.calibrate_bn:
        return None
    if not supernet.has_batchnorm and not int8:
        print(f'{args.model} has no batch norm: --calibrate-bn has nothing to recalibrate', file=sys.stderr)
        return None
    return data_loaders(args.calibrate_bn, resolution, 32, 0, args.seed)[0]


def _export(args: argparse.Namespace) -> int:
    from ..search.export import export_subnet
    from ..search.quantize import QuantizeConfig
    formats = [f.strip() for f in args.format.split(',') if f.strip()]
    int8 = 'onnx-int8' in formats
    if int8 and not args.calibrate_bn:
        raise ValueError('--format onnx-int8 calibrates its activations on training images: pass --calibrate-bn '
                         'DIR (an ImageFolder root with a train/ folder)')
    supernet = load_supernet_from_args(args)
    resolution = supernet.resolution_of(supernet.resolve(args.subnet))
    calib = _calibration_loader(args, supernet, resolution, int8)
    check = data_loaders(args.calibrate_bn, resolution, 32, 0, args.seed)[1] if int8 else None
    quantize = QuantizeConfig(args.int8_images, args.int8_method, args.int8_activations)
    result = export_subnet(supernet, args.subnet, args.out, formats=formats, calib_loader=calib,
                           calib_images=args.calib_images, model_name=args.model, quantize=quantize,
                           check_loader=check)
    for key in ('onnx_max_abs_diff', 'pt2_max_abs_diff'):
        if key in result:
            print(f"{key.split('_')[0]} check: max abs difference {result[key]:.3g} vs PyTorch")
    if 'int8' in result:
        c = result['int8']
        print(f"onnx-int8 check on {c['images']} validation images: top-1 agrees with the float graph on "
              f"{c['top1_agreement']:.1f}%, mean |logit difference| {100 * c['mean_abs_diff']:.2f}% of the logit scale")
    print(f"Exported {result['subnet'].to_dict()} to {args.out}: {', '.join(Path(f).name for f in result['files'])}")
    return 0


def add_int8_args(p: argparse.ArgumentParser) -> None:
    """The options of INT8 quantization (``QuantizeConfig``), shared by ``export`` and ``run``."""
    from ..search.quantize import QuantizeConfig
    d = QuantizeConfig()
    p.add_argument('--int8-images', type=int, default=d.calibration_images,
                   help='training images the INT8 activation ranges are calibrated on')
    p.add_argument('--int8-method', choices=('percentile', 'minmax', 'entropy'), default=d.method,
                   help=f'INT8 calibration method (onnxruntime.quantization); percentile clips the activation ranges '
                        f'at the {d.percentile}th percentile')
    p.add_argument('--int8-activations', choices=('uint8', 'int8'), default=d.activations,
                   help='INT8 activation type: uint8 (what NPUs such as QNN HTP and NNAPI take) or int8 (S8S8, '
                        "ONNX Runtime's advice on x86 CPUs)")


def add_parsers(sub: Any) -> None:
    """The ``latency``, ``predictor``, ``search`` and ``export`` verbs."""
    from timm.utils import ParseKwargs

    def model_args(p: argparse.ArgumentParser, checkpoint_help: str = 'trained supernet weights',
                   model_help: Optional[str] = None) -> None:
        p.add_argument('--model', required=model_help is None, default=None,
                       help=model_help or 'registered ofa_* name')
        p.add_argument('--checkpoint', default=None, help=checkpoint_help + ' (supernet.safetensors of ofa-timm train)')
        p.add_argument('--num-classes', type=int, default=None, help='default: from the checkpoint')
        p.add_argument('--resolutions', type=int, nargs='+', default=None,
                       help="elastic resolutions (default: the checkpoint's, else OFA's)")
        p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help="source model or space arguments (default: the checkpoint's)")

    from ..search.export import EXPORT_FORMATS
    from ..search.latency import BACKENDS

    p = sub.add_parser('latency', help='latency tables: build one here, or make a kit to measure on another device')
    verbs = p.add_subparsers(dest='latency_command', required=True)
    b = verbs.add_parser('build', help='measure a latency table of a space on this device (resumable)',
                         formatter_class=HelpFormatter)
    model_args(b, 'weights (only the space and the class count matter)')
    b.add_argument('--backend', choices=BACKENDS, default='torch-cpu')
    b.add_argument('--batch-size', type=int, default=1)
    b.add_argument('--threads', type=int, default=None, help="intra-op threads (default: PyTorch's)")
    b.add_argument('--amp', choices=('bf16',), default=None, help='bf16 autocast (PyTorch backends)')
    b.add_argument('--channels-last', action='store_true')
    b.add_argument('--warmup', type=int, default=10, help='untimed calls per entry')
    b.add_argument('--repeats', type=int, default=30, help='timed samples per entry (median)')
    b.add_argument('--passes', type=int, default=2, help='passes over the entries; each keeps its smallest median')
    b.add_argument('--precision', choices=('fp32', 'int8'), default='fp32',
                   help='int8: the QDQ graphs onnxruntime runs (the onnxruntime backend)')
    b.add_argument('--calibrate', type=int, default=10, help='subnets measured end to end to fit scale and offset')
    b.add_argument('--validate', type=int, default=0,
                   help='held-out subnets to measure end to end, in the same rounds as the calibration subnets')
    b.add_argument('--seed', type=int, default=0)
    b.add_argument('--out', required=True, help='table JSON (resumed if it exists)')
    b.add_argument('--no-progress', action='store_true')
    b.set_defaults(func=_latency, command='latency build')
    k = verbs.add_parser('kit', help='write a kit that measures the table on another device with onnxruntime alone',
                         formatter_class=HelpFormatter)
    model_args(k, 'weights (only the space and the class count matter; the kit carries none)')
    k.add_argument('--batch-size', type=int, default=1)
    k.add_argument('--calibrate', type=int, default=10, help='calibration subnets (measured whole)')
    k.add_argument('--validate', type=int, default=30, help='held-out validation subnets (measured whole)')
    k.add_argument('--precision', choices=('fp32', 'int8'), default='fp32',
                   help='int8: QDQ graphs, as NPUs (QNN HTP, NNAPI) and INT8 deployments run')
    k.add_argument('--seed', type=int, default=0)
    k.add_argument('--out', required=True, help='kit folder')
    k.add_argument('--no-progress', action='store_true')
    k.set_defaults(func=_latency_kit, command='latency kit')
    i = verbs.add_parser('import', help="build a latency table from a kit's results.json",
                         formatter_class=HelpFormatter)
    i.add_argument('results', help='results.json written by the kit\'s measure.py')
    i.add_argument('--kit', default=None, help='kit folder (default: the folder of the results)')
    i.add_argument('--out', required=True, help='latency table JSON')
    i.set_defaults(func=_latency_import, command='latency import')
    v = verbs.add_parser('validate', help='measure held-out subnets now and report the error of a table built earlier',
                         formatter_class=HelpFormatter)
    model_args(v, 'weights (only the space and the class count matter)',
               model_help="registered ofa_* name (default: the table's, with its class count and resolutions)")
    v.add_argument('--table', required=True, help='latency table JSON (the validation is stored in it)')
    v.add_argument('--n', type=int, default=30, help='held-out subnets')
    v.add_argument('--seed', type=int, default=1, help='seed of the held-out draw')
    v.add_argument('--no-progress', action='store_true')
    v.set_defaults(func=_latency_validate, command='latency validate')

    p = sub.add_parser('predictor', help='accuracy predictor: build its dataset, fit it')
    verbs = p.add_subparsers(dest='predictor_command', required=True)
    d = verbs.add_parser('dataset', help='evaluate random BN-recalibrated subnets (resumable)',
                         formatter_class=HelpFormatter)
    model_args(d)
    d.add_argument('--data-dir', required=True, help='ImageFolder root with train/ and validation/')
    d.add_argument('--img-size', type=int, default=None, help='loader resolution (default: max resolution)')
    d.add_argument('--n', type=int, default=1000, help='subnets in the dataset')
    d.add_argument('--calib-images', type=int, default=2000, help='images for BN recalibration')
    d.add_argument('--batch-size', type=int, default=64)
    d.add_argument('--workers', type=int, default=0)
    d.add_argument('--device', default=None, help='default: cpu')
    d.add_argument('--seed', type=int, default=0)
    d.add_argument('--out', required=True, help='dataset JSON-lines file (appended, resumed)')
    d.add_argument('--no-progress', action='store_true')
    d.set_defaults(func=_predictor_dataset, command='predictor dataset')
    f = verbs.add_parser('fit', help='train the MLP predictor; reports held-out RMSE and Spearman',
                         formatter_class=HelpFormatter)
    f.add_argument('--data', required=True, help='dataset of ofa-timm predictor dataset')
    f.add_argument('--metric', choices=('top1', 'top5'), default='top1')
    f.add_argument('--hidden-size', type=int, default=400)
    f.add_argument('--layers', type=int, default=3)
    f.add_argument('--steps', type=int, default=2000)
    f.add_argument('--lr', type=float, default=1e-3)
    f.add_argument('--val-fraction', type=float, default=0.2)
    f.add_argument('--seed', type=int, default=0)
    f.add_argument('--out', required=True, help='predictor .safetensors')
    f.add_argument('--no-progress', action='store_true')
    f.set_defaults(func=_predictor_fit, command='predictor fit')

    p = sub.add_parser('search', help='best subnet per budget: evolution on a predictor and a cost model',
                       formatter_class=HelpFormatter)
    model_args(p)
    p.add_argument('--predictor', required=True, help='predictor .safetensors')
    p.add_argument('--budgets', required=True,
                   help='one subnet per budget: 10ms,20ms | 300MFLOPs | 3Mparams | 10ms+300MFLOPs | 25%%latency (a '
                        'share of the way from the cheapest subnet to the most expensive), as ofa-timm run takes them')
    p.add_argument('--latency-table', default=None, help='latency table JSON (for latency budgets)')
    old = p.add_mutually_exclusive_group()
    old.add_argument('--flops', action='store_true', help='old form: bare budgets (150M) are FLOPs')
    old.add_argument('--params', action='store_true', help='old form: bare budgets (3M) are parameters')
    p.add_argument('--population', type=int, default=100)
    p.add_argument('--generations', type=int, default=500)
    p.add_argument('--export-format', default='timm',
                   help=f"comma-separated of {', '.join(EXPORT_FORMATS)}, or none (subnet JSON only)")
    p.add_argument('--calibrate-bn', default=None, help='ImageFolder root: recalibrate BN before exporting')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, help='folder for subnets, exports, pareto.png, results.md')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=_search)

    p = sub.add_parser('export', help='extract a subnet and write it as timm, safetensors, ONNX or pt2',
                       formatter_class=HelpFormatter)
    model_args(p)
    p.add_argument('--subnet', required=True, help="subnet JSON (or 'max' / 'min')")
    p.add_argument('--format', default='timm', help=f"comma-separated of {', '.join(EXPORT_FORMATS)}")
    p.add_argument('--calibrate-bn', default=None,
                   help='ImageFolder root: recalibrate BN on its train/ images (and calibrate onnx-int8 on them, '
                        'checking it on validation/)')
    p.add_argument('--calib-images', type=int, default=2000, help='images of BN recalibration')
    add_int8_args(p)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, help='destination folder')
    p.set_defaults(func=_export)
