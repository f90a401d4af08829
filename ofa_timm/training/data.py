"""Data for progressive shrinking: timm datasets and transforms, made exactly resumable.

Reproducibility is what makes ``--resume`` exact: each epoch's order is a permutation seeded by (seed, epoch),
sharded across ranks, and each sample's augmentation is seeded by (seed, epoch, index). A run resumed mid-epoch
therefore skips the batches already seen without loading them and sees the same pixels the uninterrupted run saw,
whatever the number of loader workers.
"""
import os
import random
import signal
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader, Dataset, Sampler

from .._rng import preserved_rng

__all__ = ['IMAGENET_SCALE', 'DataConfig', 'SeededDataset', 'EpochSampler', 'build_datasets', 'train_loader',
           'eval_loader', 'resize_to', 'num_classes_of', 'default_workers']

#: timm's ImageNet random-resized-crop area range, the default: on a small image it can keep as little as 8 %.
IMAGENET_SCALE: Tuple[float, float] = (0.08, 1.0)


@dataclass
class DataConfig:
    """Where the data comes from and how it is augmented.

    Args:
        data_dir: Dataset root (an ImageFolder root with ``train``/``validation`` splits, or a timm dataset root).
        dataset: timm dataset name ('' for an ImageFolder / tar, 'torch/cifar10', 'hfds/...', ...).
        train_split: Training split name.
        val_split: Validation split name.
        image_size: Side the loaders produce; batches are resized to each step's resolution on the fly.
        auto_augment: timm auto-augment policy, e.g. 'rand-m9-mstd0.5' (RandAugment); None disables it.
        scale: Area range of the random-resized crop.
        hflip: Probability of a horizontal flip (0 for data that is not mirror-symmetric, such as digits).
        interpolation: Resize interpolation.
        mean: Normalisation mean.
        std: Normalisation std.
        dataset_download: Allow timm to download a torchvision dataset.
    """
    data_dir: str
    dataset: str = ''
    train_split: str = 'train'
    val_split: str = 'validation'
    image_size: int = 224
    auto_augment: Optional[str] = None
    scale: Tuple[float, float] = IMAGENET_SCALE
    hflip: float = 0.5
    interpolation: str = 'bilinear'
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    dataset_download: bool = False


class SeededDataset(Dataset):
    """Reads ``(epoch, index)`` keys and augments sample ``index`` with RNGs seeded by (seed, epoch, index).

    The calling process' random states are saved and restored around each sample, so the main process' RNG stream
    (mixup, dropout) does not depend on how many samples were loaded in process.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch) * 1_000_000_007 + index
        with preserved_rng():
            torch.manual_seed(sample_seed % 2 ** 63)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2 ** 32)
            return self.dataset[index]


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys of one epoch: a seeded permutation, this rank's shard, from a start batch.

    Every rank gets the same number of full batches (the tail that does not fill a batch on every rank is dropped).
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if dataset_len < batch_size * world_size:
            raise ValueError(
                f'The training set has {dataset_len} samples, fewer than one batch per rank '
                f'({batch_size} x {world_size} ranks); lower --batch-size')
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_len // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        order = torch.randperm(self.dataset_len, generator=g)[:used]
        shard = order[self.rank::self.world_size].tolist()
        for index in shard[self.start_batch * self.batch_size:]:
            yield self.epoch, index

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def build_datasets(cfg: DataConfig, seed: int = 0) -> Tuple[SeededDataset, Dataset, Dataset, int]:
    """timm datasets with timm transforms.

    Returns:
        (seeded training set, validation set, training images with the eval transform for BN calibration,
        number of classes).
    """
    train_tf = create_transform(
        cfg.image_size, is_training=True, auto_augment=cfg.auto_augment, scale=tuple(cfg.scale), hflip=cfg.hflip,
        interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
    eval_tf = create_transform(
        cfg.image_size, is_training=False, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
        crop_pct=1.0 if cfg.image_size < 64 else 0.875)
    try:
        train = create_dataset(cfg.dataset, root=cfg.data_dir, split=cfg.train_split, is_training=True,
                               download=cfg.dataset_download, transform=train_tf)
        val = create_dataset(cfg.dataset, root=cfg.data_dir, split=cfg.val_split, is_training=False,
                             download=cfg.dataset_download, transform=eval_tf)
        calib = create_dataset(cfg.dataset, root=cfg.data_dir, split=cfg.train_split, is_training=False,
                               download=cfg.dataset_download, transform=eval_tf)
    except (FileNotFoundError, RuntimeError, AssertionError) as e:
        reason = str(e).strip() or ('no such folder' if not os.path.exists(cfg.data_dir) else type(e).__name__)
        name = cfg.dataset or 'ImageFolder'
        raise ValueError(f'Cannot read dataset {name!r} at {cfg.data_dir!r}: {reason}') from None
    num_classes = num_classes_of(train)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f'Empty split in {cfg.data_dir!r}: {len(train)} training, {len(val)} validation samples')
    return SeededDataset(train, seed), val, calib, num_classes


def num_classes_of(dataset: Dataset) -> int:
    """The number of classes of a timm dataset (from its reader's or its own class list).

    Raises:
        ValueError: If the dataset does not tell.
    """
    reader = getattr(dataset, 'reader', None)
    for obj in (reader, dataset, getattr(reader, 'dataset', None)):
        mapping = getattr(obj, 'class_to_idx', None)
        if mapping:
            return len(mapping)
        classes = getattr(obj, 'classes', None)
        if classes:
            return len(classes)
    raise ValueError('Cannot tell the number of classes of the dataset; pass --num-classes')


def default_workers(limit: int = 4) -> int:
    """Data-loader workers per process by default: ``limit``, or the CPUs this process may run on if fewer (PyTorch
    warns about every loader with more workers than that)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(0, min(limit, cpus))


def resize_to(images: torch.Tensor, resolution: Optional[int]) -> torch.Tensor:
    """Resize a batch to a square ``resolution`` (a subnet's); every stage of training, BN calibration and evaluation
    resizes the same way, so statistics and accuracy see the same pixels."""
    if resolution is None or images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode='bilinear', align_corners=False, antialias=True)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGINT/SIGTERM: a terminal's Ctrl-C (or a scheduler's SIGTERM) reaches every process of
    the group, and a worker that died of it would fail the step the trainer finishes before checkpointing. The
    trainer shuts its workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(dataset: SeededDataset, sampler: EpochSampler, workers: int, pin_memory: bool) -> DataLoader:
    # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG.
    return DataLoader(
        dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=True, generator=torch.Generator().manual_seed(0), persistent_workers=False,
        worker_init_fn=_leave_signals_to_the_trainer)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool,
                indices: Optional[Sequence[int]] = None) -> DataLoader:
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=_leave_signals_to_the_trainer)
