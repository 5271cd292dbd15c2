"""How well a model can score when its class map is coarser than the labels: the resolution ceiling.

The classifier's scores come at one cell per ``FEATURE_STRIDE`` (16) image pixels; evaluation upsamples them
as the network does (``logits_up`` at H/4, corners aligned) and then to the label size (``upsampled_argmax``).
Such a map cannot draw a boundary finer than a cell, nor a class whose objects are much smaller than one.
The ceiling feeds that same path the scores we can write down without a model: each cell holds the label
fractions of the labelled pixels nearest to where the upsampling puts the cell. It is an estimate, not a
bound (bilinear interpolation of trained scores can carve a region smaller than a cell now and then), and
it is what makes a class that no method learns at a given size recognisable as a property of the size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data.benchmarks import benchmark_of
from data.files import read_meta, read_split
from data.isprs import IGNORE_INDEX
from engine.evaluate import upsampled_argmax
from models.napg import LOGITS_UP_STRIDE, upsample_logits
from utils.metrics import ConfusionMatrix


def nearest_cell(size: int, cells: int) -> torch.Tensor:
    """For each of ``size`` pixels along an axis, the index [size] of the cell whose upsampled position is
    nearest: cell i sits at i·(size/4 − 1)/(cells − 1) in ``logits_up`` (corners aligned), which is pixel
    4·(that + 0.5) − 0.5 after the second, half-pixel upsampling."""
    if cells == 1:
        return torch.zeros(size, dtype=torch.long)
    up = size // LOGITS_UP_STRIDE
    at_up = (torch.arange(size, dtype=torch.float64) + 0.5) / LOGITS_UP_STRIDE - 0.5  # pixel -> logits_up coord
    return (at_up * (cells - 1) / max(up - 1, 1)).round().clamp(0, cells - 1).long()


def ceiling_prediction(label: torch.Tensor, stride: int, num_classes: int) -> torch.Tensor:
    """The ceiling's prediction [H, W] int64 for ``label`` [H, W] (train ids, 255 ignored): the cells' label
    fractions [C, H/stride, W/stride] through the classifier's upsampling and evaluation's arg-max."""
    height, width = label.shape
    if height % stride or width % stride:
        raise ValueError(f"a {height} x {width} label is no multiple of the stride {stride}")
    valid = label != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, label, 0).long(), num_classes).permute(2, 0, 1).double() * valid
    rows = F.one_hot(nearest_cell(height, height // stride), height // stride).double()  # [H, h]
    cols = F.one_hot(nearest_cell(width, width // stride), width // stride).double()  # [W, w]
    counts = rows.T @ one_hot @ cols  # [C, h, w]: each cell's labelled pixels per class
    fractions = counts / counts.sum(0).clamp(min=1)  # a cell without labelled pixels votes for no class
    logits_up = upsample_logits(fractions[None].float(), (height // LOGITS_UP_STRIDE, width // LOGITS_UP_STRIDE))
    return upsampled_argmax(logits_up, (height, width))[0]


def resolution_ceiling_scores(root: Path, split: str, stride: int, resize: int | None = None) -> dict[str, Any]:
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
