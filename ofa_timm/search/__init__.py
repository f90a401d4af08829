"""Search over a trained supernet: cost models."""
from .flops import count_flops, count_params

__all__ = ['count_flops', 'count_params']
