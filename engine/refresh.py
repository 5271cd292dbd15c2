"""The prototype refresh run before every epoch (CDR-MPG, docs/method.md §3).

Image-level class centroids of the features ``f`` are pooled per class from the source (ground truth)
and, once target pseudo-labels are switched on, from confident target pixels; each pool is clustered
into its class's K_c groups. ``P_ST`` (source + target) drives training; ``P_T`` (target only) is what
steps 2 and 3 evaluate with. Each domain's features are extracted with its own BatchNorm statistics
(``--bn-stats domain``), and ``balance=True`` gives both domains equal weight in each class's pool.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.device import amp_dtype, autocast
from models.labels import pseudo_labels, resize_labels
from models.prototypes import (
    CentroidPool,
    auto_clusters,
    build_prototypes,
    class_centroids,
)
from utils import dist


@dataclass
class RefreshResult:
    source_target: torch.Tensor  # P_ST [C*K, D]
    target: torch.Tensor | None  # P_T [C*K, D], None while target pseudo-labels are off
    counts_source_target: list[int] = field(default_factory=list)
    counts_target: list[int] = field(default_factory=list)
    kept_previous: list[int] = field(default_factory=list)
    clusters: list[int] = field(default_factory=list)  # K_c per class used for this refresh
    # centroids per class from each domain before balancing: {"source": [N_c], "target": [N_c]}
    pool_sizes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def for_target(self) -> torch.Tensor:
        """The prototypes for target images: P_T once target pseudo-labels are on, else P_ST. What the
        target evaluation and step 3's student use."""
        return self.target if self.target is not None else self.source_target

    def state_dict(self) -> dict[str, Any]:
        """What checkpoints store (``last.pt``, ``model.pt``): the prototypes and their refresh report."""
        return {"source_target": self.source_target, "target": self.target,
                "counts_source_target": self.counts_source_target, "counts_target": self.counts_target,
                "kept_previous": self.kept_previous, "clusters": self.clusters}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> RefreshResult:
        """The inverse of :meth:`state_dict`, with the prototypes on ``device``."""
        target = state["target"]
        return cls(state["source_target"].to(device), None if target is None else target.to(device),
                   state["counts_source_target"], state["counts_target"], state["kept_previous"], state["clusters"])


@torch.no_grad()
def refresh_prototypes(model: nn.Module, source: Iterable[dict[str, Any]], target: Iterable[dict[str, Any]] | None,
                       tau: float | None, clusters: Sequence[int], device: torch.device, *,
                       previous: RefreshResult | None = None, mode: str = "clean",
                       max_batches: int | None = None, cluster_kwargs: dict[str, Any] | None = None,
                       feature_dim: int = 128, amp: str = "off",
                       auto_k: tuple[int, float] | None = None, balance: bool = False,
                       seed: int = 0) -> RefreshResult:
    """Pool centroids over the refresh data and cluster them into prototypes.

    ``mode="clean"``: one pass over every source-train and every target-train image.
    ``mode="legacy"``: the released code's lock-step loop, ``len(source) - 1`` source batches with the
    target loader stepped alongside (restarting from its first batch when it runs out, so a small target
    set is counted several times); the target-only pool uses ``len(target) - 1`` batches.
    ``amp`` runs the network in reduced precision; centroids and clustering stay float32.
    ``balance=True`` clusters each class's source + target pool with both domains weighted equally
    (:func:`balanced_pool`, seeded by ``seed``); otherwise every centroid counts once, so the domain
    with more images dominates.
    ``auto_k=(k_max, threshold)`` replaces ``clusters`` by the variance rule of ``auto_clusters`` on the
    pooled (source + target) centroids.
    """
    forward_src = _Forward(model, device, amp, "source")
    forward_tgt = _Forward(model, device, amp, "target")
    num_classes = len(clusters)
    pool_src = CentroidPool(num_classes)
    pool_tgt = CentroidPool(num_classes)
    pool_tgt_only = CentroidPool(num_classes)
    use_target = target is not None and tau is not None

    if mode == "clean":
        for batch in _limit(source, max_batches):
            pool_src.add(_source_centroids(forward_src, batch, num_classes, device))
        if use_target:
            for batch in _limit(target, max_batches):
                centroids = _target_centroids(forward_tgt, batch, tau, num_classes, device)
                pool_tgt.add(centroids)
                pool_tgt_only.add(centroids)
    elif mode == "legacy":
        n_src = len(source) - 1
        if max_batches is not None:
            n_src = min(n_src, max_batches)
        lockstep = itertools.cycle(target) if use_target else None
        for batch in itertools.islice(source, n_src):
            pool_src.add(_source_centroids(forward_src, batch, num_classes, device))
            if lockstep is not None:
                pool_tgt.add(_target_centroids(forward_tgt, next(lockstep), tau, num_classes, device))
        if use_target:
            n_tgt = len(target) - 1
            if max_batches is not None:
                n_tgt = min(n_tgt, max_batches)
            for batch in itertools.islice(target, n_tgt):
                pool_tgt_only.add(_target_centroids(forward_tgt, batch, tau, num_classes, device))
    else:
        raise ValueError(f"unknown refresh mode {mode}")

    src, tgt, tgt_only = pool_src.gather(), pool_tgt.gather(), pool_tgt_only.gather()
    gen = torch.Generator().manual_seed(seed)
    pooled = [balanced_pool(s, t, gen) if balance else _cat(s, t) for s, t in zip(src, tgt)]
    if auto_k is not None:
        clusters = auto_clusters(pooled, k_min=1, k_max=auto_k[0], threshold=auto_k[1])
    k_max = max(clusters)
    # A class with no sample keeps its previous prototypes: the last refresh's, or at a stage's first
    # refresh the previous stage's (any K, see build_prototypes); without either, zeros.
    zeros = torch.zeros(num_classes * k_max, feature_dim, device=device)
    prev_st = previous.source_target if previous is not None else zeros
    kwargs = cluster_kwargs or {}
    p_st, report = build_prototypes(pooled, clusters, previous=prev_st, **kwargs)
    result = RefreshResult(p_st, None, counts_source_target=[_n(p) for p in pooled],
                           kept_previous=list(report.get("kept_previous", [])), clusters=list(clusters),
                           pool_sizes={"source": [_n(p) for p in src], "target": [_n(p) for p in tgt]})
    if use_target:
        prev_t = previous.target if previous is not None and previous.target is not None else p_st
        result.target, _ = build_prototypes(tgt_only, clusters, previous=prev_t, **kwargs)
        result.counts_target = [_n(p) for p in tgt_only]
    # Every rank clustered the same gathered pools; broadcasting rank 0's result rules out any
    # last-bit difference between ranks.
    if dist.is_dist():
        for tensor in (result.source_target, result.target):
            if tensor is not None:
                torch.distributed.broadcast(tensor, src=0)
    return result


def balanced_pool(source: torch.Tensor | None, target: torch.Tensor | None,
                  generator: torch.Generator) -> torch.Tensor | None:
    """One class's pool [N, D] in which source and target carry equal total weight.

    The smaller domain's rows are repeated ``n_large // n_small`` times and a random
    ``n_large % n_small`` of them once more (drawn with ``generator``), so both domains contribute
    exactly ``n_large`` rows and k-means, its z-scoring and the class mean weight them equally
    (up to the one extra copy of some rows when the sizes do not divide). An empty side leaves the
    other as it is.
    """
    if _n(source) == 0 or _n(target) == 0:
        return _cat(source, target)
    small, large = sorted((source, target), key=len)
    repeats, rest = divmod(len(large), len(small))
    extra = torch.randperm(len(small), generator=generator)[:rest].to(small.device)
    grown = torch.cat([small.repeat(repeats, 1), small[extra]])
    return torch.cat([source if source is large else grown, target if target is large else grown])


class _Forward:
    """The network without prototypes on one domain's images, in eval mode with that domain's BatchNorm
    statistics, under the configured precision."""

    def __init__(self, model: nn.Module, device: torch.device, amp: str, domain: str):
        self.model, self.device, self.dtype, self.domain = model, device, amp_dtype(amp), domain

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.model.evaluating(self.domain), autocast(self.device, self.dtype):
            return self.model(x.to(self.device, non_blocking=True))


def _source_centroids(forward: _Forward, batch: dict[str, Any], num_classes: int, device: torch.device):
    out = forward(batch["img"])
    feats = out["features"]
    labels = resize_labels(batch["label"].to(device, non_blocking=True), feats.shape[-2:])
    return class_centroids(feats.float(), labels, num_classes)


def _target_centroids(forward: _Forward, batch: dict[str, Any], tau: float, num_classes: int,
                      device: torch.device):
    out = forward(batch["img"])
    feats = out["features"]
    labels = pseudo_labels(out["logits_up"].float().softmax(1), tau)
    return class_centroids(feats.float(), resize_labels(labels, feats.shape[-2:]), num_classes)


def _limit(loader: Iterable[dict[str, Any]], n: int | None) -> Iterator[dict[str, Any]]:
    return iter(loader) if n is None else itertools.islice(loader, n)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    parts = [t for t in (a, b) if t is not None and len(t)]
    return torch.cat(parts) if parts else None


def _n(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(len(t))
