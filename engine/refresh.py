"""The prototype refresh run before every epoch (CDR-MPG, docs/method.md §3).

Image-level class centroids of the features ``f`` are pooled per class from the source (ground truth)
and, once target pseudo-labels are switched on, from confident target pixels; each pool is clustered
into its class's K_c groups. ``P_ST`` (source + target) drives training; ``P_T`` (target only) is what
steps 2 and 3 evaluate with. Each domain's features are extracted with its own BatchNorm statistics
(``--bn-stats domain``), and ``RefreshSpec.balance`` gives both domains equal weight in each class's pool.

A stage describes its refresh once (:class:`RefreshSpec`); :func:`refresh_prototypes` runs one of two
passes over the data (:data:`PASSES`: the paper's clean pass or the released code's lock-step loop), then
the same clustering.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from data.preprocess import to_model_input
from engine.device import amp_dtype, autocast
from models.labels import pseudo_labels, resize_labels
from models.napg import FEATURE_CHANNELS
from models.prototypes import (
    CentroidPool,
    auto_clusters,
    build_prototypes,
    class_centroids,
)
from utils import dist
from utils.config import Config


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


@dataclass(frozen=True)
class RefreshSpec:
    """How a stage rebuilds its prototypes; made once per stage (:meth:`from_config`), the same every epoch.

    ``loop`` names the pass over the refresh data (:data:`PASSES`). ``kmeans_*`` go to the clustering
    (``models.prototypes.cluster_class``); ``seed`` also draws the balanced pools. ``auto_k`` replaces
    ``clusters`` by the variance rule of ``auto_clusters`` (k_max, threshold). ``max_batches`` caps each
    role's batches (smoke runs); ``amp`` runs the network in reduced precision (centroids and clustering
    stay float32); ``normalize`` is the network's input normalisation of uint8 batches.
    """

    clusters: tuple[int, ...]  # K_c per class
    loop: str = "clean"  # "clean" (paper) or "legacy" (the released code's lock-step loop)
    kmeans_backend: str = "torch"
    kmeans_n_init: int | str = 10
    seed: int = 0
    auto_k: tuple[int, float] | None = None
    balance: bool = False
    max_batches: int | None = None
    amp: str = "off"
    normalize: str = "unit"

    @classmethod
    def from_config(cls, cfg: Config) -> RefreshSpec:
        return cls(clusters=cfg.clusters, loop=cfg.refresh, kmeans_backend=cfg.kmeans_backend,
                   kmeans_n_init=cfg.kmeans_n_init, seed=cfg.kmeans_seed,
                   auto_k=(cfg.auto_k_max, cfg.auto_k_threshold) if cfg.auto_k else None,
                   balance=cfg.refresh_balance, max_batches=cfg.refresh_max_batches, amp=cfg.amp,
                   normalize=cfg.normalize)

    @property
    def kmeans(self) -> dict[str, Any]:
        """The clustering's keyword arguments (``build_prototypes``)."""
        return {"backend": self.kmeans_backend, "n_init": self.kmeans_n_init, "seed": self.seed}


@dataclass
class _Pools:
    """Centroids [N_c, D] per class from one refresh pass: ``source`` and ``target`` make P_ST (the
    target's only while pseudo-labels are on), ``target_only`` makes P_T."""

    source: CentroidPool
    target: CentroidPool
    target_only: CentroidPool


@torch.no_grad()
def refresh_prototypes(model: nn.Module, source: Iterable[dict[str, Any]], target: Iterable[dict[str, Any]] | None,
                       tau: float | None, spec: RefreshSpec, device: torch.device,
                       previous: RefreshResult | None = None, epoch: int = 1) -> RefreshResult:
    """The prototypes of ``epoch``: pool centroids over the refresh data, then cluster them (§3).

    ``source`` yields labelled source batches, ``target`` unlabelled target batches; target centroids
    are pooled only with a threshold ``tau`` (None before target pseudo-labels are on). ``previous``
    fills the classes without samples (the last refresh, or at a stage's first refresh the previous
    stage's). ``model`` is the bare network (not wrapped), run in eval mode with each domain's BatchNorm
    statistics.
    """
    use_target = target is not None and tau is not None
    pools = PASSES[spec.loop](_Centroids(model, spec, device, tau), source, target if use_target else None,
                              spec.max_batches, epoch)
    return _cluster(pools, spec, previous, device, use_target)


class _Centroids:
    """The per-image class centroids of one refresh batch, each domain in its own statistics."""

    def __init__(self, model: nn.Module, spec: RefreshSpec, device: torch.device, tau: float | None):
        self.model, self.spec, self.device, self.tau = model, spec, device, tau
        self.num_classes = len(spec.clusters)

    def _forward(self, batch: dict[str, Any], domain: str) -> dict[str, torch.Tensor]:
        x = to_model_input(batch["img"], self.device, self.spec.normalize)
        with self.model.evaluating(domain), autocast(self.device, amp_dtype(self.spec.amp)):
            return self.model(x)

    def source(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Centroids of the ground-truth classes."""
        feats = self._forward(batch, "source")["features"]
        labels = resize_labels(batch["label"].to(self.device, non_blocking=True), feats.shape[-2:])
        return class_centroids(feats.float(), labels, self.num_classes)

    def target(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Centroids of the classifier's confident pseudo-labels (confidence >= tau)."""
        out = self._forward(batch, "target")
        feats = out["features"]
        labels = pseudo_labels(out["logits_up"].float().softmax(1), self.tau)
        return class_centroids(feats.float(), resize_labels(labels, feats.shape[-2:]), self.num_classes)


def clean_pass(centroids: _Centroids, source: Iterable[dict[str, Any]], target: Iterable[dict[str, Any]] | None,
               max_batches: int | None, epoch: int) -> _Pools:
    """``paper``: one pass over every source-train and every target-train image, in loader order (the
    same every ``epoch``)."""
    pools = _Pools(*(CentroidPool(centroids.num_classes) for _ in range(3)))
    for batch in _limit(source, max_batches):
        pools.source.add(centroids.source(batch))
    for batch in _limit(target, max_batches) if target is not None else ():
        found = centroids.target(batch)
        pools.target.add(found)
        pools.target_only.add(found)
    return pools


def lockstep_pass(centroids: _Centroids, source: Sized, target: Sized | None, max_batches: int | None,
                  epoch: int) -> _Pools:
    """``legacy``: the released code's lock-step loop, ``len(source) - 1`` batches of a shuffled source
    loader (a new order every ``epoch``) with the target loader stepped alongside, restarting from its
    first batch when it runs out (so a small target set is counted several times); the target-only pool
    reads ``len(target) - 1`` batches."""
    pools = _Pools(*(CentroidPool(centroids.num_classes) for _ in range(3)))
    set_epoch = getattr(getattr(source, "sampler", None), "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    lockstep = itertools.cycle(target) if target is not None else None
    for batch in itertools.islice(source, _capped(len(source) - 1, max_batches)):
        pools.source.add(centroids.source(batch))
        if lockstep is not None:
            pools.target.add(centroids.target(next(lockstep)))
    if target is not None:
        for batch in itertools.islice(target, _capped(len(target) - 1, max_batches)):
            pools.target_only.add(centroids.target(batch))
    return pools


# ``--refresh`` -> the pass that pools the centroids.
PASSES = {"clean": clean_pass, "legacy": lockstep_pass}


def _cluster(pools: _Pools, spec: RefreshSpec, previous: RefreshResult | None, device: torch.device,
             use_target: bool) -> RefreshResult:
    """Gather every rank's pools, balance the domains (``spec.balance``) and cluster each class into K_c groups."""
    src, tgt, tgt_only = pools.source.gather(), pools.target.gather(), pools.target_only.gather()
    gen = torch.Generator().manual_seed(spec.seed)
    pooled = [balanced_pool(s, t, gen) if spec.balance else _cat(s, t) for s, t in zip(src, tgt)]
    clusters = spec.clusters
    if spec.auto_k is not None:
        clusters = auto_clusters(pooled, k_min=1, k_max=spec.auto_k[0], threshold=spec.auto_k[1])
    num_classes, k_max = len(clusters), max(clusters)
    # A class with no sample keeps its previous prototypes: the last refresh's, or at a stage's first
    # refresh the previous stage's (any K, see build_prototypes); without either, zeros.
    zeros = torch.zeros(num_classes * k_max, FEATURE_CHANNELS, device=device)
    prev_st = previous.source_target if previous is not None else zeros
    p_st, report = build_prototypes(pooled, clusters, previous=prev_st, **spec.kmeans)
    result = RefreshResult(p_st, None, counts_source_target=[_n(p) for p in pooled],
                           kept_previous=list(report.get("kept_previous", [])), clusters=list(clusters),
                           pool_sizes={"source": [_n(p) for p in src], "target": [_n(p) for p in tgt]})
    if use_target:
        prev_t = previous.target if previous is not None and previous.target is not None else p_st
        result.target, _ = build_prototypes(tgt_only, clusters, previous=prev_t, **spec.kmeans)
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


def _limit(loader: Iterable[dict[str, Any]], n: int | None) -> Iterator[dict[str, Any]]:
    return iter(loader) if n is None else itertools.islice(loader, n)


def _capped(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, cap)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    parts = [t for t in (a, b) if t is not None and len(t)]
    return torch.cat(parts) if parts else None


def _n(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(len(t))
