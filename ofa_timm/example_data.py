"""Small image-classification datasets written on the spot, so that the demo, the examples, the benchmarks and the
tests run offline: scikit-learn's real handwritten digits, and coloured shapes drawn from a seed.

Both are written as an ImageFolder (``root/{train,validation,test}/{class}/*.png``) that timm's ``create_dataset``
reads, and both are reused when a folder written with the same settings exists.
"""
import json
import os
import random
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['SHAPES', 'make_digits_dataset', 'make_shapes_dataset']

SHAPES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'cross', 'ring', 'bar')
_MARKER = '.example_data.json'


def _written_before(root: Path, settings: Dict) -> bool:
    marker = root / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == settings


def _start(root: Path, splits: Tuple[str, ...]) -> None:
    """Remove the splits of an earlier write, so that other settings leave no stale images behind."""
    (root / _MARKER).unlink(missing_ok=True)
    for split in ('train', 'validation', 'test'):
        if (root / split).is_dir():
            shutil.rmtree(root / split)
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)


def make_digits_dataset(
        root: Union[str, os.PathLike],
        val_per_class: int = 50,
        test_per_class: int = 0,
        train_per_class: Optional[int] = None,
        image_size: int = 32,
        seed: int = 0,
) -> Path:
    """Write scikit-learn's 1,797 handwritten digits (real 8x8 scans, 10 classes of 174-183 images) as an ImageFolder
    and return ``root``.

    The split is stratified and fixed by ``seed``: each class puts exactly ``test_per_class`` images into ``test``,
    ``val_per_class`` into ``validation`` and the rest (or ``train_per_class`` of the rest) into ``train``. The three
    splits are disjoint. The images ship inside the scikit-learn wheel, so this runs offline.

    Args:
        root: Output folder.
        val_per_class: Validation images per class (the split to tune and select on).
        test_per_class: Test images per class (the split to report on); 0 writes no test split.
        train_per_class: Training images per class (default: every image not held out), for small-data runs.
        image_size: Side of the square images; the 8x8 originals are upscaled bicubically.
        seed: Seed of the split.

    Raises:
        ValueError: If the held-out images leave a class too few training images, or the size is below 8.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError('make_digits_dataset needs scikit-learn: pip install scikit-learn') from e
    if val_per_class < 1 or test_per_class < 0 or val_per_class + test_per_class > 170:
        raise ValueError(f'val_per_class must be >= 1, test_per_class >= 0 and their sum at most 170 (the smallest '
                         f'class has 174 images), got {val_per_class} and {test_per_class}')
    if train_per_class is not None and not 1 <= train_per_class <= 174 - val_per_class - test_per_class:
        raise ValueError(f'train_per_class must be in 1..{174 - val_per_class - test_per_class} (what the held-out '
                         f'images leave of the smallest class), got {train_per_class}')
    if image_size < 8:
        raise ValueError(f'image_size must be >= 8, got {image_size}')
    root = Path(root)
    settings = dict(kind='digits', val_per_class=val_per_class, test_per_class=test_per_class,
                    train_per_class=train_per_class, image_size=image_size, seed=seed)
    if _written_before(root, settings):
        return root
    splits = ('train', 'validation') + (('test',) if test_per_class else ())
    _start(root, splits)
    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(labels == label))
        held = val_per_class + test_per_class
        parts = {'validation': indices[:val_per_class], 'test': indices[val_per_class:held],
                 'train': indices[held:][:train_per_class]}
        for split in splits:
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in parts[split]:
                pixels = (images[i] * (255. / 16.)).round().astype(np.uint8)  # grey levels 0..16
                img = Image.fromarray(pixels, mode='L').resize((image_size, image_size), Image.BICUBIC)
                img.save(folder / f'{i:04d}.png')
    (root / _MARKER).write_text(json.dumps(settings))
    return root


def _draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new('RGB', (size, size), background)
    draw = ImageDraw.Draw(img)
    colour = tuple(rng.randint(120, 255) for _ in range(3))
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = (rng.uniform(r, size - r) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == 'circle':
        draw.ellipse(box, fill=colour)
    elif shape == 'square':
        draw.rectangle(box, fill=colour)
    elif shape == 'triangle':
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == 'cross':
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    elif shape == 'ring':
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape == 'bar':
        w = r / 4
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    else:
        raise ValueError(f'Unknown shape {shape!r}; allowed: {list(SHAPES)}')
    return img


def make_shapes_dataset(
        root: Union[str, os.PathLike],
        num_classes: int = 4,
        train_per_class: int = 64,
        val_per_class: int = 16,
        test_per_class: int = 0,
        image_size: int = 64,
        seed: int = 0,
) -> Path:
    """Write coloured shapes (one class per shape, random colours, sizes and positions) as an ImageFolder and return
    ``root``.

    Args:
        root: Output folder.
        num_classes: Number of shape classes (at most ``len(SHAPES)``).
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        test_per_class: Test images per class; 0 writes no test split.
        image_size: Side of the square images.
        seed: Seed of the drawing RNG (the dataset is deterministic).
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f'num_classes must be in 2..{len(SHAPES)}, got {num_classes}')
    if image_size < 16:
        raise ValueError(f'image_size must be >= 16, got {image_size}')
    if train_per_class < 1 or val_per_class < 1 or test_per_class < 0:
        raise ValueError(f'train_per_class and val_per_class must be >= 1 and test_per_class >= 0, got '
                         f'{train_per_class}, {val_per_class}, {test_per_class}')
    root = Path(root)
    settings = dict(kind='shapes', num_classes=num_classes, train_per_class=train_per_class,
                    val_per_class=val_per_class, test_per_class=test_per_class, image_size=image_size, seed=seed)
    if _written_before(root, settings):
        return root
    counts = {'train': train_per_class, 'validation': val_per_class, 'test': test_per_class}
    splits = tuple(s for s, n in counts.items() if n)
    _start(root, splits)
    rng = random.Random(seed)
    for split in splits:
        for shape in SHAPES[:num_classes]:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                _draw(shape, image_size, rng).save(folder / f'{i:05d}.png')
    (root / _MARKER).write_text(json.dumps(settings))
    return root
