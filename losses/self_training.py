"""The baselines' target losses (docs/method.md, "Baselines"): ADVENT's entropy minimisation and the pieces of
DACS self-training (an EMA teacher's pseudo-labels, their confidence weight, ClassMix, the weighted CE).

:func:`entropy_loss` is Vu et al. (CVPR 2019), Eq. 5; the rest follow Tranheden et al. (WACV 2021) as
DAFormer's ``dacs.py`` implements them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.adversarial import self_information

IGNORE_INDEX = 255


def entropy_loss(prob: torch.Tensor) -> torch.Tensor:
    """ADVENT's normalised entropy: prob [B, C, H, W] (a softmax) -> 0-dim mean over the B·H·W pixels of
    -1/log(C) Σ_c p_c log p_c, which lies in [0, 1] (the base of the logarithm cancels)."""
    return self_information(prob).sum(1).mean()


def pseudo_labels_with_weight(prob: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DACS's teacher targets: prob [B, C, h, w] -> (argmax labels [B, h, w] int64, 0-dim weight).

    The weight is the fraction of the batch's pixels whose top probability is at least ``threshold``
    (DAFormer's ``ge``): one confidence for the whole batch, which scales every pseudo-labelled pixel's CE.
    """
    top, labels = prob.max(1)
    return labels, (top >= threshold).float().mean()


def class_mix_masks(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """ClassMix masks: labels [B, H, W] (source ground truth) -> [B, H, W] bool, True at the pixels of
    ceil(n/2) classes drawn at random (without replacement) from the n classes present in each image, the
    ignore index never among them.

    Drawn on the labels' device with no host round trip (a training step never waits for the device): a
    random score per (image, class), absent classes scored above every present one, and the classes ranked
    below ceil(n/2) are the chosen ones. ``generator`` (on that device) replaces torch's default generator.
    """
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    flat = torch.where(flat == ignore_index, num_classes, flat)  # the ignore index counts as an extra column
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)
    present = present[:, :num_classes]
    scores = torch.rand(b, num_classes, device=labels.device, generator=generator)
    scores = torch.where(present, scores, 2.0)  # absent classes rank after every present one
    rank = scores.argsort(1).argsort(1)
    half = (present.sum(1, keepdim=True) + 1) // 2
    chosen = present & (rank < half)  # [B, C]
    chosen = torch.cat([chosen, chosen.new_zeros(b, 1)], 1)  # the ignore column is never chosen
    return chosen.gather(1, flat).reshape(labels.shape)


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ClassMix's paste: ``source`` where mask [B, H, W] is True, ``target`` elsewhere. source, target:
    [B, H, W] (labels, weights) or [B, C, H, W] (images) of one shape."""
    return torch.where(mask[:, None] if source.dim() == 4 else mask, source, target)


def weighted_pseudo_label_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Σ_x w(x)·CE(x) / (non-ignored pixels): logits [B, C, h, w], labels [B, h, w], weight [B, h, w] ->
    0-dim. Normalised like ``classifier_ce`` (the mean over non-ignored pixels, which with weight 1 it equals);
    0 when every pixel is ignored."""
    ce = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
    return (ce * weight).sum() / (labels != ignore_index).sum().clamp_min(1)
