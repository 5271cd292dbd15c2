"""Supervised losses on the source domain (docs/method.md §4.1-4.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# F.nll_loss's default ignore index: what the original's prototype NLL runs with.
_TORCH_DEFAULT_IGNORE = -100


def classifier_ce(logits_up: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of the classifier: logits_up [B, C, h, w], labels [B, h, w] -> mean over the
    non-ignored pixels (NaN if every pixel is ignored, like F.cross_entropy)."""
    return F.cross_entropy(logits_up, labels.long(), ignore_index=ignore_index)


def prototype_nll(proto_prob: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = 255) -> torch.Tensor:
    """Prototype NLL: -mean log q_y over the pixels, proto_prob q [B, C, h, w], labels [B, h, w].

    q is the group probability (joint softmax over the C*K prototype logits, max within each class).
    ``ignore_index=None`` is the original's call (F.nll_loss's default -100), where a label 255 raises
    an IndexError. As in the original, log q is not clamped: a probability that underflows to 0 gives
    an infinite loss.
    """
    ignore = _TORCH_DEFAULT_IGNORE if ignore_index is None else ignore_index
    return F.nll_loss(torch.log(proto_prob), labels.long(), ignore_index=ignore)
