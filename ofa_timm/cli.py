"""The ``ofa-timm`` command line: ``train`` (progressive shrinking, also under ``torchrun``) and ``demo``."""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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


def _evaluate_named(trainer: Any, named: Sequence) -> List[Dict[str, Any]]:
    rows = []
    for label, subnet in named:
        metrics = trainer.evaluate_subnet(subnet)
        rows.append(dict(subnet=label, spec=subnet, **metrics))
    return rows


def _write_report(trainer: Any, output: Path) -> str:
    from .training.report import plot_validation, read_metrics, summary_table
    table = summary_table(trainer.summaries())
    (output / 'summary.md').write_text(table + '\n')
    metrics_path = output / 'metrics.jsonl'
    if metrics_path.is_file():
        plot_validation(read_metrics(metrics_path), output / 'val_accuracy.png')
    return table


def _save_supernet(supernet: torch.nn.Module, output: Path) -> Path:
    from safetensors.torch import save_file
    from ._io import atomic_path
    path = output / 'supernet.safetensors'
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in supernet.state_dict().items()}, str(tmp),
                  metadata={'space': json.dumps(supernet.space.to_dict())})
    return path


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
        print(f'Supernet weights: {path}  (timm.create_model({args.model!r}, checkpoint_path=...) or '
              f'pretrained_cfg_overlay=dict(file=...))')
    return 0


# --- demo -----------------------------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    import random

    import timm
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    import ofa_timm  # noqa: F401  registers the ofa_* models
    from .search import count_flops
    from .training import DataConfig, TrainConfig, Trainer, build_datasets, load_schedule, make_shapes_dataset

    start = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    print(f'[1/5] Drawing a {args.num_classes}-class shapes dataset in {output / "data"}')
    root = make_shapes_dataset(output / 'data', num_classes=args.num_classes, image_size=args.image_size)
    resolutions = tuple(range(args.image_size - 16, args.image_size + 1, 8))
    train_set, val_set, calib_set, num_classes = build_datasets(
        DataConfig(str(root), image_size=args.image_size, scale=(0.6, 1.0)), seed=args.seed)

    print(f'[2/5] Converting timm {args.model} (random init) into an elastic supernet')
    torch.manual_seed(args.seed)
    supernet = timm.create_model(args.model, num_classes=num_classes, resolutions=resolutions)
    print(f'      {supernet.space.size():.3e} subnets, resolutions {list(resolutions)}')

    print('[3/5] Progressive shrinking: full -> kernel -> depth -> expand')
    run_dir = output / 'run'
    if (run_dir / 'last.pth').exists():
        (run_dir / 'last.pth').unlink()  # the demo always starts afresh
    if (run_dir / 'metrics.jsonl').exists():
        (run_dir / 'metrics.jsonl').unlink()
    config = TrainConfig(output=str(run_dir), batch_size=32, workers=0, opt='adamw', weight_decay=0.01,
                         calib_images=128, seed=args.seed, progress=not args.no_progress, log_every=5)
    trainer = Trainer(supernet, load_schedule('demo', args.epochs_scale), train_set, val_set, calib_set, config)
    trainer.run()
    print(_write_report(trainer, run_dir))

    space = supernet.space
    named = [('min', space.min()), ('mid', space.mid()), ('max', space.max())]
    print('[4/5] Top-1 of BN-recalibrated subnets on the validation split:')
    for row in _evaluate_named(trainer, named):
        model = supernet.extract(row['spec'])
        flops = count_flops(model, row['spec'].resolution)
        print(f"      {row['subnet']:4s} {row['top1']:6.2f}%  {flops / 1e6:7.1f} MFLOPs  "
              f"depths {list(row['spec'].depths)}")

    flops_min = count_flops(supernet.extract(space.min()), space.min().resolution)
    flops_max = count_flops(supernet.extract(space.max()), space.max().resolution)
    budget = args.flops_budget or (flops_min + flops_max) / 2
    print(f'[5/5] Searching a subnet under {budget / 1e6:.1f} MFLOPs (random search, {args.search_samples} samples)')
    rng = random.Random(args.seed)
    feasible = []
    for _ in range(args.search_samples):
        subnet = space.sample(rng)
        flops = count_flops(supernet.extract(subnet), subnet.resolution)
        if flops <= budget:
            feasible.append((flops, subnet))
    if not feasible:
        raise ValueError(f'No sampled subnet fits {budget / 1e6:.1f} MFLOPs; the smallest has {flops_min / 1e6:.1f}')
    candidates = sorted(feasible, key=lambda fs: -fs[0])[:args.search_evaluate]
    scored = [(trainer.evaluate_subnet(s)['top1'], f, s) for f, s in candidates]
    top1, flops, best = max(scored, key=lambda t: (t[0], t[1]))
    print(f'      best: {top1:.2f}% at {flops / 1e6:.1f} MFLOPs, {best.to_dict()}')

    export = output / 'export'
    export.mkdir(exist_ok=True)
    model = supernet.extract(best).eval()
    best.to_json(export / 'subnet.json')
    save_file(model.state_dict(), str(export / 'model.safetensors'))
    model_args = dict(subnet=best.to_dict(), num_classes=num_classes, resolutions=list(resolutions))
    save_for_hf(model, str(export / 'timm'), model_args=model_args, safe_serialization=True)
    print(f"Exported to {export}: subnet.json, model.safetensors, and timm/ "
          f"(timm.create_model('local-dir:{export / 'timm'}', pretrained=True))")
    print(f'Done in {time.time() - start:.0f} s. Metrics: {run_dir / "metrics.jsonl"}, '
          f'plot: {run_dir / "val_accuracy.png"}')
    return 0


# --- parser ---------------------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (None, off switches) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or 'default' in (action.help or ''):
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
    g.add_argument('--log-every', type=int, default=default.log_every)
    g.add_argument('--seed', type=int, default=default.seed)
    g.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')
    t.set_defaults(func=_train)

    d = sub.add_parser('demo', help='train, search and export on a generated dataset (no downloads)',
                       formatter_class=_HelpFormatter)
    d.add_argument('--model', default='ofa_mobilenetv3_large_100', help="registered ofa_* name")
    d.add_argument('--output', default='ofa_timm_demo', help='folder for data, run and export')
    d.add_argument('--num-classes', type=int, default=4)
    d.add_argument('--image-size', type=int, default=64)
    d.add_argument('--epochs-scale', type=float, default=1.0)
    d.add_argument('--flops-budget', type=float, default=None, help='FLOPs (default: halfway between min and max)')
    d.add_argument('--search-samples', type=int, default=40)
    d.add_argument('--search-evaluate', type=int, default=4, help='feasible candidates to evaluate')
    d.add_argument('--seed', type=int, default=0)
    d.add_argument('--no-progress', action='store_true')
    d.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f'ofa-timm {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
