"""A small, learnable image-classification dataset drawn on the fly: coloured shapes in an ImageFolder.

Used by ``ofa-timm demo``, the examples and the tests, so that everything runs offline without downloads.
"""
import os
import random
from pathlib import Path
from typing import Sequence, Tuple, Union

from PIL import Image, ImageDraw

__all__ = ['SHAPES', 'make_shapes_dataset']

SHAPES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'cross', 'ring', 'bar')


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
        image_size: int = 64,
        seed: int = 0,
        splits: Sequence[str] = ('train', 'validation'),
) -> Path:
    """Write ``root/{train,validation}/{class}/*.png`` and return ``root``.

    Existing complete datasets are reused, so repeated runs cost nothing.

    Args:
        root: Output folder.
        num_classes: Number of shape classes (at most ``len(SHAPES)``).
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        image_size: Side of the square images.
        seed: Seed of the drawing RNG (the dataset is deterministic).
        splits: Names of the train and validation split folders.
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f'num_classes must be in 2..{len(SHAPES)}, got {num_classes}')
    if image_size < 16:
        raise ValueError(f'image_size must be >= 16, got {image_size}')
    root = Path(root)
    rng = random.Random(seed)
    for split, count in zip(splits, (train_per_class, val_per_class)):
        for shape in SHAPES[:num_classes]:
            folder = root / split / shape
            if folder.is_dir() and len(list(folder.glob('*.png'))) == count:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _draw(shape, image_size, rng).save(folder / f'{i:05d}.png')
    return root
