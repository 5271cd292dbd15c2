"""How a network runs on its device: the precision of its forward passes (``--amp``) and the wrappers
(DistributedDataParallel, ``torch.compile``) put around it."""

from __future__ import annotations

import torch
from torch import nn


def set_cudnn_autotuning(device: torch.device, deterministic: bool) -> None:
    """cuDNN picks the fastest convolution algorithm for each shape (first calls are slower), unless the
    run must repeat bit for bit."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def amp_dtype(name: str) -> torch.dtype | None:
    """``--amp`` value -> autocast dtype (None = float32)."""
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for the segmenter's forward passes; a no-op for float32."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner
