"""Sliding-window inference on images of any size (MMSegmentation's ``mode='slide'``).

Windows of ``crop`` px step by ``stride``; the last row and column are shifted back inside the image, and
a side shorter than ``crop`` gets one window of its own length. Each window's logits are upsampled to
the window, summed, and divided by the number of windows covering each pixel. The output is produced
in row bands: a band is final once no later window reaches it, so memory holds the window batch and a
few window rows of float32 logits, not the whole image times the classes.

``scale`` resizes each window before the network (a window is ``crop / scale`` image px, the network
sees ``crop`` px) and its logits back: the resolution the checkpoint was trained at, without resizing
the whole tile. Windows whose network size is not a multiple of 32 (of the network's own ``window``, if it
has one) are zero-padded (bottom, right).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data.preprocess import to_model_input
from engine.device import amp_dtype, autocast
from losses.adversarial import self_information


@dataclass(frozen=True)
class SlideConfig:
    """How to slide: window and step in network px, image-to-network scale, batch, AMP, flip TTA."""

    crop: int = 512
    stride: int = 341
    scale: float = 1.0
    batch_size: int = 8
    amp: str = "off"
    hflip: bool = False
    normalize: str = "unit"
    domain: str = "target"  # BatchNorm statistics of a --bn-stats domain network


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Start of every window along one axis of ``size`` px (mmseg's slide grid, last one flush)."""
    count = max(size - window + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + window, size) - window, 0) for i in range(count)})


def _window_px(cfg: SlideConfig) -> tuple[int, int]:
    """Window and stride in image px."""
    return max(1, round(cfg.crop / cfg.scale)), max(1, round(cfg.stride / cfg.scale))


@torch.no_grad()
def _window_logits(model: nn.Module, windows: torch.Tensor, cfg: SlideConfig, device: torch.device) -> torch.Tensor:
    """Windows [B, 3, h, w] (uint8, or float network input) -> float32 logits [B, C, h, w] on ``device``."""
    size = windows.shape[-2:]
    net_size = (max(1, round(size[0] * cfg.scale)), max(1, round(size[1] * cfg.scale)))
    x = to_model_input(windows, device, cfg.normalize, size=net_size)
    if cfg.hflip:
        x = torch.cat([x, x.flip(-1)])
    # The network takes sides that are multiples of 32 (of its window, if it has one): pad bottom and right
    # with zeros (as mmseg pads a short window), then cut the padding off the logits at network resolution.
    net_h, net_w = x.shape[-2:]
    multiple = getattr(model, "window", None) or 32
    x = F.pad(x, (0, -net_w % multiple, 0, -net_h % multiple))
    with model.evaluating(cfg.domain), autocast(device, amp_dtype(cfg.amp)):
        logits = model(x)["logits_up"].float()
    if x.shape[-2:] != (net_h, net_w):
        logits = F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=False)[..., :net_h, :net_w]
    logits = F.interpolate(logits, size, mode="bilinear", align_corners=False)
    if cfg.hflip:
        plain, flipped = logits.chunk(2)
        logits = (plain + flipped.flip(-1)) / 2
    return logits


@torch.no_grad()
def slide_bands(model: nn.Module, image: torch.Tensor, cfg: SlideConfig, device: torch.device,
                progress: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """Mean window logits of ``image`` [3, H, W] (uint8, or float network input) in row bands.

    Yields ``(y0, logits)`` with ``logits`` float32 [C, h, W] (on the CPU) for rows ``y0 .. y0 + h``;
    the bands are consecutive and cover the image. Each window batch runs in eval mode with
    ``cfg.domain``'s BatchNorm statistics (``NAPGNet.evaluating``).
    """
    height, width = image.shape[-2:]
    win, step = _window_px(cfg)
    ys, xs = window_origins(height, win, step), window_origins(width, win, step)
    win_h, win_w = min(win, height), min(win, width)
    bar = tqdm(total=len(ys) * len(xs), desc="windows", unit="win", disable=not progress, leave=False)
    acc: torch.Tensor | None = None  # summed logits of rows lo .. lo + acc.shape[1]
    count = torch.zeros(0, width)
    lo = 0
    for y in ys:
        if acc is not None and y > lo:  # rows above y are covered by no later window: emit them
            yield lo, acc[:, : y - lo] / count[: y - lo]
            acc, count, lo = acc[:, y - lo:], count[y - lo:], y
        rows_needed = y + win_h - lo
        for x0 in range(0, len(xs), cfg.batch_size):
            row_xs = xs[x0: x0 + cfg.batch_size]
            batch = torch.stack([image[:, y: y + win_h, x: x + win_w] for x in row_xs])
            logits = _window_logits(model, batch, cfg, device).cpu()
            if acc is None:
                acc = torch.zeros(logits.shape[1], 0, width)
            if acc.shape[1] < rows_needed:  # grow the band down to this window row's bottom
                grow = rows_needed - acc.shape[1]
                acc = torch.cat([acc, acc.new_zeros(acc.shape[0], grow, width)], 1)
                count = torch.cat([count, count.new_zeros(grow, width)])
            top = y - lo
            for x, window_logits in zip(row_xs, logits):
                acc[:, top: top + win_h, x: x + win_w] += window_logits
                count[top: top + win_h, x: x + win_w] += 1
            bar.update(len(row_xs))
    bar.close()
    yield lo, acc / count


@dataclass
class Prediction:
    """Per-pixel outputs of a tile: ``classes`` uint8 [H, W], optionally ``entropy`` float32 [H, W]
    (normalised to [0, 1]) and ``probs`` uint8 [C, H, W] (probability * 255, rounded)."""

    classes: np.ndarray
    entropy: np.ndarray | None = None
    probs: np.ndarray | None = None


def predict_image(model: nn.Module, image: torch.Tensor, cfg: SlideConfig, device: torch.device,
                  entropy: bool = False, probs: bool = False, progress: bool = False) -> Prediction:
    """Class ids (and, on request, entropy and uint8 probabilities) of ``image`` [3, H, W]."""
    height, width = image.shape[-2:]
    out = Prediction(np.zeros((height, width), np.uint8))
    for y0, logits in slide_bands(model, image, cfg, device, progress):
        rows = slice(y0, y0 + logits.shape[1])
        out.classes[rows] = logits.argmax(0).numpy()
        if entropy or probs:
            p = logits.softmax(0)
            if entropy:
                if out.entropy is None:
                    out.entropy = np.zeros((height, width), np.float32)
                out.entropy[rows] = self_information(p[None]).sum(1)[0].numpy()
            if probs:
                if out.probs is None:
                    out.probs = np.zeros((p.shape[0], height, width), np.uint8)
                out.probs[:, rows] = (p * 255).round().to(torch.uint8).numpy()
    return out
