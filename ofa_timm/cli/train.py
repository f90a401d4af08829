"""``ofa-timm train``: progressive shrinking of a supernet, on one process or many under ``torchrun``."""
import argparse
import contextlib
from pathlib import Path
from typing import Any, Dict

import torch

from ._common import HelpFormatter, config_from_args, init_distributed

__all__ = ['add_parsers', 'add_model_arguments', 'add_training_arguments', 'schedule_options']


def add_model_arguments(g: Any) -> None:
    """``--model``, ``--model-kwargs``, ``--pretrained``, ``--pretrained-file``, ``--resolutions``."""
    from timm.utils import ParseKwargs
    g.add_argument('--model', default='ofa_mobilenetv3_large_100', help="registered ofa_* name")
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='source model or space arguments, e.g. depth=6 img_size=32 patch_size=4 (as timm train.py)')
    g.add_argument('--pretrained', action='store_true', help="load the name's pretrained weights (skips 'full')")
    g.add_argument('--pretrained-file', default=None, help='local weights file (.pth/.safetensors) to start from')
    g.add_argument('--resolutions', type=int, nargs='+', default=None,
                   help="elastic resolutions (default: OFA's 128..224 and the source's)")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The schedule, optimisation and run settings of progressive shrinking (``TrainConfig``'s fields)."""
    from ..training import KD_KINDS, TrainConfig
    from ..training.trainer import VALIDATIONS_PER_STAGE
    default = TrainConfig()
    g = p.add_argument_group('schedule')
    g.add_argument('--schedule', default='auto',
                   help="auto (fast from pretrained weights, else the from-scratch recipe, with stages no shorter "
                        "than --min-steps) | ofa | fast | scratch | demo | path to a YAML schedule")
    g.add_argument('--epochs-scale', type=float, default=None, help='multiply every stage length')
    g.add_argument('--min-steps', type=int, default=None,
                   help="floor of the schedule's length in optimizer steps, shared out over its stages (auto: "
                        "the recipe's own floor; 0: none)")
    g.add_argument('--lr-scale', type=float, default=1.0, help='multiply every stage lr')
    g.add_argument('--sampling', choices=('uniform', 'sandwich'), default=None, help='override every stage')
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch-size', type=int, default=default.batch_size, help='per process')
    g.add_argument('--opt', default=default.opt, help='timm optimizer (sgd = Nesterov SGD)')
    g.add_argument('--momentum', type=float, default=default.momentum)
    g.add_argument('--weight-decay', type=float, default=default.weight_decay)
    g.add_argument('--clip-grad', type=float, default=default.clip_grad,
                   help="clip the gradient norm in every stage (default: the schedule's own clipping)")
    g.add_argument('--ema-decay', type=float, default=default.ema_decay,
                   help="keep an EMA of the supernet in last.pth (under 'ema'); search and export load the "
                        'trained weights, not the EMA')
    g.add_argument('--smoothing', dest='label_smoothing', type=float, default=default.label_smoothing)
    g.add_argument('--kd', dest='kd_kind', choices=KD_KINDS, default=default.kd_kind,
                   help="distillation loss: soft-target cross entropy (OFA), KL divergence, or AlphaNet's adaptive "
                        'alpha-divergence')
    g.add_argument('--kd-temperature', type=float, default=default.kd_temperature)
    g.add_argument('--warmup-lr', type=float, default=default.warmup_lr, help='lr at the start of a warmup')
    g.add_argument('--min-lr', type=float, default=default.min_lr, help="lr at the end of each stage's cosine")
    g.add_argument('--no-zero-init-residual', dest='zero_init_residual', action='store_false',
                   help="from scratch, keep timm's init of the last BN scale of residual blocks (default: zero)")
    g.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default=default.amp)
    g.add_argument('--channels-last', action='store_true')
    g = p.add_argument_group('run')
    g.add_argument('--calib-images', type=int, default=default.calib_images, help='images for BN recalibration')
    g.add_argument('--val-resolutions', type=int, nargs='+', default=default.val_resolutions,
                   help="validation grid resolutions (default: the stage's min and max)")
    g.add_argument('--val-every', type=int, default=default.val_every,
                   help=f'epochs between validations (default: at most {VALIDATIONS_PER_STAGE} per stage, evenly, the '
                        'last at its end)')
    g.add_argument('--checkpoint-every', type=int, default=default.checkpoint_every,
                   help='steps between extra checkpoints (0: epoch ends only)')
    g.add_argument('--checkpoint-minutes', type=float, default=default.checkpoint_minutes,
                   help='also checkpoint when this many minutes passed since the last checkpoint (0: never)')
    g.add_argument('--log-every', type=int, default=default.log_every, help='steps between metrics.jsonl records')
    g.add_argument('--progress-seconds', type=float, default=default.progress_seconds,
                   help='seconds between progress lines when stdout is not a terminal')
    g.add_argument('--seed', type=int, default=default.seed)
    g.add_argument('--no-progress', dest='progress', action='store_false',
                   help='no progress bars (step lines and a line every --progress-seconds stay)')


def add_parsers(sub: Any) -> None:
    from ..training import TrainConfig
    default = TrainConfig()
    t = sub.add_parser('train', help='progressive shrinking of a supernet (torchrun for several processes)',
                       formatter_class=HelpFormatter)
    add_model_arguments(t.add_argument_group('model'))
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
    g.add_argument('--workers', type=int, default=default.workers,
                   help='data-loader workers per process (default: 4, or the CPUs here if fewer)')
    add_training_arguments(t)
    t.add_argument('--output', default='output/ofa', help='run folder')
    t.add_argument('--resume', action='store_true', help='continue the run in --output exactly where it stopped')
    t.set_defaults(func=train)


def schedule_options(args: argparse.Namespace) -> Dict[str, Any]:
    """``build_schedule``'s keyword arguments from ``--schedule``, ``--epochs-scale``, ``--min-steps``,
    ``--lr-scale`` and ``--sampling`` (``ofa-timm train`` and ``ofa-timm run`` take the same)."""
    return dict(spec=args.schedule, epochs_scale=args.epochs_scale, min_steps=args.min_steps,
                lr_scale=args.lr_scale, sampling=args.sampling)


def train(args: argparse.Namespace) -> int:
    from .._io import save_supernet
    from .._lock import folder_lock
    from ..search.export import load_supernet
    from ..training import DataConfig, TrainConfig, Trainer, build_datasets, build_schedule
    from ..training.report import write_run_report

    rank = init_distributed()
    output = Path(args.output)
    if args.data_dir is None:
        raise ValueError('--data-dir is required (an ImageFolder root with train/ and validation/, or a timm dataset '
                         'root with --dataset)')
    with folder_lock(output) if rank == 0 else contextlib.nullcontext():
        pretrained = args.pretrained or bool(args.pretrained_file)
        # The loaders produce the largest resolution; each step resizes its batch to the step's resolution.
        image_size = args.img_size or (max(args.resolutions) if args.resolutions else 224)
        data_cfg = DataConfig(
            data_dir=args.data_dir, dataset=args.dataset, train_split=args.train_split, val_split=args.val_split,
            image_size=image_size, auto_augment=args.aa, scale=tuple(args.scale),
            dataset_download=args.dataset_download)
        train_set, val_set, calib_set, num_classes = build_datasets(data_cfg, seed=args.seed)
        num_classes = args.num_classes or num_classes
        torch.manual_seed(args.seed)
        supernet = load_supernet(args.model, num_classes=num_classes, resolutions=args.resolutions,
                                 pretrained=args.pretrained, pretrained_file=args.pretrained_file,
                                 model_kwargs=args.model_kwargs)
        options = schedule_options(args)
        schedule = build_schedule(options.pop('spec'), supernet.space, pretrained=pretrained, **options)
        config = config_from_args(TrainConfig, args, output=str(output))
        trainer = Trainer(supernet, schedule, train_set, val_set, calib_set, config, pretrained=pretrained)
        if args.resume and (output / 'last.pth').is_file():
            trainer.resume()
            if rank == 0:
                print(f"Resuming {output / 'last.pth'} at {trainer.where()}", flush=True)
        elif args.resume:
            if rank == 0:
                print(f'{output} holds no checkpoint yet: starting the run', flush=True)
        elif (output / 'last.pth').is_file():
            raise ValueError(f'{output} already holds a run (last.pth); pass --resume to continue it or pick another '
                             f'--output')
        if rank == 0:
            print(trainer.describe_schedule(), flush=True)
        trainer.run()
        if rank == 0:
            path = save_supernet(trainer.supernet, output / 'supernet.safetensors')
            print(write_run_report(trainer.summaries(), output))
            print(f"Supernet weights: {path}. Load them (model kwargs come from the file) with\n"
                  f"  timm.create_model({args.model!r}, pretrained=True, pretrained_cfg_overlay=dict(file='{path}'), "
                  f"subnet='min')\n"
                  f"or timm.create_model({args.model!r}, num_classes={trainer.supernet.num_classes}, "
                  f"resolutions={list(trainer.supernet.space.resolutions)}, checkpoint_path='{path}')")
    return 0
