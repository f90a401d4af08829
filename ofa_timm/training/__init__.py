"""Training utilities: data, progressive shrinking, distillation, BN calibration."""
from .synthetic import SHAPES, make_shapes_dataset

__all__ = ['SHAPES', 'make_shapes_dataset']
