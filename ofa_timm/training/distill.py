"""Losses of progressive shrinking: label-smoothed cross entropy plus knowledge distillation."""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['distillation_loss', 'classification_loss']


def distillation_loss(
        student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = 'ce', temperature: float = 1.0,
) -> torch.Tensor:
    """Soft-target cross entropy (OFA) or KL divergence between student and (detached) teacher predictions.

    Args:
        student_logits: Student logits (B, C).
        teacher_logits: Teacher logits (B, C); gradients never flow into them.
        kind: ``'ce'`` (OFA's soft-target cross entropy) or ``'kl'``.
        temperature: Softmax temperature; the loss is scaled by T² so gradients keep their size.
    """
    t = temperature
    target = F.softmax(teacher_logits.detach().float() / t, dim=-1)
    log_p = F.log_softmax(student_logits.float() / t, dim=-1)
    if kind == 'ce':
        loss = -(target * log_p).sum(-1).mean()
    elif kind == 'kl':
        loss = F.kl_div(log_p, target, reduction='batchmean')
    else:
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    return loss * (t * t)


def classification_loss(
        logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.1,
        mixed_target: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross entropy with label smoothing; with mixup/cutmix, against the mixed soft targets."""
    if mixed_target is not None:
        return -(mixed_target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
