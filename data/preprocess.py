"""Images -> network input: the one place that scales uint8 pixels and applies ``--normalize``.

The network takes float32 images [B, 3, H, W] in [0, 1] (``unit``, as the original: x / 255) or with
mmseg's ImageNet mean and std (``imagenet``), docs/method.md §1. Batches travel to the device as uint8
(a quarter of float32's bytes) and :func:`to_model_input` scales and normalises them there, for training,
evaluation, the refresh, inference and the pictures alike. Samples that must be resampled on the loader's
workers (a resize, step 3's strong views) are made float there with :func:`unit_float` and normalised by
the dataset with :func:`normalize_images`: the same operations in the same order, so both paths give the
same values bit for bit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from utils.config import OPTIONS

NORMALIZATIONS = OPTIONS["normalize"].choices

# mmseg's ImageNet statistics in 0..255 units, applied in slot order (R,G,B or NIR,R,G).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@functools.cache
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg's mean and std in [0, 1] units, [3, 1, 1] each, made once per device (a copy to a GPU
    from host memory would wait for the device every time)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / 255.0
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) / 255.0
    return mean.to(device), std.to(device)


def unit_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 in [0, 1] (x / 255); float images as they are."""
    return img.float().div_(255.0) if img.dtype == torch.uint8 else img


def normalize_images(x: torch.Tensor, normalize: str) -> torch.Tensor:
    """Images [..., 3, H, W] in [0, 1] -> the network's input: ``unit`` as is, ``imagenet`` by mean/std."""
    if normalize == "unit":
        return x
    mean, std = _imagenet_stats(x.device)
    return (x - mean) / std


def to_model_input(img: torch.Tensor, device: torch.device, normalize: str,
                   size: tuple[int, int] | None = None) -> torch.Tensor:
    """A batch of images [B, 3, H, W] on ``device`` as the network takes it: float32 [B, 3, *size].

    uint8 batches are copied as they are, then scaled, resized to ``size`` (bilinear, antialiased, in
    [0, 1] as the data's ``Resize``) and normalised on the device. Float batches are network input already
    (normalised on the workers) and are only copied (and resized). The copy does not wait for the device
    (pinned memory).
    """
    x = img.to(device, non_blocking=True)
    raw = x.dtype == torch.uint8
    x = unit_float(x) if raw else x.float()
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
    return normalize_images(x, normalize) if raw else x
