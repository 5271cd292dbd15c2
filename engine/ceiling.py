"""How well a model can score when its class map is coarser than the labels: the resolution ceiling.

The classifier's scores come at one cell per ``FEATURE_STRIDE`` (16) image pixels; evaluation upsamples them
as the network does (``logits_up`` at H/4, corners aligned) and then to the label size (``upsampled_argmax``).
Such a map cannot draw a boundary finer than a cell, nor a class whose objects are much smaller than one.
The ceiling feeds that same path the scores we can write down without a model: each cell holds the label
fractions of the labelled pixels nearest to where the upsampling puts the cell. It is an estimate, not a
bound (bilinear interpolation of trained scores can carve a region smaller than a cell now and then), and
it is what makes a class that no method learns at a given size recognisable as a property of the size.
A network with a ``window`` (``NAPGNet``) upsamples each window's cells on their own; the ceiling does too.
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
from models.napg import LOGITS_UP_STRIDE, from_windows, to_windows, upsample_logits
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


def ceiling_prediction(label: torch.Tensor, stride: int, num_classes: int, window: int | None = None) -> torch.Tensor:
    """The ceiling's prediction [H, W] int64 for ``label`` [H, W] (train ids, 255 ignored): the cells' label
    fractions [C, H/stride, W/stride] through the classifier's upsampling and evaluation's arg-max; with a
    ``window`` (a multiple of ``stride`` dividing H and W) each window's cells are upsampled on their own."""
    height, width = label.shape
    if height % stride or width % stride:
        raise ValueError(f"a {height} x {width} label is no multiple of the stride {stride}")
    side_h, side_w = (height, width) if window is None else (window, window)
    if height % side_h or width % side_w or side_h % stride:
        raise ValueError(f"a {height} x {width} label cannot be cut into {window}-px windows of {stride}-px cells")
    grid = (height // side_h, width // side_w)
    windows = to_windows(label[None, None], side_h) if window is not None else label[None, None]
    valid = windows != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, windows, 0).long()[:, 0], num_classes).permute(0, 3, 1, 2).double()
    one_hot = one_hot * valid
    rows = F.one_hot(nearest_cell(side_h, side_h // stride), side_h // stride).double()  # [h_win, h]
    cols = F.one_hot(nearest_cell(side_w, side_w // stride), side_w // stride).double()  # [w_win, w]
    counts = rows.T @ one_hot @ cols  # [N, C, h, w]: each cell's labelled pixels per class
    fractions = counts / counts.sum(1, keepdim=True).clamp(min=1)  # a cell without labelled pixels: no class
    logits_up = upsample_logits(fractions.float(), (side_h // LOGITS_UP_STRIDE, side_w // LOGITS_UP_STRIDE))
    return upsampled_argmax(from_windows(logits_up, grid), (height, width))[0]


def resolution_ceiling_scores(root: Path, split: str, stride: int, resize: int | None = None,
                              window: int | None = None) -> dict[str, Any]:
    """mIoU and per-class IoU (%, ``utils.metrics``' standard protocol) of :func:`ceiling_prediction` on the
    domain folder ``root``'s ``split`` (``resize``: every patch scaled to that side first, as in training;
    ``window``: the network's). Returns ``{"miou": %, "iou": [per class, % or None], "pixels": N,
    "stride": stride, "window": window}``."""
    num_classes = benchmark_of(read_meta(root)).num_classes
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
    for _, label in read_split(root, split, resize):
        truth = torch.from_numpy(label)
        confusion.update(ceiling_prediction(truth, stride, num_classes, window), truth)
    scores = confusion.compute()
    return {"miou": 100 * scores["miou"], "iou": [None if v is None else 100 * v for v in scores["iou"]],
            "pixels": scores["pixels"], "stride": stride, "window": window}
