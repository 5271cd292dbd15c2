"""How far colour alone goes: the Bayes-optimal per-pixel classifier on quantised colour.

Each pixel's three channel values are quantised (``bins`` levels per channel); the classifier predicts,
for every colour cell, the label most frequent in it on the fit split (cells never seen on the fit
split get the overall most frequent label). On the fit split itself this is the best any function of the
quantised colour can do; on another split it is what a colour lookup table transfers. A synthetic pair
whose classes this separates well can be segmented without shape or context, which a CNN benchmark
should not allow. Pure numpy, reading the prepared PNG patches (``img_dir/<split>``, ``ann_dir/<split>``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.files import read_split
from data.isprs import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES


def colour_cells(image: np.ndarray, bins: int) -> np.ndarray:
    """Cell index ``[...]`` int64 of uint8 colours ``[..., 3]``: ``bins`` equal levels per channel."""
    q = image.astype(np.int64) * bins // 256
    return (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]


def _split_pixels(root: Path, split: str, resize: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Colours ``[N, 3]`` uint8 and train ids ``[N]`` (255 kept) of every patch of ``root``'s ``split``."""
    patches = list(read_split(root, split, resize))
    return (np.concatenate([image.reshape(-1, 3) for image, _ in patches]),
            np.concatenate([label.ravel() for _, label in patches]))


def fit_colour_table(colours: np.ndarray, labels: np.ndarray, bins: int = 32,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Majority label ``[bins**3]`` per colour cell of the labelled pixels (``labels`` 255 skipped)."""
    keep = labels != IGNORE_INDEX
    cells, labels = colour_cells(colours[keep], bins), labels[keep].astype(np.int64)
    counts = np.bincount(cells * num_classes + labels, minlength=bins**3 * num_classes)
    counts = counts.reshape(bins**3, num_classes)
    table = counts.argmax(axis=1)
    table[counts.sum(axis=1) == 0] = np.bincount(labels, minlength=num_classes).argmax()
    return table


def iou_scores(pred: np.ndarray, truth: np.ndarray, num_classes: int = NUM_CLASSES) -> dict:
    """Per-class IoU and mIoU in percent over the pixels whose ``truth`` is not 255 (utils/metrics.py's
    ``standard`` protocol: a class absent from both prediction and ground truth is None and not averaged)."""
    keep = truth != IGNORE_INDEX
    matrix = np.bincount(truth[keep].astype(np.int64) * num_classes + pred[keep],
                         minlength=num_classes**2).reshape(num_classes, num_classes).astype(np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    iou = [float(100.0 * t / u) if u else None for t, u in zip(tp, union)]
    defined = [v for v in iou if v is not None]
    return {"iou": iou, "miou": float(np.mean(defined)) if defined else None, "pixels": int(keep.sum())}


def colour_classifier_scores(
    data_root: Path,
    domain: str,
    fit_split: str = "train",
    eval_split: str = "val",
    *,
    eval_domain: str | None = None,
    bins: int = 32,
    resize: int | None = None,
) -> dict:
    """Fit the colour table on ``data_root/domain``'s ``fit_split`` and score it on ``eval_split`` of
    ``eval_domain`` (default: the same domain; a target domain gives the cross-domain score).

    ``resize`` scales every patch to that side first (as ``--resize`` does for training). Returns
    ``{"iou": [per class, % or None], "classes": CLASS_NAMES, "miou": %, "pixels": N, "bins": bins}``.
    """
    data_root = Path(data_root)
    table = fit_colour_table(*_split_pixels(data_root / domain, fit_split, resize), bins=bins)
    colours, truth = _split_pixels(data_root / (eval_domain or domain), eval_split, resize)
    scores = iou_scores(table[colour_cells(colours, bins)], truth)
    return {**scores, "classes": CLASS_NAMES, "bins": bins}
