"""Step-3 feature distillation (docs/method.md §4.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KD_NORMALIZATIONS = ("valid", "all")


def feature_kd_loss(f_student: torch.Tensor, f_teacher: torch.Tensor, valid: torch.Tensor, T: float = 2.0,
                    normalize: str = "valid") -> torch.Tensor:
    """T^2 * KL(softmax(f_t / T) || softmax(f_s / T)) over the D feature channels of each valid pixel.

    f_student, f_teacher [B, D, h, w] (the teacher is detached), valid [B, h, w] bool. The per-element
    terms are F.kl_div(log_softmax(f_s / T), softmax(f_t / T), reduction="none").
    ``normalize="all"`` is the original: the mean over all B*D*h*w elements, masked ones included in the
    denominator. ``"valid"``: the sum over valid pixels / (valid pixels * D), 0 without a valid pixel;
    with an all-true mask the two agree.
    """
    if normalize not in KD_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {KD_NORMALIZATIONS}, got {normalize!r}")
    if f_student.shape != f_teacher.shape or valid.shape != (f_student.shape[0], *f_student.shape[2:]):
        raise ValueError(f"shapes do not match: student {tuple(f_student.shape)}, teacher "
                         f"{tuple(f_teacher.shape)}, valid {tuple(valid.shape)} (want [B, D, h, w] x2, [B, h, w])")
    kl = F.kl_div(F.log_softmax(f_student / T, dim=1), F.softmax(f_teacher.detach() / T, dim=1), reduction="none")
    masked = kl * valid[:, None].to(kl.dtype)
    if normalize == "all":
        return T**2 * masked.mean()
    n = valid.sum() * f_student.shape[1]
    return T**2 * masked.sum() / n.clamp_min(1)
