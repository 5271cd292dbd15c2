"""Entropy-map adversarial losses with the two discriminators D1, D2 (docs/method.md §4.3-4.4).

Discriminators are callables ``d(x [B, C, H, W]) -> [B, 1, H, W]`` sigmoid probabilities; label 0 is
the source ("real"), 1 the target ("fake"). D1 sees classifier self-information maps; D2 separates the
source classifier map (label 0) from the prototype-branch maps (label 1). AdvEnt (a baseline) uses D1's
pair of losses alone (:func:`d1_generator_loss`, :func:`d1_discriminator_loss`). The losses are unweighted
(the trainer applies the 0.001 weights). The caller freezes the discriminators for the generator pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Discriminator = Callable[[torch.Tensor], torch.Tensor]
SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


def self_information(prob: torch.Tensor) -> torch.Tensor:
    """AdvEnt's per-channel self-information ``-p * log2(p + 1e-30) / log2(C)``: [B, C, H, W] -> same.

    Divides by the Python float log2(C) (not a multiplication by its reciprocal) to match the original
    bit for bit. At p = 0 the value is 0 but the derivative is finite and large (-log2(1e-30) / log2(C)).
    """
    return -torch.mul(prob, torch.log2(prob + 1e-30)) / math.log2(prob.shape[1])


def bce(prob_map: torch.Tensor, target: float) -> torch.Tensor:
    """Mean binary cross-entropy of a probability map against a constant label.

    A NaN probability is read as 0.5 (values in [0, 1] are untouched, gradients included): the BCE kernel
    rejects NaN with an unreadable error on the CPU and a fatal device assert on CUDA, and the trainer
    finds a diverged run from its losses and weights at its next check, without a host sync per step.
    """
    prob_map = prob_map.nan_to_num(nan=0.5)
    return F.binary_cross_entropy(prob_map, torch.full_like(prob_map, target))


def d1_generator_loss(d1: Discriminator, ent_t_cls: torch.Tensor) -> torch.Tensor:
    """BCE(D1(I_t^cls), 0): the target classifier's self-information map [B, C, H, W] made to pass for a
    source one. NAPG's D1 term, and AdvEnt's whole adversarial loss (Vu et al., CVPR 2019)."""
    return bce(d1(ent_t_cls), SOURCE_LABEL)


def generator_adv_losses(d1: Discriminator, d2: Discriminator, ent_t_cls: torch.Tensor, ent_s_proto: torch.Tensor,
                         ent_t_proto: torch.Tensor,
                         legacy_d2_gen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Generator side: (l_d1, l_d2) = (BCE(D1(I_t^cls), 0), ½[BCE(D2(I_s^proto), 0) + BCE(D2(I_t^proto), 0)]).

    ``legacy_d2_gen`` is the released code, which uses the source map twice: ½[a + a] = a exactly, so
    l_d2 = BCE(D2(I_s^proto), 0) and ``ent_t_proto`` is ignored.
    """
    l_d1 = d1_generator_loss(d1, ent_t_cls)
    l_src = bce(d2(ent_s_proto), SOURCE_LABEL)
    if legacy_d2_gen:
        return l_d1, l_src
    return l_d1, 0.5 * (l_src + bce(d2(ent_t_proto), SOURCE_LABEL))


def discriminator_losses(d1: Discriminator, d2: Discriminator, ent_s_cls: torch.Tensor, ent_t_cls: torch.Tensor,
                         ent_s_proto: torch.Tensor, ent_t_proto: torch.Tensor,
                         legacy_d2_step1: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Discriminator side on detached maps, and the detached mean output of each discriminator call:

    l_D1 = BCE(D1(I_s^cls), 0) + BCE(D1(I_t^cls), 1)
    l_D2 = BCE(D2(I_s^cls), 0) + ½[BCE(D2(I_s^proto), 1) + BCE(D2(I_t^proto), 1)]

    ``legacy_d2_step1`` is the released step 1, whose second half uses the source map twice
    (= BCE(D2(I_s^proto), 1); ``ent_t_proto`` is ignored).

    The means (``d1_source``, ``d1_target``, ``d2_source``, ``d2_source_proto``, ``d2_target_proto``; the last
    one not with ``legacy_d2_step1``) are 0-dim tensors for monitoring, taken from these very calls so that
    no second discriminator pass is needed.
    """
    # The calls run in the order the released code makes them (gradient sums stay bit for bit the same).
    l_D1, means = d1_discriminator_loss(d1, ent_s_cls, ent_t_cls)
    l_proto = bce(_call(d2, "d2_source_proto", ent_s_proto, means), TARGET_LABEL)
    if not legacy_d2_step1:
        l_proto = 0.5 * (l_proto + bce(_call(d2, "d2_target_proto", ent_t_proto, means), TARGET_LABEL))
    l_D2 = bce(_call(d2, "d2_source", ent_s_cls, means), SOURCE_LABEL) + l_proto
    return l_D1, l_D2, means


def d1_discriminator_loss(d1: Discriminator, ent_s_cls: torch.Tensor,
                          ent_t_cls: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D1's side on detached classifier maps [B, C, H, W]: l_D1 = BCE(D1(I_s^cls), 0) + BCE(D1(I_t^cls), 1),
    and the detached mean outputs ``d1_source``, ``d1_target`` of the two calls (for monitoring)."""
    means: dict[str, torch.Tensor] = {}
    l_D1 = bce(_call(d1, "d1_source", ent_s_cls, means), SOURCE_LABEL) \
        + bce(_call(d1, "d1_target", ent_t_cls, means), TARGET_LABEL)
    return l_D1, means


def _call(d: Discriminator, name: str, ent: torch.Tensor, means: dict[str, torch.Tensor]) -> torch.Tensor:
    """``d`` on a detached map, its mean output recorded in ``means[name]``: the monitored value comes from the
    very call the loss uses, so no second discriminator pass is needed."""
    out = d(ent.detach())
    means[name] = out.detach().mean()
    return out
