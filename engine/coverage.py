"""Which weights act at evaluation without ever having been trained.

A dilated convolution whose taps fall outside every feature map it sees in training gets exactly zero
gradient there, but acts once evaluation feeds it a larger map. With the output stride 32 of
``models/napg.py``, 128-px training crops give layer 4 a 4 x 4 map, on which the ASPP branches at rates 6,
12 and 18 only ever use their centre tap; a 256-px evaluation patch (8 x 8) switches the rate-6 branch's
off-centre taps on, still at their random initialisation. The paper's 512-px crops give a 16 x 16 map: the
rate-18 branch acts only through its centre tap at any size up to 18 x 32 = 576 px, in training and at
evaluation alike, so it is a 1 x 1 convolution there and nothing untrained acts.

:class:`GradientCoverage` records, element by element, which parameters of the segmenter have had a
non-zero gradient during a stage (read at the log points, where the trainer waits for the device anyway;
kept in ``last.pt`` so a resumed stage counts the whole stage). At the end :func:`untrained_at_evaluation`
finds the elements that change the scored output on an evaluation batch but never had a gradient: the
stage writes their count per parameter into ``eval.json`` and warns.

The bias of a convolution that feeds a BatchNorm (``up.0.bias``) is not counted: in training the batch mean
removes it, so its gradient is zero up to rounding (on some CPUs exactly zero for a few channels), and at
evaluation the running mean, an average of batch means that contained it, removes it again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def cancelled_by_batchnorm(model: nn.Module) -> set[str]:
    """Names of the biases of convolutions directly followed by a BatchNorm in an ``nn.Sequential``."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for (index, layer), following in zip(module.named_children(), list(module.children())[1:]):
                if (isinstance(layer, nn.modules.conv._ConvNd) and layer.bias is not None
                        and isinstance(following, nn.modules.batchnorm._BatchNorm)):
                    names.add(f"{prefix}.{index}.bias" if prefix else f"{index}.bias")
    return names


class GradientCoverage:
    """Per parameter of ``model``, a bool mask of the elements that have had a non-zero gradient."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.seen = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}

    @torch.no_grad()
    def record(self) -> None:
        """Add the gradients the last backward left (parameters without one are skipped)."""
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                self.seen[name] |= p.grad != 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.seen)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, mask in state.items():
            self.seen[name].copy_(mask)


def acting_elements(model: nn.Module, x: torch.Tensor, prototypes: torch.Tensor,
                    domain: str) -> dict[str, torch.Tensor]:
    """Per parameter, the elements that change the classifier logits of ``x`` [B, 3, H, W] (network input)
    in evaluation mode with ``domain``'s BatchNorm statistics: where the gradient of a random projection of
    the logits is non-zero."""
    params = dict(model.named_parameters())
    with torch.enable_grad(), model.evaluating(domain):
        logits = model(x, prototypes)["logits"].float()
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(logits.device)
        grads = torch.autograd.grad((logits * weights).sum(), list(params.values()), allow_unused=True)
    return {name: g != 0 for name, g in zip(params, grads) if g is not None}


def untrained_at_evaluation(coverage: GradientCoverage, x: torch.Tensor, prototypes: torch.Tensor,
                            domain: str) -> dict[str, int]:
    """Parameter name -> number of elements that act on ``x`` but had no gradient during the stage."""
    acting = acting_elements(coverage.model, x, prototypes, domain)
    cancelled = cancelled_by_batchnorm(coverage.model)
    counts = {name: int((mask & ~coverage.seen[name]).sum()) for name, mask in acting.items()
              if name not in cancelled}
    return {name: n for name, n in counts.items() if n}


def describe(untrained: dict[str, Any]) -> str:
    """One line naming the parameters with untrained acting elements."""
    total = sum(untrained.values())
    names = ", ".join(f"{name} ({n})" for name, n in sorted(untrained.items(), key=lambda kv: -kv[1])[:4])
    return (f"{total} weights act at evaluation that had no gradient in this stage ({names}"
            f"{', ...' if len(untrained) > 4 else ''}); evaluate at the training size, or train on crops "
            f"whose layer-4 map covers the ASPP rates (engine/coverage.py)")
