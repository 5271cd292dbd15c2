"""Entropy-map discriminator ``FCDiscriminatorHighMask`` (docs/method.md §4.3).

Four stride-2 3x3 convs (C -> ndf -> 2ndf -> 4ndf -> 8ndf), each followed by LeakyReLU(0.2), a 1x1
conv to one channel, bilinear upsampling back to the input size and a sigmoid. No normalisation.

The original upsamples with a fixed ``nn.Upsample(scale_factor=16)``; for sides divisible by 16 that
is the same as resizing to the input size (bit for bit: the coordinate scale is 1/16 in both cases),
which is what is done here so the output always matches the input size. Other sides (the original
would produce 16 * ceil(n / 16) and fail in the BCE) are resized to the input size the same way, which
lets small demo images (prototype maps under 16 px) train.

State-dict keys follow the original (``FCDiscriminator.{0,2,4,6,8}.{weight,bias}``), so original D1/D2
weights load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FCDiscriminatorHighMask(nn.Module):
    """Per-pixel domain discriminator on entropy maps: [B, C, H, W] -> probabilities [B, 1, H, W].

    Any H and W work; for multiples of 16 the output equals the original's. ``logits`` gives the
    pre-sigmoid map for a numerically safer BCE-with-logits; ``forward`` returns the sigmoid
    probabilities as the original does.
    """

    def __init__(self, num_classes: int = 6, ndf: int = 32):
        super().__init__()
        widths = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 1))
        self.FCDiscriminator = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output at the input size: [B, C, H, W] -> [B, 1, H, W]."""
        low = self.FCDiscriminator(x)
        return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Entropy map [B, C, H, W] -> probability of the "target" label 1, [B, 1, H, W]."""
        return torch.sigmoid(self.logits(x))
