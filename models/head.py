"""Prototype-similarity head of NAPG (docs/method.md §2).

For every prototype ``p_j`` (rows of ``P`` [C*K, D], class-major: row ``c*K + k``) the original computes

    s_j = sum_o Conv3x3_{D->D}(normalize(f) * normalize(p_j))_o

with one conv shared by all classes. Summing a conv over its outputs is a conv with the summed kernel,
``Wbar = W.sum(0)`` [D, 3, 3] and ``bbar = b.sum()``, and because ``p_j`` is constant over space,

    s_j = sum_i depthwise(f_hat, Wbar_i)_i * p_hat_j[i] + bbar,

i.e. one depthwise 3x3 conv of the normalised features ([B, D, h, w]) followed by one matrix product
with the normalised prototypes. The zero padding of the conv is applied to ``f_hat`` before the
product, which is the same thing because ``p_hat_j`` is a per-channel constant. ``impl="reference"``
keeps the original per-prototype loop (the full D->D conv on every ``f_hat * p_hat_j``) for tests.

The D->D parameter is kept (not reduced to a 1-output conv) so that checkpoints, initialisation and
Adam updates match the original: every ``W_o`` receives the same gradient.

State-dict keys: ``sim.0.weight`` [D, D, 3, 3], ``sim.0.bias`` [D] when shared; ``sim.{c}.*`` for
c = 0..C-1 with ``shared=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_IMPLS = ("fast", "reference")


class PrototypeHead(nn.Module):
    """Similarity of every pixel feature to every prototype: ``cat`` [B, C*K, h, w].

    Args:
        num_classes: C.
        channels: D, the feature / prototype dimension (128 in NAPG).
        shared: one similarity conv for all classes (the original) or one per class
            (prototype ``j`` uses the conv of class ``j // K``).
        impl: ``"fast"`` (depthwise conv + matmul) or ``"reference"`` (the original's loop).
    """

    def __init__(self, num_classes: int = 6, channels: int = 128, shared: bool = True, impl: str = "fast"):
        super().__init__()
        if impl not in HEAD_IMPLS:
            raise ValueError(f"head impl must be one of {HEAD_IMPLS}, got {impl!r}")
        self.num_classes = num_classes
        self.channels = channels
        self.shared = shared
        self.impl = impl
        n_convs = 1 if shared else num_classes
        self.sim = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(n_convs))

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """features [B, D, h, w], prototypes [C*K, D] -> prototype logits ``cat`` [B, C*K, h, w]."""
        k = check_prototypes(prototypes, self.num_classes, self.channels)
        f_hat = F.normalize(features, dim=1)
        p_hat = F.normalize(prototypes.to(features.dtype), dim=1)
        if self.impl == "reference":
            return self._reference(f_hat, p_hat, k)
        return self._fast(f_hat, p_hat, k)

    def _fast(self, f_hat: torch.Tensor, p_hat: torch.Tensor, k: int) -> torch.Tensor:
        b, d, h, w = f_hat.shape
        n_convs = len(self.sim)
        # Kernel of the output-summed conv, one [D, 3, 3] per conv, laid out for a grouped conv with
        # groups=D: output channel i*n_convs + c is input channel i filtered by conv c's summed kernel.
        w_bar = torch.stack([conv.weight.sum(0) for conv in self.sim], dim=1)  # [D, n_convs, 3, 3]
        b_bar = torch.stack([conv.bias.sum() for conv in self.sim])  # [n_convs]
        g = F.conv2d(f_hat, w_bar.reshape(d * n_convs, 1, 3, 3), padding=1, groups=d)
        g = g.view(b, d, n_convs, h * w)
        if n_convs == 1:
            cat = torch.matmul(p_hat, g[:, :, 0]) + b_bar  # [B, C*K, h*w]
        else:
            p_groups = p_hat.view(self.num_classes, k, d)
            cat = torch.einsum("bich,cki->bckh", g, p_groups) + b_bar.view(1, -1, 1, 1)
        return cat.reshape(b, self.num_classes * k, h, w)

    def _reference(self, f_hat: torch.Tensor, p_hat: torch.Tensor, k: int) -> torch.Tensor:
        sims = []
        for j in range(p_hat.shape[0]):
            conv = self.sim[0] if self.shared else self.sim[j // k]
            h_j = f_hat * p_hat[j].view(1, -1, 1, 1)
            sims.append(conv(h_j).sum(dim=1, keepdim=True))
        return torch.cat(sims, dim=1)


def check_prototypes(prototypes: torch.Tensor, num_classes: int, channels: int) -> int:
    """Validate a class-major prototype tensor [C*K, D] and return K."""
    if prototypes.dim() != 2 or prototypes.shape[1] != channels:
        raise ValueError(f"prototypes must have shape [C*K, {channels}], got {tuple(prototypes.shape)}")
    n = prototypes.shape[0]
    if n == 0 or n % num_classes != 0:
        raise ValueError(f"prototypes have {n} rows, not a positive multiple of {num_classes} classes")
    return n // num_classes


def group_max(cat: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Max of the raw prototype logits within each class: [B, C*K, h, w] -> ``catmax`` [B, C, h, w]."""
    b, n, h, w = cat.shape
    # max (not amax) as in the original: at exact ties (duplicated prototypes) the gradient goes to
    # one channel instead of being split, which only matters for gradients w.r.t. the prototypes.
    return cat.reshape(b, num_classes, n // num_classes, h, w).max(dim=2).values


def group_prob(cat: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Group probability q: softmax over all C*K logits jointly, then max within each class.

    [B, C*K, h, w] -> [B, C, h, w]. q does not sum to 1 over classes when K > 1.
    """
    return group_max(cat.softmax(dim=1), num_classes)
