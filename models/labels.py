"""Label maps on the device: nearest resizing as the original does it, and confident pseudo-labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pseudo_labels(prob_up: torch.Tensor, tau: float, ignore_index: int = 255) -> torch.Tensor:
    """Confident argmax: prob_up [B, C, H, W] -> labels [B, H, W] int64, ``ignore_index`` where max < tau."""
    conf, labels = prob_up.max(1)
    return labels.masked_fill(conf < tau, ignore_index)


def resize_labels(labels: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """labels [B, H, W] -> [B, h, w] with PyTorch's legacy 'nearest' (source index floor(i * H / h)),
    as the original does (``F.interpolate`` on a float copy)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(labels.shape[-2:]) == size:
        return labels
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
    return out.to(labels.dtype)
