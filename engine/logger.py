"""TensorBoard, ``metrics.jsonl`` and console output of a stage (main process only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


class RunLogger:
    """Writes scalars and image panels to TensorBoard and one JSON line per record to metrics.jsonl.

    ``step_offset`` (the iterations of the pipeline's earlier stages, from the hand-off it started from) puts
    every stage of a pipeline on one TensorBoard axis; ``metrics.jsonl`` keeps the stage's own ``step`` and
    adds ``pipeline_step``. One writer, so one event file, per stage run.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, step_offset: int = 0):
        self.enabled = enabled
        self.step_offset = step_offset
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "", **fields: Any) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(f"{prefix}{key}", float(value), self.step_offset + step)
        record = {"step": step, "pipeline_step": self.step_offset + step, **fields,
                  **{f"{prefix}{k}": v for k, v in values.items()}}
        self.jsonl.write(json.dumps(record, default=_json_default) + "\n")

    def image(self, tag: str, step: int, image_hwc: np.ndarray) -> None:
        if self.enabled:
            self.writer.add_image(tag, image_hwc, self.step_offset + step, dataformats="HWC")

    def config(self, options: dict[str, Any], metrics: list[str]) -> None:
        """The resolved config as text (``config``) and as hyper-parameters (TensorBoard's HParams tab, in this
        run's own event file), with ``metrics`` (scalar tags) as the columns to compare."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        text = "\n".join(f"    {k}: {v}" for k, v in options.items())  # indented: Markdown shows it verbatim
        self.writer.add_text("config", text, self.step_offset)
        scalar = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in options.items()}
        for summary in hparams(scalar, dict.fromkeys(metrics, 0.0)):
            self.writer.file_writer.add_summary(summary, self.step_offset)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def colorize(labels: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Train-id map [H, W] -> RGB uint8 [H, W, 3] in the benchmark's ``palette`` [C, 3]; ignore (255) is black."""
    lab = labels.cpu().numpy()
    out = np.zeros((*lab.shape, 3), dtype=np.uint8)
    valid = lab < len(palette)
    out[valid] = palette[lab[valid]]
    return out


def image_rgb(img: torch.Tensor) -> np.ndarray:
    """Network input [3, H, W] -> uint8 [H, W, 3], min-max rescaled per image (so normalised inputs show too)."""
    x = img.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    return (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def panel(img: torch.Tensor, label: torch.Tensor | None, pred: torch.Tensor, entropy: torch.Tensor,
          palette: np.ndarray) -> np.ndarray:
    """One row: input, ground truth, prediction, entropy map; each [H, W, 3] uint8 side by side.

    ``img`` [3, H, W] in [0, 1] (or normalised: rescaled per image), ``pred`` / ``label`` [H, W],
    ``entropy`` [H, W] in [0, 1].
    """
    tiles = [image_rgb(img)]
    tiles.append(colorize(label, palette) if label is not None else np.zeros_like(tiles[0]))
    tiles.append(colorize(pred, palette))
    ent = (entropy.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    tiles.append(np.repeat(ent[..., None], 3, axis=2))
    return np.concatenate(tiles, axis=1)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)
