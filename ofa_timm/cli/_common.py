"""What the verbs of ``ofa-timm`` share: the help formatter, process-group setup, config dataclasses from arguments,
and loading a trained supernet."""
import argparse
import os
from dataclasses import fields
from typing import Any, Tuple

import torch

__all__ = ['HelpFormatter', 'init_distributed', 'config_from_args', 'load_supernet_from_args', 'data_loaders']


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (None, '', switches) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if switch or action.default in (None, '') or 'default' in (action.help or ''):
            return action.help or ''
        return super()._get_help_string(action)


def init_distributed() -> int:
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


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """A config dataclass from the parsed arguments whose ``dest`` is one of its fields."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def load_supernet_from_args(args: argparse.Namespace) -> torch.nn.Module:
    """The supernet named by ``--model``, with ``--checkpoint`` weights, ``--num-classes`` and ``--resolutions``."""
    import ofa_timm  # noqa: F401  registers the ofa_* models
    from ..search.export import load_supernet
    return load_supernet(args.model, args.checkpoint, num_classes=getattr(args, 'num_classes', None),
                         resolutions=getattr(args, 'resolutions', None),
                         model_kwargs=getattr(args, 'model_kwargs', None))


def data_loaders(data_dir: str, image_size: int, batch_size: int, workers: int,
                 seed: int = 0) -> Tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """(calibration loader over training images, validation loader) of an ImageFolder-style dataset."""
    from torch.utils.data import DataLoader
    from ..training import DataConfig, build_datasets
    _, val_set, calib_set, _ = build_datasets(DataConfig(data_dir, image_size=image_size), seed=seed)
    g = torch.Generator().manual_seed(seed)
    calib = DataLoader(calib_set, batch_size=batch_size, shuffle=True, num_workers=workers, generator=g)
    val = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers)
    return calib, val
