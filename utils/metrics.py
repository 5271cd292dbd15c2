"""Global confusion matrix and the segmentation scores derived from it (docs/method.md §7).

Undefined per-class entries (and means over no defined entry) are ``None`` so results are valid JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from utils.dist import is_dist

PROTOCOLS = ("standard", "napg_legacy")
# The scalar scores that tables, logs and run summaries report, in their order.
SUMMARY_KEYS = ("miou", "mf1", "oa", "miou_5", "mf1_5")
# Keys of metrics that files written before a rename hold: old name -> current name.
RENAMED_KEYS = {"miou5": "miou_5"}


def current_keys(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics of an eval.json (one branch) under the current key names, whenever the file was written."""
    return {RENAMED_KEYS.get(key, key): value for key, value in metrics.items()}


def _as_tensor(x: Any, device: torch.device | None) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
    if not torch.is_tensor(t):
        raise TypeError(f"expected a torch tensor or numpy array, got {type(x).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"expected integer class ids, got dtype {t.dtype} (take the argmax of the logits first)")
    return t if device is None else t.to(device)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den == 0."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean(values: np.ndarray, skip_nan: bool) -> float | None:
    values = values[~np.isnan(values)] if skip_nan else values
    return float(values.mean()) if values.size and not np.isnan(values).any() else None


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


class ConfusionMatrix:
    """Pixel confusion matrix accumulated over a whole split (rows = ground truth, cols = prediction).

    ``update`` takes integer tensors (any device; counts stay on that device, one ``bincount`` per
    call, no host sync) or numpy arrays of equal shape. Ground truth equal to ``ignore_index`` is
    skipped; any other value outside ``0..num_classes-1`` (in either input) is counted as invalid and
    makes ``compute`` raise, which catches wrong label formats without a per-batch sync.
    """

    def __init__(self, num_classes: int = 6, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._counts: torch.Tensor | None = None

    def reset(self) -> None:
        self._counts = None

    def _zeros(self, device: torch.device | str | None = None) -> torch.Tensor:
        # C*C cells, then one bin for ignored pixels and one for invalid values.
        return torch.zeros(self.num_classes**2 + 2, dtype=torch.int64, device=device)

    def _bins(self) -> torch.Tensor:
        return self._counts if self._counts is not None else self._zeros()

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch: ``pred`` and ``target`` integer ids of the same shape (e.g. ``[B, H, W]``)."""
        device = self._counts.device if self._counts is not None else None
        pred_t = _as_tensor(pred, device)
        target_t = _as_tensor(target, pred_t.device)
        if pred_t.shape != target_t.shape:
            raise ValueError(f"pred shape {tuple(pred_t.shape)} differs from target shape {tuple(target_t.shape)}")
        c = self.num_classes
        p = pred_t.reshape(-1).long()
        t = target_t.reshape(-1).long()
        ok = (t >= 0) & (t < c) & (p >= 0) & (p < c)
        index = torch.where(ok, t * c + p, c * c + 1)
        index = torch.where(t == self.ignore_index, c * c, index)
        if self._counts is None:
            self._counts = self._zeros(p.device)
        self._counts += torch.bincount(index, minlength=self._counts.numel())

    @property
    def matrix(self) -> torch.Tensor:
        """int64 ``[C, C]``, rows = ground truth, cols = prediction."""
        return self._bins()[: self.num_classes**2].view(self.num_classes, self.num_classes)

    @property
    def invalid(self) -> int:
        """Number of pixels with an out-of-range prediction or a non-ignore out-of-range label."""
        return int(self._bins()[-1])

    def all_reduce(self) -> None:
        """Sum the counts over all ranks when torch.distributed is initialised; no-op otherwise.

        Every rank must call it, also one that saw no data."""
        if not is_dist():
            return
        nccl = dist.get_backend() == "nccl"
        if self._counts is None:
            self._counts = self._zeros("cuda" if nccl else None)
        if nccl and self._counts.device.type != "cuda":
            reduced = self._counts.cuda()
            dist.all_reduce(reduced)
            self._counts.copy_(reduced.cpu())
        else:
            dist.all_reduce(self._counts)

    def compute(self, protocol: str = "standard") -> dict[str, Any]:
        """Scores as floats in [0, 1].

        Keys: ``oa``, ``miou``, ``mf1``, ``miou_5``, ``mf1_5`` (the last class, clutter, left out of
        the mean only), per-class lists ``iou``, ``f1``, ``precision``, ``recall``, plus
        ``protocol`` and ``pixels``.

        ``standard``: IoU = TP/(TP+FP+FN), F1 = 2TP/(2TP+FP+FN), 0 when TP = 0, None only for a
        class absent from both GT and prediction; means skip None.
        ``napg_legacy`` (the original code): IoU = TP/(TP+FP+FN+1), mIoU = plain mean over the
        classes; F1 = 2PR/(P+R), None when TP = 0; mF1 = mean over the defined F1s.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if self.invalid:
            raise ValueError(
                f"{self.invalid} pixels had a prediction outside 0..{self.num_classes - 1} or a label outside "
                f"0..{self.num_classes - 1} that is not {self.ignore_index}; check the label format"
            )
        m = self.matrix.cpu().numpy().astype(np.float64)
        total = m.sum()
        if total == 0:
            raise ValueError("the confusion matrix is empty: no labelled pixels were accumulated")
        tp = np.diag(m)
        gt, pred = m.sum(axis=1), m.sum(axis=0)
        fp, fn = pred - tp, gt - tp
        precision, recall = _ratio(tp, pred), _ratio(tp, gt)
        if protocol == "standard":
            iou = _ratio(tp, tp + fp + fn)
            f1 = _ratio(2 * tp, 2 * tp + fp + fn)
            iou_skips_nan = True
        else:
            iou = tp / (tp + fp + fn + 1)
            f1 = _ratio(2 * precision * recall, precision + recall)
            f1[tp == 0] = np.nan
            iou_skips_nan = False
        head = slice(0, self.num_classes - 1)
        return {
            "protocol": protocol,
            "pixels": int(total),
            "oa": float(tp.sum() / total),
            "miou": _mean(iou, iou_skips_nan),
            "mf1": _mean(f1, True),
            "miou_5": _mean(iou[head], iou_skips_nan),
            "mf1_5": _mean(f1[head], True),
            "iou": _listed(iou),
            "f1": _listed(f1),
            "precision": _listed(precision),
            "recall": _listed(recall),
        }


def format_table(results: dict[str, Any], class_names: Sequence[str], without_last: bool = True) -> str:
    """Per-class IoU/F1/precision/recall table and a summary line, in percent with 2 decimals; with
    ``without_last`` (a benchmark whose last class is left out of its reported means, as ISPRS's clutter)
    the summary adds the means without it, named by the classes they average (mIoU-5 for ISPRS)."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    width = max(len("class"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'F1':>6}  {'prec':>6}  {'recall':>6}"]
    for i, name in enumerate(class_names):
        cells = (results[k][i] for k in ("iou", "f1", "precision", "recall"))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{pct(v):>6}" for v in cells))
    n = len(class_names) - 1
    without = f" | mIoU-{n} {pct(results['miou_5'])} | mF1-{n} {pct(results['mf1_5'])}" if without_last else ""
    lines.append(f"OA {pct(results['oa'])} | mIoU {pct(results['miou'])} | mF1 {pct(results['mf1'])}{without} "
                 f"({results['protocol']})")
    return "\n".join(lines)
