"""The ``ofa-timm`` command line: ``train`` (progressive shrinking, also under ``torchrun``), ``latency``,
``predictor``, ``search``, ``export`` and ``demo``."""
import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ['main', 'build_parser']


# --- shared helpers -------------------------------------------------------------------------------------------------
def _init_distributed() -> int:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPUs). Returns the rank."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return 0
    import torch.distributed as dist
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')
    return dist.get_rank()


def _build_supernet(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    import timm
    import ofa_timm  # noqa: F401  registers the ofa_* models
    kwargs: Dict[str, Any] = dict(num_classes=num_classes)
    if args.resolutions:
        kwargs['resolutions'] = tuple(args.resolutions)
    if args.pretrained_file:
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_file)
    if not args.model.startswith('ofa_'):
        raise ValueError(f"--model must be a registered ofa_* name (see timm.list_models('ofa_*')), got "
                         f'{args.model!r}')
    return timm.create_model(args.model, pretrained=args.pretrained or bool(args.pretrained_file), **kwargs)


def _write_report(trainer: Any, output: Path) -> str:
    from .training.report import plot_validation, read_metrics, summary_table
    table = summary_table(trainer.summaries())
    (output / 'summary.md').write_text(table + '\n')
    metrics_path = output / 'metrics.jsonl'
    if metrics_path.is_file():
        plot_validation(read_metrics(metrics_path), output / 'val_accuracy.png')
    return table


def _save_supernet(supernet: torch.nn.Module, output: Path) -> Path:
    """``supernet.safetensors``: the weights and what rebuilds their model (``ofa_timm._io.checkpoint_metadata``)."""
    from ._io import checkpoint_metadata, save_safetensors
    return save_safetensors(supernet.state_dict(), output / 'supernet.safetensors', checkpoint_metadata(supernet))


def _config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """A config dataclass from the parsed arguments whose ``dest`` is one of its fields."""
    from dataclasses import fields
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


# --- train ----------------------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from .training import DataConfig, TrainConfig, Trainer, build_datasets, load_schedule

    rank = _init_distributed()
    output = Path(args.output)
    schedule = load_schedule(args.schedule, args.epochs_scale)
    if args.lr_scale != 1.0:
        from dataclasses import replace
        schedule = replace(schedule, stages=tuple(replace(s, lr=s.lr * args.lr_scale) for s in schedule.stages))
    if args.sampling:
        from dataclasses import replace
        schedule = replace(schedule, stages=tuple(replace(s, sampling=args.sampling) for s in schedule.stages))
    if args.data_dir is None:
        raise ValueError('--data-dir is required (an ImageFolder root with train/ and validation/, or a timm dataset '
                         'root with --dataset)')
    # The loaders produce the largest resolution; each step resizes its batch to the step's resolution.
    image_size = args.img_size or (max(args.resolutions) if args.resolutions else 224)
    data_cfg = DataConfig(
        data_dir=args.data_dir, dataset=args.dataset, train_split=args.train_split, val_split=args.val_split,
        image_size=image_size, auto_augment=args.aa, scale=tuple(args.scale), dataset_download=args.dataset_download)
    train_set, val_set, calib_set, num_classes = build_datasets(data_cfg, seed=args.seed)
    num_classes = args.num_classes or num_classes
    torch.manual_seed(args.seed)
    supernet = _build_supernet(args, num_classes)
    config = _config_from_args(TrainConfig, args, output=str(output))
    trainer = Trainer(supernet, schedule, train_set, val_set, calib_set, config,
                      pretrained=args.pretrained or bool(args.pretrained_file))
    if args.resume:
        trainer.resume()
        if rank == 0:
            print(f"Resuming {output / 'last.pth'} at {trainer.where()}", flush=True)
    elif (output / 'last.pth').is_file():
        raise ValueError(f'{output} already holds a run (last.pth); pass --resume to continue it or pick another '
                         f'--output')
    if rank == 0:
        print(f'Stages: {", ".join(s.name for s in trainer.schedule.stages)} '
              f'({trainer.steps_per_epoch} steps/epoch, world size {trainer.world_size})')
    trainer.run()
    if rank == 0:
        path = _save_supernet(trainer.supernet, output)
        print(_write_report(trainer, output))
        print(f"Supernet weights: {path}. Load them (model kwargs come from the file) with\n"
              f"  timm.create_model({args.model!r}, pretrained=True, pretrained_cfg_overlay=dict(file='{path}'), "
              f"subnet='min')\n"
              f"or timm.create_model({args.model!r}, num_classes={trainer.supernet.num_classes}, "
              f"resolutions={list(trainer.supernet.space.resolutions)}, checkpoint_path='{path}')")
    return 0


# --- demo -----------------------------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    import timm

    import ofa_timm  # noqa: F401  registers the ofa_* models
    from .search import count_flops
    from .training import DataConfig, TrainConfig, Trainer, build_datasets, load_schedule, make_digits_dataset
    from .training.report import read_metrics
    from .training.sampling import applicable_stages

    start = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    size = args.image_size
    root = make_digits_dataset(output / 'data', val_per_class=args.val_per_class, image_size=size, seed=args.seed)
    # Digits are not mirror-symmetric: no flips.
    train_set, val_set, calib_set, num_classes = build_datasets(
        DataConfig(str(root), image_size=size, scale=(0.6, 1.0), hflip=0.), seed=args.seed)
    print(f'[1/5] Handwritten digits (scikit-learn): {len(train_set)} training / {len(val_set)} validation images of '
          f'{size} px, 10 classes, in {root}')
    resolutions = (size * 3 // 4, size * 7 // 8, size)

    print(f'[2/5] Converting timm {args.model} (random init) into an elastic supernet')
    torch.manual_seed(args.seed)
    supernet = timm.create_model(args.model, num_classes=num_classes, resolutions=resolutions)
    print(f'      {supernet.space.size():.3e} subnets, resolutions {list(resolutions)}')

    schedule = load_schedule('demo', args.epochs_scale)
    print(f"[3/5] Progressive shrinking ('demo' schedule, SGD): "
          f"{' -> '.join(s.name for s in applicable_stages(schedule, supernet.space, False).stages)}")
    run_dir = output / 'run'
    for name in ('last.pth', 'metrics.jsonl'):
        (run_dir / name).unlink(missing_ok=True)  # the demo always starts afresh
    # Validation (every corner of the stage, at the max resolution) at the end of each stage only: each subnet costs
    # a BN recalibration and 1,000 images, so a denser grid would cost more than the training.
    config = TrainConfig(output=str(run_dir), batch_size=32, workers=0, calib_images=256,
                         val_resolutions=[resolutions[-1]], val_every=1000, seed=args.seed,
                         progress=not args.no_progress, log_every=5)
    trainer = Trainer(supernet, schedule, train_set, val_set, calib_set, config)
    trainer.run()
    print(_write_report(trainer, run_dir))

    space = supernet.space
    full_max = [r['top1'] for r in read_metrics(run_dir / 'metrics.jsonl')
                if r['type'] == 'val' and r['stage'] == 'full' and r['subnet'] == f'max@{resolutions[-1]}'][-1]
    print(f'[4/5] Top-1 of BN-recalibrated subnets on the {len(val_set):,} validation images:')
    print(f'      {"max at the end of the full stage":34s} {full_max:6.2f}%')
    for label, subnet in (('max', space.max()), ('mid', space.mid()), ('min', space.min())):
        top1 = trainer.evaluate_subnet(subnet)['top1']
        flops = count_flops(supernet.extract(subnet), subnet.resolution)
        print(f'      {label + " after progressive shrinking":34s} {top1:6.2f}%  {flops / 1e6:6.1f} MFLOPs  '
              f'{subnet.resolution} px, depths {list(subnet.depths)}')

    from .search import FitConfig, build_accuracy_dataset, export_subnet, fit_predictor, flops_model, specialize
    from .search.report import plot_pareto
    flops = flops_model(supernet)
    flops_min, flops_max = flops.minimum()[0], flops.maximum()[0]
    budget = args.flops_budget or (flops_min + flops_max) / 2
    search_dir = output / 'search'
    print(f'[5/5] Searching the best subnet under {budget / 1e6:.1f} MFLOPs: an accuracy predictor fitted on '
          f'{args.search_samples} evaluated subnets, then evolution on it')
    dataset = search_dir / 'accuracy.jsonl'
    if dataset.exists():
        dataset.unlink()  # evaluations of an earlier run's weights
    rows = build_accuracy_dataset(supernet, None, None, dataset, n=args.search_samples, seed=args.seed,
                                  progress=not args.no_progress, model=args.model, evaluate=trainer.evaluate_subnet)
    codes = space.encode([ofa_timm.Subnet.from_dict(r['subnet']) for r in rows])
    predictor, fit = fit_predictor(space, codes, [r['top1'] for r in rows], FitConfig(steps=500, seed=args.seed))
    predictor.save(search_dir / 'predictor.safetensors', model=args.model)
    print(f"      predictor: held-out RMSE {fit['rmse']:.2f} % points, Spearman {fit['spearman']:.2f} "
          f"({fit['n_val']} of {len(rows)} subnets held out)")
    budgets = [flops_min + (budget - flops_min) * (i + 1) / args.search_evaluate for i in range(args.search_evaluate)]
    results = specialize(supernet, predictor, 'flops', budgets, seed=args.seed)
    plot_pareto(results, 'flops', search_dir / 'pareto.png', title=f'{args.model} on the demo data')
    for r in results:
        measured = trainer.evaluate_subnet(r.subnet)['top1']
        print(f"      <= {r.budgets['flops'] / 1e6:6.1f} MFLOPs: {r.costs['flops'] / 1e6:6.1f} MFLOPs, predicted "
              f"{r.accuracy:6.2f}%, measured {measured:6.2f}%")
    best, top1 = results[-1].subnet, measured
    print(f"      best: {top1:.2f}% at {results[-1].costs['flops'] / 1e6:.1f} MFLOPs, {best.to_dict()} "
          f"(plot: {search_dir / 'pareto.png'})")

    export = output / 'export'
    export_subnet(supernet, best, export, formats=('safetensors',), model_name=args.model)
    export_subnet(supernet, best, export / 'timm', formats=('timm',), model_name=args.model)
    print(f"Exported to {export}: subnet.json, model.safetensors, and timm/, which loads after `import ofa_timm` "
          f"(with timm's train.py: --device-modules ofa_timm) as timm.create_model('local-dir:{export / 'timm'}', "
          f"pretrained=True)")
    print(f'Done in {time.time() - start:.0f} s. Metrics: {run_dir / "metrics.jsonl"}, '
          f'plot: {run_dir / "val_accuracy.png"}')
    return 0


# --- specialization: latency | predictor | search | export ----------------------------------------------------------
def _load_supernet(args: argparse.Namespace) -> torch.nn.Module:
    import ofa_timm  # noqa: F401  registers the ofa_* models
    from .search.export import load_supernet
    return load_supernet(args.model, args.checkpoint, num_classes=getattr(args, 'num_classes', None),
                         resolutions=getattr(args, 'resolutions', None))


def _latency(args: argparse.Namespace) -> int:
    from .search.latency import LatencySettings, build_latency_table
    settings = LatencySettings(args.backend, args.batch_size, args.threads, args.amp, args.channels_last,
                               args.warmup, args.repeats)
    supernet = _load_supernet(args)
    table = build_latency_table(supernet, args.out, settings, calibrate=args.calibrate, seed=args.seed,
                                model=args.model, progress=not args.no_progress, validate=args.validate)
    print(f'Latency table: {args.out} ({len(table.entries)} block entries; {table.describe()})')
    cal = table.calibration
    if cal:
        print(f"Calibration on {len(cal['subnets'])} subnets: latency = {cal['scale']:.4f} x sum of blocks "
              f"{cal['offset']:+.3f} ms")
    smallest, largest = table.minimum()[0], table.maximum()[0]
    print(f'Predicted latency of the space: {smallest:.3f} .. {largest:.3f} ms')
    result = table.validation
    if args.validate and result:
        print(f"Validation on {result['n']} held-out subnets: median |error| {result['median_abs_pct']:.2f}%, "
              f"max {result['max_abs_pct']:.2f}% (plain sum of blocks: median {result['plain_median_abs_pct']:.2f}%, "
              f"max {result['plain_max_abs_pct']:.2f}%)")
    return 0


def _data_loaders(data_dir: str, image_size: int, batch_size: int, workers: int, seed: int = 0):
    """(calibration loader over training images, validation loader) of an ImageFolder-style dataset."""
    from torch.utils.data import DataLoader
    from .training import DataConfig, build_datasets
    _, val_set, calib_set, _ = build_datasets(DataConfig(data_dir, image_size=image_size), seed=seed)
    g = torch.Generator().manual_seed(seed)
    calib = DataLoader(calib_set, batch_size=batch_size, shuffle=True, num_workers=workers, generator=g)
    val = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers)
    return calib, val


def _predictor_dataset(args: argparse.Namespace) -> int:
    from .search.predictor import build_accuracy_dataset
    supernet = _load_supernet(args)
    space = supernet.space
    image_size = args.img_size or max(space.resolutions or (int(supernet.pretrained_cfg['input_size'][-1]),))
    calib, val = _data_loaders(args.data_dir, image_size, args.batch_size, args.workers, args.seed)
    rows = build_accuracy_dataset(supernet, calib, val, args.out, n=args.n, seed=args.seed,
                                  calib_images=args.calib_images, device=args.device, progress=not args.no_progress,
                                  model=args.model)
    top1 = [r['top1'] for r in rows]
    print(f'Accuracy dataset: {args.out} ({len(rows)} subnets, top-1 {min(top1):.2f} .. {max(top1):.2f}%)')
    return 0


def _predictor_fit(args: argparse.Namespace) -> int:
    from .search.predictor import FitConfig, dataset_space, fit_predictor, read_accuracy_dataset
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


def _parse_budgets(text: str, unit: str) -> List[float]:
    """'10ms,20ms' (latency) or '150M,300M' (FLOPs / parameters; k, M, G suffixes) -> numbers in the cost's unit."""
    budgets = []
    for item in (t.strip() for t in text.split(',') if t.strip()):
        value, suffix = item, ''
        for s in ('ms', 'k', 'K', 'M', 'G'):
            if item.endswith(s):
                value, suffix = item[:-len(s)], s
                break
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f'Cannot read budget {item!r}: expected e.g. 20ms (latency) or 300M (FLOPs)') from None
        if suffix == 'ms' and unit != 'ms' or suffix in ('k', 'K', 'M', 'G') and unit == 'ms':
            raise ValueError(f'Budget {item!r} does not fit the constraint: use ms with --latency-table, and a plain '
                             f'number or k/M/G with --flops / --params')
        budgets.append(number * {'k': 1e3, 'K': 1e3, 'M': 1e6, 'G': 1e9}.get(suffix, 1.0))
    if not budgets:
        raise ValueError('--budgets is empty; give e.g. 10ms,20ms or 150M,300M')
    return budgets


def _budget_label(value: float, name: str, unit: str) -> str:
    from .search.cost import format_cost
    return f'{name}_' + format_cost(value, name, unit).replace(' ', '')


def _search(args: argparse.Namespace) -> int:
    import numpy as np
    from .search import AccuracyPredictor, EvolutionConfig, flops_model, params_model, specialize
    from .search.export import export_subnet
    from .search.latency import LatencyTable
    from .search.report import plot_pareto, write_results

    supernet = _load_supernet(args)
    space = supernet.space
    predictor = AccuracyPredictor.load(args.predictor, space=space)
    if args.latency_table:
        model = LatencyTable.load(args.latency_table, space=space)
    else:
        model = params_model(supernet) if args.params else flops_model(supernet)
    budgets = _parse_budgets(args.budgets, model.unit)
    config = EvolutionConfig(population_size=args.population, generations=args.generations)
    start = time.time()
    results = specialize(supernet, predictor, {model.name: model}, budgets, config, seed=args.seed,
                         progress=not args.no_progress)
    elapsed = time.time() - start
    out = Path(args.out)
    calib = None
    if args.calibrate_bn:
        calib, _ = _data_loaders(args.calibrate_bn, max(space.resolutions), 32, 0, args.seed)
    rows = []
    for r in results:
        label = _budget_label(r.budgets[model.name], model.name, model.unit)
        folder = out / label
        if args.export_format == 'none':
            r.subnet.to_json(folder / 'subnet.json')
        else:
            export_subnet(supernet, r.subnet, folder, formats=args.export_format.split(','), calib_loader=calib,
                          model_name=args.model)
        rows.append(label)
        print(f"  {label}: predicted top-1 {r.accuracy:.2f}%, {model.name} {r.costs[model.name]:.4g} "
              f"-> {folder}")
    rng = np.random.default_rng(args.seed)
    sample = rng.integers(0, space.choice_counts, size=(2000, len(space.genes)))
    plot_pareto(results, model.name, out / 'pareto.png', unit=model.unit,
                background=(model(sample), predictor.predict(sample)), title=f'{args.model}: best subnet per budget')
    header = (f'# Search results: {args.model}\n\n{len(results)} budgets, population {config.population_size}, '
              f'{config.generations} generations, {elapsed:.2f} s. Predictor: `{args.predictor}`'
              + (f' (held-out RMSE {predictor.metrics["rmse"]:.2f}, Spearman {predictor.metrics["spearman"]:.3f})'
                 if 'rmse' in predictor.metrics else '') + '. Cost: '
              + (f'latency table `{args.latency_table}` ({model.describe()})' if args.latency_table else model.name)
              + '.\n')
    write_results(results, out / 'results.md', units={model.name: model.unit}, header=header)
    print(f'Searched {len(results)} budgets in {elapsed:.2f} s. Wrote {out / "results.md"} and {out / "pareto.png"}')
    return 0


def _export(args: argparse.Namespace) -> int:
    from .search.export import export_subnet
    supernet = _load_supernet(args)
    calib = None
    if args.calibrate_bn:
        subnet = supernet.resolve(args.subnet)
        res = subnet.resolution or int(supernet.pretrained_cfg['input_size'][-1])
        calib, _ = _data_loaders(args.calibrate_bn, res, 32, 0, args.seed)
    result = export_subnet(supernet, args.subnet, args.out, formats=args.format.split(','), calib_loader=calib,
                           calib_images=args.calib_images, model_name=args.model)
    for key in ('onnx_max_abs_diff', 'pt2_max_abs_diff'):
        if key in result:
            print(f"{key.split('_')[0]} check: max abs difference {result[key]:.3g} vs PyTorch")
    print(f"Exported {result['subnet'].to_dict()} to {args.out}: {', '.join(Path(f).name for f in result['files'])}")
    return 0


def _add_search_parsers(sub: Any) -> None:
    """The ``latency``, ``predictor``, ``search`` and ``export`` verbs."""
    def model_args(p: argparse.ArgumentParser, checkpoint_help: str = 'trained supernet weights') -> None:
        p.add_argument('--model', required=True, help='registered ofa_* name')
        p.add_argument('--checkpoint', default=None, help=checkpoint_help + ' (supernet.safetensors of ofa-timm train)')
        p.add_argument('--num-classes', type=int, default=None, help='default: from the checkpoint')
        p.add_argument('--resolutions', type=int, nargs='+', default=None,
                       help="elastic resolutions (default: the checkpoint's, else OFA's)")

    from .search.export import EXPORT_FORMATS
    from .search.latency import BACKENDS

    p = sub.add_parser('latency', help='measure a latency table of a space on this device',
                       formatter_class=_HelpFormatter)
    model_args(p, 'weights (only the space and the class count matter)')
    p.add_argument('--backend', choices=BACKENDS, default='torch-cpu')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--threads', type=int, default=None, help="intra-op threads (default: PyTorch's)")
    p.add_argument('--amp', choices=('bf16',), default=None, help='bf16 autocast (PyTorch backends)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--warmup', type=int, default=10, help='untimed calls per entry')
    p.add_argument('--repeats', type=int, default=30, help='timed samples per entry (median)')
    p.add_argument('--calibrate', type=int, default=10, help='subnets measured end to end to fit scale and offset')
    p.add_argument('--validate', type=int, default=0, help='held-out subnets to measure end to end and report')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, help='table JSON (resumed if it exists)')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=_latency)

    p = sub.add_parser('predictor', help='accuracy predictor: build its dataset, fit it')
    verbs = p.add_subparsers(dest='predictor_command', required=True)
    d = verbs.add_parser('dataset', help='evaluate random BN-recalibrated subnets (resumable)',
                         formatter_class=_HelpFormatter)
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
                         formatter_class=_HelpFormatter)
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
                       formatter_class=_HelpFormatter)
    model_args(p)
    p.add_argument('--predictor', required=True, help='predictor .safetensors')
    cost = p.add_mutually_exclusive_group(required=True)
    cost.add_argument('--latency-table', default=None, help='latency table JSON (budgets in ms)')
    cost.add_argument('--flops', action='store_true', help='budgets in FLOPs (k/M/G)')
    cost.add_argument('--params', action='store_true', help='budgets in parameters (k/M/G)')
    p.add_argument('--budgets', required=True, help='comma-separated: 10ms,20ms or 150M,300M')
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
                       formatter_class=_HelpFormatter)
    model_args(p)
    p.add_argument('--subnet', required=True, help="subnet JSON (or 'max' / 'min')")
    p.add_argument('--format', default='timm', help=f"comma-separated of {', '.join(EXPORT_FORMATS)}")
    p.add_argument('--calibrate-bn', default=None, help='ImageFolder root: recalibrate BN on its train/ images')
    p.add_argument('--calib-images', type=int, default=2000)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, help='destination folder')
    p.set_defaults(func=_export)


# --- parser ---------------------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (None, '', switches) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if switch or action.default in (None, '') or 'default' in (action.help or ''):
            return action.help or ''
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .training import TrainConfig
    parser = argparse.ArgumentParser(prog='ofa-timm', description='Once-for-All elastic supernets for timm.')
    sub = parser.add_subparsers(dest='command', required=True)

    t = sub.add_parser('train', help='progressive shrinking of a supernet (torchrun for several processes)',
                       formatter_class=_HelpFormatter)
    default = TrainConfig()
    g = t.add_argument_group('model')
    g.add_argument('--model', default='ofa_mobilenetv3_large_100', help="registered ofa_* name")
    g.add_argument('--pretrained', action='store_true', help="load the name's pretrained weights (skips 'full')")
    g.add_argument('--pretrained-file', default=None, help='local weights file (.pth/.safetensors) to start from')
    g.add_argument('--resolutions', type=int, nargs='+', default=None,
                   help="elastic resolutions (default: OFA's 128..224 and the source's)")
    g = t.add_argument_group('data')
    g.add_argument('--data-dir', default=None, help='dataset root')
    g.add_argument('--dataset', default='', help="timm dataset name ('' = ImageFolder)")
    g.add_argument('--dataset-download', action='store_true')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--num-classes', type=int, default=None, help='default: from the data')
    g.add_argument('--img-size', type=int, default=None, help='loader resolution (default: max resolution)')
    g.add_argument('--aa', default=None, help="auto-augment policy, e.g. 'rand-m9-mstd0.5'")
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random-resized-crop area range')
    g.add_argument('--mixup', type=float, default=default.mixup)
    g.add_argument('--cutmix', type=float, default=default.cutmix)
    g.add_argument('--workers', type=int, default=default.workers, help='data-loader workers per process')
    g = t.add_argument_group('schedule')
    g.add_argument('--schedule', default='ofa', help='ofa | fast | demo | path to a YAML schedule')
    g.add_argument('--epochs-scale', type=float, default=None, help='multiply every stage length')
    g.add_argument('--lr-scale', type=float, default=1.0, help='multiply every stage lr')
    g.add_argument('--sampling', choices=('uniform', 'sandwich'), default=None, help='override every stage')
    g = t.add_argument_group('optimisation')
    g.add_argument('--batch-size', type=int, default=default.batch_size, help='per process')
    g.add_argument('--opt', default=default.opt, help='timm optimizer (sgd = Nesterov SGD)')
    g.add_argument('--momentum', type=float, default=default.momentum)
    g.add_argument('--weight-decay', type=float, default=default.weight_decay)
    g.add_argument('--clip-grad', type=float, default=default.clip_grad)
    g.add_argument('--ema-decay', type=float, default=default.ema_decay)
    g.add_argument('--smoothing', dest='label_smoothing', type=float, default=default.label_smoothing)
    g.add_argument('--kd', dest='kd_kind', choices=('ce', 'kl'), default=default.kd_kind)
    g.add_argument('--kd-temperature', type=float, default=default.kd_temperature)
    g.add_argument('--warmup-lr', type=float, default=default.warmup_lr, help='lr at the start of a warmup')
    g.add_argument('--min-lr', type=float, default=default.min_lr, help="lr at the end of each stage's cosine")
    g.add_argument('--no-zero-init-residual', dest='zero_init_residual', action='store_false',
                   help="from scratch, keep timm's init of the last BN scale of residual blocks (default: zero)")
    g.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default=default.amp)
    g.add_argument('--channels-last', action='store_true')
    g = t.add_argument_group('run')
    g.add_argument('--output', default='output/ofa', help='run folder')
    g.add_argument('--resume', action='store_true', help='continue the run in --output exactly where it stopped')
    g.add_argument('--calib-images', type=int, default=default.calib_images, help='images for BN recalibration')
    g.add_argument('--val-resolutions', type=int, nargs='+', default=default.val_resolutions,
                   help="validation grid resolutions (default: the stage's min and max)")
    g.add_argument('--val-every', type=int, default=default.val_every, help='epochs between validations')
    g.add_argument('--checkpoint-every', type=int, default=default.checkpoint_every,
                   help='steps between extra checkpoints (0: epoch ends only)')
    g.add_argument('--checkpoint-minutes', type=float, default=default.checkpoint_minutes,
                   help='also checkpoint when this many minutes passed since the last checkpoint (0: never)')
    g.add_argument('--log-every', type=int, default=default.log_every, help='steps between metrics.jsonl records')
    g.add_argument('--progress-seconds', type=float, default=default.progress_seconds,
                   help='seconds between progress lines when stdout is not a terminal')
    g.add_argument('--seed', type=int, default=default.seed)
    g.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar or lines')
    t.set_defaults(func=_train)

    d = sub.add_parser('demo', help='train, search and export on handwritten digits (no downloads)',
                       formatter_class=_HelpFormatter)
    d.add_argument('--model', default='ofa_mobilenetv3_large_100', help="registered ofa_* name")
    d.add_argument('--output', default='ofa_timm_demo', help='folder for data, run and export')
    d.add_argument('--image-size', type=int, default=32, help='digits are upscaled from 8x8 to this size')
    d.add_argument('--val-per-class', type=int, default=100, help='validation images per digit (the rest train)')
    d.add_argument('--epochs-scale', type=float, default=1.0)
    d.add_argument('--flops-budget', type=float, default=None, help='FLOPs (default: halfway between min and max)')
    d.add_argument('--search-samples', type=int, default=24, help='subnets evaluated to fit the accuracy predictor')
    d.add_argument('--search-evaluate', type=int, default=4,
                   help='FLOPs budgets searched (up to --flops-budget) and their best subnets evaluated')
    d.add_argument('--seed', type=int, default=0)
    d.add_argument('--no-progress', action='store_true')
    d.set_defaults(func=_demo)
    _add_search_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command. Errors the user can fix (bad arguments, files, data, no network) print one line and exit 2;
    SIGINT/SIGTERM exit 130/143 without a traceback, after a checkpoint and the command that resumes."""
    from .training import TrainingInterrupted
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ConnectionError) as e:
        print(f'ofa-timm {args.command}: error: {e}', file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f'ofa-timm {args.command}: {e}', file=sys.stderr)
        if args.command == 'train' and int(os.environ.get('RANK', '0')) == 0:
            resume = argv if '--resume' in argv else [*argv, '--resume']
            print(f'Resume with: {shlex.join(["ofa-timm", *resume])}', file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # outside training (data, model, search, export): nothing to checkpoint
        print(f'ofa-timm {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
