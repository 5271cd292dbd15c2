"""Pictures of results (matplotlib without a display) as uint8 RGB arrays, and PNG encoding.

matplotlib is imported only where a chart is drawn: the GPU machine's ``python3`` has no matplotlib
(``utils/gpu_machine.py``), and there a run skips its charts (:func:`can_draw`) instead of failing.
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from utils.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_noted = False  # whether this process has said that matplotlib is missing


@functools.cache
def _pyplot() -> ModuleType | None:
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def can_draw(pictures: str) -> bool:
    """Whether charts can be drawn here. Without matplotlib, says once per process (one line on stderr)
    that ``pictures`` are skipped, so that a run writes its numbers and goes on."""
    global _noted
    if _pyplot() is not None:
        return True
    if not _noted:
        _noted = True
        print(f"matplotlib is not installed: skipped {pictures}; pip install matplotlib to draw them",
              file=sys.stderr, flush=True)
    return False


def _require_pyplot() -> ModuleType:
    plt = _pyplot()
    if plt is None:
        raise UserError("matplotlib is not installed, and drawing a chart needs it; pip install matplotlib")
    return plt


def figure_rgb(fig: Figure) -> np.ndarray:
    """Render and close ``fig``: uint8 [H, W, 3]."""
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _require_pyplot().close(fig)
    return rgb


def image_png(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Confusion counts [C, C] (rows = ground truth) -> each row divided by its sum (0 for empty rows)."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def confusion_rgb(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> np.ndarray:
    """Row-normalised confusion matrix [C, C] (rows = ground truth) with class names and cell values."""
    norm = row_normalised(matrix)
    fig, ax = _require_pyplot().subplots(figsize=(1.1 * len(class_names) + 2, 1.0 * len(class_names) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    for i in ticks:
        for j in ticks:
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title or "confusion matrix (rows sum to 1)")
    return figure_rgb(fig)


def results_rgb(groups: Sequence[str], metrics: dict[str, tuple[Sequence[float], Sequence[float]]],
                class_names: Sequence[str], class_iou: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Bar chart of each group's mean ± std (percent): summary metrics on the left, per-class IoU on the right.

    ``metrics``: name -> (means, stds), one value per group; ``class_iou``: (means, stds), [groups, C].
    """
    fig, (left, right) = _require_pyplot().subplots(1, 2, figsize=(14, 0.5 * len(groups) + 4))
    summary = tuple(np.array([metrics[k][i] for k in metrics], dtype=np.float64).T for i in (0, 1))
    for ax, names, (means, stds) in ((left, list(metrics), summary), (right, list(class_names), class_iou)):
        width = 0.8 / max(1, len(groups))
        x = np.arange(len(names))
        for g, group in enumerate(groups):
            ax.bar(x + g * width, 100 * np.nan_to_num(means[g]), width, yerr=100 * np.nan_to_num(stds[g]),
                   label=group, capsize=2)
        ax.set_xticks(x + width * (len(groups) - 1) / 2, names, rotation=30, ha="right")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
    left.set_title("mean ± std over runs")
    right.set_title("IoU per class")
    left.legend(fontsize=7)
    return figure_rgb(fig)
