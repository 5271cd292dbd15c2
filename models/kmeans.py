"""k-means on a tensor's device: greedy k-means++ seeding and Lloyd iterations (docs/method.md §3).

The ``torch`` back end of the prototype clustering: scikit-learn's algorithm, with its own random
stream, so the work stays on the GPU during a refresh.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class KMeansResult(NamedTuple):
    centers: torch.Tensor  # [k, D]
    labels: torch.Tensor  # [N] int64
    inertia: float  # sum of squared distances of the rows to their centre


def kmeans(x: torch.Tensor, k: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0) -> KMeansResult:
    """Lloyd's k-means with greedy k-means++ seeding, following scikit-learn's ``KMeans(algorithm="lloyd")``.

    x: [N, D] on any device (the work stays there); k <= N. Distances are float32 (float64 when x is
    float64); centre sums, potentials and the inertia accumulate in float64. Like scikit-learn the data
    are centred first, ``tol`` is relative to the mean per-dimension variance, a run stops when the
    labels no longer change or the squared centre shift is within tolerance, an empty cluster takes the
    point farthest from its centre, and the best of ``n_init`` runs (lowest inertia) is returned.
    The random stream (a CPU ``torch.Generator`` seeded with ``seed``) is not scikit-learn's, so the
    result is deterministic for a seed but not identical to scikit-learn's.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects x of shape [N, D], got {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={n} rows")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x64 = x.detach().to(torch.float64)
    mean = x64.mean(0)
    xc64 = x64 - mean  # centring keeps the |x|^2 - 2 x.c + |c|^2 expansion accurate, as scikit-learn does
    xc = xc64.to(work)
    tol_abs = float(xc64.var(0, unbiased=False).mean()) * tol
    gen = torch.Generator(device="cpu").manual_seed(seed)
    runs = (_lloyd(xc, xc64, _kmeans_plusplus(xc64, k, gen).to(work), max_iter, tol_abs) for _ in range(n_init))
    best = min(runs, key=lambda r: r.inertia)  # the first of equally good runs, as scikit-learn
    return KMeansResult((best.centers.to(torch.float64) + mean).to(work), best.labels, best.inertia)


def _kmeans_plusplus(x64: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (2 + log k local trials per centre) on float64 data [N, D] -> centres [k, D]."""
    n = x64.shape[0]
    n_trials = 2 + int(math.log(k))
    x_sq = (x64 * x64).sum(1)

    def sq_dist(rows: torch.Tensor) -> torch.Tensor:  # [m, D] -> [m, N]
        d = (rows * rows).sum(1, keepdim=True) - 2 * rows @ x64.T + x_sq
        return d.clamp_min_(0)

    first = int(torch.randint(n, (1,), generator=gen))
    ids = [first]
    closest = sq_dist(x64[first:first + 1])[0]
    pot = closest.sum()
    for _ in range(1, k):
        draws = torch.rand(n_trials, generator=gen, dtype=torch.float64).to(x64.device) * pot
        cand = torch.searchsorted(closest.cumsum(0), draws).clamp_(max=n - 1)
        d = torch.minimum(closest, sq_dist(x64[cand]))  # [n_trials, N]
        pots = d.sum(1)
        best = int(pots.argmin())
        closest, pot = d[best], pots[best]
        ids.append(int(cand[best]))
    return x64[ids]


def _lloyd(x: torch.Tensor, x64: torch.Tensor, centers: torch.Tensor, max_iter: int,
           tol: float) -> KMeansResult:
    """One Lloyd run from ``centers`` [k, D]; x [N, D] in the working dtype, x64 the same in float64."""
    k = centers.shape[0]
    labels_old = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    strict = False
    for _ in range(max_iter):
        labels = _assign(x, centers)
        new = _update_centers(x64, labels, centers, k)
        shift = float(((new - centers.to(torch.float64)) ** 2).sum())
        centers = new.to(x.dtype)
        if torch.equal(labels, labels_old):
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    if not strict:  # the centres moved after the last assignment
        labels = _assign(x, centers)
    inertia = float(((x64 - centers.to(torch.float64)[labels]) ** 2).sum())
    return KMeansResult(centers, labels, inertia)


def _assign(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every row ([N]); |x|^2 is the same for all centres and dropped."""
    return ((centers * centers).sum(1) - 2 * x @ centers.T).argmin(1)


def _update_centers(x64: torch.Tensor, labels: torch.Tensor, old: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster means in float64 [k, D]; empty clusters take the rows farthest from their current centre."""
    onehot = F.one_hot(labels, k).to(torch.float64)  # a matmul, not index_add: deterministic on CUDA
    sums = onehot.T @ x64
    counts = onehot.sum(0)
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        dist_own = ((x64 - old.to(torch.float64)[labels]) ** 2).sum(1)
        if float(dist_own.max()) > 0:  # otherwise there are fewer distinct rows than clusters
            far = dist_own.topk(len(empty)).indices
            sums.index_add_(0, labels[far], -x64[far])
            counts.index_add_(0, labels[far], -torch.ones_like(counts[: len(far)]))
            sums[empty] = x64[far]
            counts[empty] = 1
    new = sums / counts.clamp_min(1)[:, None]
    # A cluster still empty (all rows identical) keeps its centre instead of jumping to the origin.
    return torch.where((counts > 0)[:, None], new, old.to(torch.float64))
