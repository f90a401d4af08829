"""The pipeline's data: training, validation and test splits, the test split held out from everything but the report."""
import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, Subset

from ..training import DataConfig, SeededDataset, build_datasets

__all__ = ['Splits', 'load_splits', 'carve_test_split', 'dataset_targets']


@dataclass
class Splits:
    """The datasets of a pipeline run.

    Args:
        train: Training images (augmented, seeded) for progressive shrinking.
        calib: Training images with the evaluation transform, for BN recalibration.
        val: Validation images: the only split that trains nothing and is used to tune, label the predictor and
            choose among finalists.
        test: Test images: used by the report alone.
        num_classes: Number of classes.
        fingerprint: Which images each split holds (a digest of their indices and source), for the step records.
    """
    train: SeededDataset
    calib: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    fingerprint: str


def dataset_targets(dataset: Dataset) -> List[int]:
    """The class of every sample, read from the dataset's reader where it keeps them (no image is decoded)."""
    reader = getattr(dataset, 'reader', None)
    for obj in (reader, dataset):
        samples = getattr(obj, 'samples', None)
        if samples is not None and len(samples) == len(dataset):
            return [int(s[1]) for s in samples]
        targets = getattr(obj, 'targets', None)
        if targets is not None and len(targets) == len(dataset):
            return [int(t) for t in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def carve_test_split(targets: Sequence[int], fraction: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Split sample indices into (validation, test), stratified by class and fixed by ``seed``: each class gives
    ``round(fraction * n)`` of its ``n`` samples (at least one when it has two or more) to the test split."""
    if not 0 < fraction < 1:
        raise ValueError(f'The test fraction must be in (0, 1), got {fraction}')
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    val, test = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
        test.extend(idx[:k].tolist())
        val.extend(idx[k:].tolist())
    return sorted(val), sorted(test)


def load_splits(cfg: DataConfig, test_dir: Optional[str] = None, test_fraction: float = 0.5,
                seed: int = 0) -> Splits:
    """Training, calibration, validation and test sets of a dataset.

    The test split is ``test_dir`` (an ImageFolder with the training set's classes), or carved from the validation
    split (:func:`carve_test_split`).

    Raises:
        ValueError: If the data cannot be read, or the test folder's classes differ from the training set's.
    """
    from ..training.data import num_classes_of
    from .workdir import tree_digest
    train, val_full, calib, num_classes = build_datasets(cfg, seed=seed)
    h = hashlib.sha256(f'{os.path.abspath(cfg.data_dir)}|{cfg.dataset}|{cfg.train_split}|{cfg.val_split}|'
                       f'{len(train)}|{len(val_full)}'.encode())
    folders = [os.path.join(cfg.data_dir, s) for s in (cfg.train_split, cfg.val_split)]
    if not cfg.dataset and all(os.path.isdir(f) for f in folders):
        h.update(tree_digest(folders).encode())  # an image added, removed or rewritten changes the fingerprint
    if test_dir:
        test_cfg = DataConfig(test_dir, image_size=cfg.image_size, interpolation=cfg.interpolation, mean=cfg.mean,
                              std=cfg.std)
        from timm.data import create_dataset, create_transform
        tf = create_transform(cfg.image_size, is_training=False, interpolation=test_cfg.interpolation,
                              mean=test_cfg.mean, std=test_cfg.std, crop_pct=1.0 if cfg.image_size < 64 else 0.875)
        try:
            test = create_dataset('', root=test_dir, split='', is_training=False, transform=tf)
        except (FileNotFoundError, RuntimeError, AssertionError) as e:
            raise ValueError(f'Cannot read the test folder {test_dir!r}: {e}') from None
        if num_classes_of(test) != num_classes:
            raise ValueError(f'The test folder {test_dir!r} has {num_classes_of(test)} classes, the training set '
                             f'{num_classes}')
        val = val_full
        h.update(f'|test:{os.path.abspath(test_dir)}|{len(test)}|{tree_digest([test_dir])}'.encode())
    else:
        val_idx, test_idx = carve_test_split(dataset_targets(val_full), test_fraction, seed)
        val, test = Subset(val_full, val_idx), Subset(val_full, test_idx)
        h.update(f'|carved:{test_fraction}:{seed}|'.encode() + np.asarray(test_idx, dtype=np.int64).tobytes())
    if len(val) == 0 or len(test) == 0:
        raise ValueError(f'Empty validation or test split ({len(val)} / {len(test)} images)')
    return Splits(train, calib, val, test, num_classes, h.hexdigest())
