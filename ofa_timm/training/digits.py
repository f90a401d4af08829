"""Real handwritten digits as an ImageFolder: scikit-learn's bundled 8x8 digits, upscaled, with a stratified split.

The 1,797 images (10 classes, 174-183 each) ship inside the scikit-learn wheel, so this runs offline. They are the
evidence set of ``benchmarks/ps_quality.py`` and the data of ``ofa-timm demo``.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

__all__ = ['make_digits_dataset']


def make_digits_dataset(
        root: Union[str, os.PathLike],
        val_per_class: int = 50,
        image_size: int = 32,
        seed: int = 0,
        splits: Sequence[str] = ('train', 'validation'),
) -> Path:
    """Write ``root/{train,validation}/{0..9}/*.png`` from ``sklearn.datasets.load_digits`` and return ``root``.

    The split is stratified and fixed by ``seed``: each class puts exactly ``val_per_class`` images into the
    validation split and the rest into training (``val_per_class=50`` gives 1,297 / 500 images). Existing complete
    datasets are reused, so repeated runs cost nothing.

    Args:
        root: Output folder.
        val_per_class: Validation images per class (at most 170, the smallest class has 174).
        image_size: Side of the square images; the 8x8 originals are upscaled bicubically.
        seed: Seed of the split.
        splits: Names of the train and validation split folders.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError('make_digits_dataset needs scikit-learn: pip install scikit-learn') from e
    if not 1 <= val_per_class <= 170:
        raise ValueError(f'val_per_class must be in 1..170, got {val_per_class}')
    if image_size < 8:
        raise ValueError(f'image_size must be >= 8, got {image_size}')
    root = Path(root)
    marker = root / '.digits.json'
    settings = dict(val_per_class=val_per_class, image_size=image_size, seed=seed, splits=list(splits))
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root  # written before with the same settings
    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(seed)
    for split in splits:
        if (root / split).is_dir():
            shutil.rmtree(root / split)  # another split leaves no stale images behind
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(labels == label))
        for split, part in zip(splits, (indices[val_per_class:], indices[:val_per_class])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (images[i] * (255. / 16.)).round().astype(np.uint8)  # grey levels 0..16
                img = Image.fromarray(pixels, mode='L').resize((image_size, image_size), Image.BICUBIC)
                img.save(folder / f'{i:04d}.png')
    marker.write_text(json.dumps(settings))
    return root
