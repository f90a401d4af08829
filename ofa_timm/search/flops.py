"""Cost of a subnet: FLOPs (counted by ``torch.utils.flop_counter``) and parameters."""

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_flops', 'count_params']


@torch.no_grad()
def count_flops(model: nn.Module, resolution: int, in_chans: int = 3, batch_size: int = 1) -> int:
    """FLOPs of one forward pass (a multiply-add counts 2) at ``resolution``, for ``batch_size`` images.

    Counted by PyTorch's own ``FlopCounterMode`` on the model as it runs, so an elastic supernet is counted for its
    active subnet and an extracted model for itself. Attention layers run their unfused matmuls while counting:
    the counter sees nothing of a fused CPU attention (``F.scaled_dot_product_attention``).
    """
    device = next(model.parameters()).device
    was_training = model.training
    fused = {m: m.fused_attn for m in model.modules() if isinstance(getattr(m, 'fused_attn', None), bool)}
    model.eval()
    try:
        for m in fused:
            m.fused_attn = False
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(batch_size, in_chans, resolution, resolution, device=device))
    finally:
        model.train(was_training)
        for m, value in fused.items():
            m.fused_attn = value
    return int(counter.get_total_flops())


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
