"""Losses of progressive shrinking: label-smoothed cross entropy plus knowledge distillation."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['KD_KINDS', 'distillation_loss', 'alpha_divergence', 'classification_loss']

KD_KINDS = ('ce', 'kl', 'alpha')  # the distillation losses `distillation_loss` knows


def distillation_loss(
        student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = 'ce', temperature: float = 1.0,
) -> torch.Tensor:
    """Distillation loss between student and (detached) teacher predictions.

    Args:
        student_logits: Student logits (B, C).
        teacher_logits: Teacher logits (B, C); gradients never flow into them.
        kind: ``'ce'`` (OFA's soft-target cross entropy), ``'kl'`` or ``'alpha'`` (AlphaNet's adaptive
            α-divergence, :func:`alpha_divergence`).
        temperature: Softmax temperature; the loss is scaled by T² so gradients keep their size.
    """
    if kind not in KD_KINDS:
        raise ValueError(f'kind must be one of {KD_KINDS}, got {kind!r}')
    t = temperature
    student, teacher = student_logits.float() / t, teacher_logits.detach().float() / t
    if kind == 'alpha':
        loss = alpha_divergence(student, teacher)
    else:
        target, log_p = F.softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
        loss = -(target * log_p).sum(-1).mean() if kind == 'ce' else F.kl_div(log_p, target, reduction='batchmean')
    return loss * (t * t)


def _alpha_terms(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float, clip: float
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per sample, D_α(p‖q) = Σ q (w^α − 1) / (α(α − 1)) with w = p / q, and the weights c such that
    −Σ c·log q has D_α's gradient in the student's logits (c = q·w^α / α), w^α clipped at ``clip``."""
    log_w = log_p - log_q.detach()
    if abs(alpha - 1.) < 1e-6:  # the limit: KL(p‖q), whose weights are p itself (nothing to clip)
        p = log_p.exp()
        return (p * log_w).sum(-1), p
    q = log_q.detach().exp()
    w_alpha = torch.exp(alpha * log_w).clamp(max=clip)
    return (q * (w_alpha - 1.)).sum(-1) / (alpha * (alpha - 1.)), q * w_alpha / alpha


def alpha_divergence(
        student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha_min: float = -1., alpha_max: float = 1.,
        clip: float = 5.,
) -> torch.Tensor:
    """AlphaNet's adaptive α-divergence (Wang et al., 2021): per sample, the larger of D_α_min and D_α_max between the
    teacher's predictions p and the student's q, averaged over the batch.

    KL(p‖q), what soft-target cross entropy minimises, punishes a student that puts little mass where its teacher
    puts much, but barely one that spreads mass where the teacher puts none (over-estimating its uncertainty); a
    negative α punishes the second. Taking the larger of the two guards a small subnet against both. Its gradient
    scales each class by the importance weight w^α (w = p / q), clipped at ``clip`` so that a class the teacher rules
    out and the student does not (w^-1 = q / p, huge) cannot blow it up; the value returned is the divergence, its
    gradient the clipped one.

    Args:
        student_logits: Student logits (B, C).
        teacher_logits: Teacher logits (B, C); gradients never flow into them.
        alpha_min: The negative α (AlphaNet: −1).
        alpha_max: The positive α, at most 1 (AlphaNet: 1, KL(p‖q)).
        clip: Upper bound of the importance weights w^α in the gradient (AlphaNet: 5).
    """
    if not (alpha_min < 0 < alpha_max <= 1):
        raise ValueError(f'need alpha_min < 0 < alpha_max <= 1, got alpha_min={alpha_min}, alpha_max={alpha_max}')
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    low, low_weights = _alpha_terms(log_q, log_p, alpha_min, clip)
    high, high_weights = _alpha_terms(log_q, log_p, alpha_max, clip)
    pick_low = (low > high).unsqueeze(-1)
    value = torch.maximum(low, high).mean()
    surrogate = -(torch.where(pick_low, low_weights, high_weights) * log_q).sum(-1).mean()
    return value.detach() + surrogate - surrogate.detach()


def classification_loss(
        logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.1,
        mixed_target: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross entropy with label smoothing; with mixup/cutmix, against the mixed soft targets."""
    if mixed_target is not None:
        return -(mixed_target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
