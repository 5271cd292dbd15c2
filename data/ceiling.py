"""How well a model can score at all when its class map is coarser than the labels: the resolution ceiling.

A segmenter whose class scores come at ``stride`` image pixels per map cell (16 for ``models/napg.py``) and
are bilinearly upsampled at evaluation cannot draw a boundary finer than a cell, nor a class whose objects
are much smaller than one. The ceiling scores the best such map we can write down without a model: each
cell holds the fraction of its labelled pixels in each class (the ground truth averaged over the cell),
upsampled and arg-maxed as the evaluation does (``engine/evaluate.py``). A class whose objects are a few
pixels wide at the evaluation size scores near 0 here, and no method can do much better on it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from data.benchmarks import benchmark_of
from data.files import read_meta, read_split
from data.isprs import IGNORE_INDEX
from utils.metrics import ConfusionMatrix


def ceiling_prediction(label: torch.Tensor, stride: int, num_classes: int) -> torch.Tensor:
    """The cell-averaged ground truth of ``label`` [H, W] (train ids, 255 ignored), upsampled bilinearly and
    arg-maxed: [H, W] int64. The map has ``ceil(H / stride) x ceil(W / stride)`` cells, as the network's."""
    valid = label != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, label, 0).long(), num_classes).permute(2, 0, 1).float()
    one_hot = one_hot * valid  # an ignored pixel votes for no class
    cells = (math.ceil(label.shape[0] / stride), math.ceil(label.shape[1] / stride))
    fractions = F.adaptive_avg_pool2d(one_hot[None], cells)
    return F.interpolate(fractions, size=label.shape, mode="bilinear", align_corners=False)[0].argmax(0)


def resolution_ceiling_scores(root: Path, split: str, stride: int, resize: int | None = None) -> dict:
    """mIoU and per-class IoU (%, ``utils.metrics``' standard protocol) of :func:`ceiling_prediction` on the
    domain folder ``root``'s ``split`` (``resize``: every patch scaled to that side first, as in training).
    Returns ``{"miou": %, "iou": [per class, % or None], "pixels": N, "stride": stride}``."""
    num_classes = benchmark_of(read_meta(root)).num_classes
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
    for _, label in read_split(root, split, resize):
        truth = torch.from_numpy(label)
        confusion.update(ceiling_prediction(truth, stride, num_classes), truth)
    scores = confusion.compute()
    return {"miou": 100 * scores["miou"], "iou": [None if v is None else 100 * v for v in scores["iou"]],
            "pixels": scores["pixels"], "stride": stride}
