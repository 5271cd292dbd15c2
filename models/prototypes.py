"""Multi-prototype groups (CDR-MPG, method-model.md §2): centroids, k-means and the clustering rule.

Once per epoch the refresh pass pools image-level class centroids of the features ``f``
(:func:`class_centroids`, :class:`CentroidPool`) and turns every class's pool into ``K_c`` prototypes
(:func:`cluster_class`): z-score per dimension, k-means with ``K_c`` clusters when ``K_c < 3``, else
``K_c - 1`` clusters plus the global mean, then back to feature space. :func:`build_prototypes` pads
every class to ``K = max(K_c)`` by consecutive repetition (``a, a, b, b``) and stacks the classes
class-major, giving ``P`` [C*K, D] with row ``c*K + k``.

Two k-means back ends: ``"torch"`` (:func:`kmeans`, Lloyd + greedy k-means++ on the data's device) and
``"sklearn"`` (``sklearn.cluster.KMeans``, bit for bit the original's numbers when ``n_init="auto"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

logger = logging.getLogger(__name__)

KMEANS_BACKENDS = ("torch", "sklearn")
PADDINGS = ("repeat", "tool2")


# ----------------------------------------------------------------------------------------- k-means
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


# ------------------------------------------------------------------------------- clustering rule
def _n_kmeans_clusters(k_c: int) -> int:
    """K_c < 3: K_c k-means clusters; K_c >= 3: K_c - 1 clusters (the global mean is the last centre)."""
    return k_c if k_c < 3 else k_c - 1


def cluster_class(x: torch.Tensor, k_c: int, *, backend: str = "torch", n_init: int | str = 10,
                  seed: int = 0) -> torch.Tensor:
    """The ``K_c`` prototypes of one class from its pooled centroids x [N, D] -> [K_c, D] float32.

    The data are z-scored per dimension (population std, a zero std counts as 1, like scikit-learn's
    StandardScaler), clustered with k-means (``K_c`` clusters if ``K_c < 3``, else ``K_c - 1`` clusters
    followed by the global mean, i.e. the 1-cluster k-means centre) and mapped back to feature space.
    ``backend="sklearn"`` runs ``KMeans(random_state=seed, n_init=n_init)`` on float32 numpy data exactly
    as the original does (``n_init="auto"`` reproduces its prototypes bit for bit); ``"torch"`` runs
    :func:`kmeans` on x's device (``n_init="auto"`` means 1 run, scikit-learn's choice for k-means++).

    A pool with fewer rows than k-means clusters (``N < k``) cannot be clustered; then every row is its
    own centre, repeated consecutively to fill the k slots (rows ``floor(i*N/k)``), and a warning is
    logged. N must be >= 1.
    """
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"k-means backend must be one of {KMEANS_BACKENDS}, got {backend!r}")
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"cluster_class needs a non-empty pool [N, D], got {tuple(x.shape)}")
    if k_c < 1:
        raise ValueError(f"the number of prototypes per class must be >= 1, got {k_c}")
    k = _n_kmeans_clusters(k_c)
    if x.shape[0] < k:
        logger.warning("only %d centroids for %d k-means clusters: each centroid becomes a prototype, "
                       "repeated to fill the clusters", x.shape[0], k)
    if backend == "sklearn":
        return _cluster_sklearn(x, k_c, k, n_init, seed)
    x64 = x.detach().to(torch.float64)
    mean = x64.mean(0)
    std = x64.std(0, unbiased=False)
    std = torch.where(std < 10 * torch.finfo(torch.float64).eps, torch.ones_like(std), std)
    z = ((x64 - mean) / std).float()
    if z.shape[0] < k:
        centers = z[_small_pool_rows(z.shape[0], k, z.device)]
    else:
        runs = 1 if n_init == "auto" else int(n_init)
        centers = kmeans(z, k, n_init=runs, seed=seed).centers
    if k_c >= 3:
        centers = torch.cat([centers, z.to(torch.float64).mean(0, keepdim=True).float()])
    return (centers.to(torch.float64) * std + mean).float()


def _small_pool_rows(n: int, k: int, device: torch.device) -> torch.Tensor:
    return torch.arange(k, device=device) * n // k


def _cluster_sklearn(x: torch.Tensor, k_c: int, k: int, n_init: int | str, seed: int) -> torch.Tensor:
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    data = x.detach().cpu().numpy().astype(np.float32)
    scaler = StandardScaler()
    z = scaler.fit_transform(data)
    if z.shape[0] < k:
        centers = z[_small_pool_rows(z.shape[0], k, torch.device("cpu")).numpy()]
    else:
        centers = KMeans(k, random_state=seed, n_init=n_init).fit(z).cluster_centers_
    if k_c >= 3:
        mean = KMeans(1, random_state=seed, n_init=n_init).fit(z).cluster_centers_
        centers = np.concatenate([centers, mean])
    return torch.from_numpy(scaler.inverse_transform(centers)).float().to(x.device)


def build_prototypes(pools: Sequence[torch.Tensor | None], clusters: Sequence[int],
                     previous: torch.Tensor | None = None, padding: str = "repeat",
                     **cluster_kwargs) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Prototypes P [C*K, D] (class-major, row ``c*K + k``) from per-class pools ([N_c, D] or None).

    K = max(clusters); class c's ``K_c`` centres (:func:`cluster_class`, which gets ``cluster_kwargs``)
    are each repeated ``K // K_c`` times in a row (numpy ``repeat``: a, a, b, b), so K_c must divide K.
    The duplicates do not change an argmax but do enter the joint softmax over the C*K logits, as in the
    original.

    ``padding="tool2"`` is the step-3 ``_tool2`` variant, which pads only classes with K_c == 1 and so
    leaves classes with 1 < K_c < K with fewer rows than K. Such unequal blocks cannot be represented
    here (the head and the losses group ``K`` consecutive channels per class), so "tool2" raises a
    ValueError for those lists; for the lists it can express (every K_c is 1 or K, e.g. step 3's
    [1, 1, 1, 2, 2, 2]) it is identical to "repeat".

    A class whose pool is empty (None or 0 rows) keeps its rows of ``previous`` ([C*K', D], any K'; see
    :func:`_previous_blocks`); without ``previous`` that is an error.

    Returns (P, report) with report = {"pool_sizes": N_c per class, "kept_previous": classes that kept
    their previous rows, "small_pools": classes with fewer centroids than k-means clusters}.
    """
    num_classes = len(clusters)
    if len(pools) != num_classes:
        raise ValueError(f"got {len(pools)} pools for {num_classes} cluster counts; give one of each per class")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if min(clusters) < 1:
        raise ValueError(f"cluster counts must be >= 1, got {list(clusters)}")
    k_max = max(clusters)
    for c, k_c in enumerate(clusters):
        if k_max % k_c:
            raise ValueError(f"class {c} has K_c={k_c}, which does not divide K={k_max}; choose cluster "
                             f"counts that divide the largest one (e.g. 1, 2, 4)")
        if padding == "tool2" and k_c not in (1, k_max):
            raise ValueError(f"padding='tool2' would leave class {c} with {k_c} of {k_max} rows (unequal class "
                             f"blocks are not supported); use padding='repeat'")
    sizes = [0 if p is None else int(p.shape[0]) for p in pools]
    prev_blocks = _previous_blocks(previous, num_classes, k_max) if previous is not None else None
    blocks: list[torch.Tensor | None] = []
    kept, small = [], []
    for c, (pool, k_c) in enumerate(zip(pools, clusters)):
        if sizes[c] == 0:
            if prev_blocks is None:
                raise ValueError(f"class {c} has no centroids and there are no previous prototypes to keep; "
                                 f"pass previous= or make sure every class occurs in the refresh data")
            blocks.append(None)
            kept.append(c)
            continue
        if sizes[c] < _n_kmeans_clusters(k_c):
            small.append(c)
        blocks.append(cluster_class(pool, k_c, **cluster_kwargs).repeat_interleave(k_max // k_c, dim=0))
    ref = next((b for b in blocks if b is not None), None)
    if ref is None:
        ref = prev_blocks[0]
    out = [b if b is not None else prev_blocks[c].to(device=ref.device, dtype=ref.dtype)
           for c, b in enumerate(blocks)]
    dims = {b.shape[1] for b in out}
    if len(dims) != 1:
        raise ValueError(f"pools and previous prototypes have different feature sizes {sorted(dims)}")
    report = {"pool_sizes": sizes, "kept_previous": kept, "small_pools": small}
    return torch.cat(out), report


def _previous_blocks(previous: torch.Tensor, num_classes: int, k_max: int) -> list[torch.Tensor]:
    """Split previous prototypes [C*K', D] into per-class blocks of k_max rows: row k is previous row
    ``k * K' // K``, i.e. consecutive repetition when K' divides K (a previous stage with fewer
    prototypes) and evenly spaced rows when K < K' (a previous stage with more)."""
    rows = previous.shape[0]
    if previous.dim() != 2 or rows == 0 or rows % num_classes:
        raise ValueError(f"previous prototypes of shape {tuple(previous.shape)} do not fit {num_classes} classes "
                         f"(need [C*K', D])")
    k_prev = rows // num_classes
    view = previous.detach().reshape(num_classes, k_prev, -1)
    pick = torch.arange(k_max, device=previous.device) * k_prev // k_max
    return [view[c, pick] for c in range(num_classes)]


def auto_clusters(pools: Sequence[torch.Tensor | None], k_min: int = 1, k_max: int = 4,
                  threshold: float = 0.5) -> list[int]:
    """The intended "dynamic number of prototypes" rule (the original's unused helpers).

    Per class, the variance of its pooled centroids [N_c, D] (the mean over dimensions of the population
    variance) is min-max normalised over the classes; a class above ``threshold`` gets ``k_max``
    prototypes, the others ``k_min``. Classes with an empty pool get ``k_min`` and do not enter the
    normalisation; if all variances are equal every class gets ``k_min``.
    """
    if not 1 <= k_min <= k_max or k_max % k_min:
        raise ValueError(f"need 1 <= k_min <= k_max with k_min dividing k_max, got {k_min} and {k_max}")
    var = [None if p is None or p.shape[0] == 0 else float(p.detach().double().var(0, unbiased=False).mean())
           for p in pools]
    known = [v for v in var if v is not None]
    if not known:
        return [k_min] * len(pools)
    lo, hi = min(known), max(known)
    span = hi - lo
    return [k_max if v is not None and span > 0 and (v - lo) / span > threshold else k_min for v in var]


# ----------------------------------------------------------------------------------- centroids
def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    ignore_index: int = 255) -> list[torch.Tensor]:
    """Image-level class means of the features: per class c a tensor [n_c, D], one row per image
    (in batch order) where c occurs in ``labels``.

    features [B, D, h, w], labels [B, h, w] with values 0..C-1 or ``ignore_index``. Like the original,
    a centroid whose entries sum to 0 (e.g. an all-zero ReLU feature) is dropped.
    """
    b, d, h, w = features.shape
    if labels.shape != (b, h, w):
        raise ValueError(f"labels {tuple(labels.shape)} do not match features {tuple(features.shape)}; "
                         f"resize them with resize_labels first")
    lab = labels.reshape(b, h * w).long()
    valid = (lab >= 0) & (lab < num_classes)
    if bool((~valid & (lab != ignore_index)).any()):
        raise ValueError(f"labels must be in 0..{num_classes - 1} or {ignore_index}")
    onehot = F.one_hot(torch.where(valid, lab, num_classes), num_classes + 1)[..., :num_classes]
    onehot = onehot.to(features.dtype)  # [B, hw, C]
    sums = onehot.transpose(1, 2) @ features.reshape(b, d, h * w).transpose(1, 2)  # [B, C, D]
    counts = onehot.sum(1)  # [B, C]
    means = sums / counts.clamp_min(1)[..., None]
    keep = (counts > 0) & (means.sum(-1) != 0)
    return [means[:, c][keep[:, c]] for c in range(num_classes)]


def pseudo_labels(prob_up: torch.Tensor, tau: float, ignore_index: int = 255) -> torch.Tensor:
    """Confident argmax: prob_up [B, C, H, W] -> labels [B, H, W] int64, ``ignore_index`` where max < tau."""
    conf, labels = prob_up.max(1)
    return labels.masked_fill(conf < tau, ignore_index)


def resize_labels(labels: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """labels [B, H, W] -> [B, h, w] with PyTorch's legacy 'nearest' (source index floor(i * H / h)),
    as the original does (``F.interpolate`` on a float copy)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(labels.shape[-2:]) == size:
        return labels
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
    return out.to(labels.dtype)


class CentroidPool:
    """Per-class pools of centroids ([N_c, D] float32) accumulated over the refresh pass."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._chunks: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]

    def add(self, centroids: Sequence[torch.Tensor]) -> None:
        """Append one batch's centroids, a sequence of C tensors [n_c, D] (n_c may be 0)."""
        if len(centroids) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} per-class tensors, got {len(centroids)}")
        for chunks, t in zip(self._chunks, centroids):
            if t.shape[0]:
                chunks.append(t.detach().float())

    @property
    def pools(self) -> list[torch.Tensor | None]:
        """Per class [N_c, D], or None for a class without centroids."""
        for c, chunks in enumerate(self._chunks):
            if len(chunks) > 1:
                self._chunks[c] = [torch.cat(chunks)]
        return [chunks[0] if chunks else None for chunks in self._chunks]

    @property
    def counts(self) -> list[int]:
        return [sum(t.shape[0] for t in chunks) for chunks in self._chunks]

    def gather(self) -> list[torch.Tensor | None]:
        """Concatenate the pools of all torch.distributed ranks (in rank order) so that every rank
        clusters identical data; the pool then holds the gathered rows. A no-op in a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.pools
        pools = self.pools
        local = next((p for p in pools if p is not None), None)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        world = dist.get_world_size()
        # Counts and the feature size first: a rank may hold no rows at all.
        meta = torch.tensor(self.counts + [0 if local is None else local.shape[1]], device=device)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta)
        counts = torch.stack(metas)[:, :-1].tolist()  # [world][C]
        dim = max(int(m[-1]) for m in metas)
        n_max = max(max(row) for row in counts)
        if n_max == 0:
            return pools
        padded = torch.zeros(self.num_classes, n_max, dim, device=device)
        for c, p in enumerate(pools):
            if p is not None:
                padded[c, : p.shape[0]] = p.to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out_device = local.device if local is not None else device
        result: list[torch.Tensor | None] = []
        for c in range(self.num_classes):
            parts = [g[c, : counts[r][c]] for r, g in enumerate(gathered) if counts[r][c]]
            result.append(torch.cat(parts).to(out_device) if parts else None)
        self._chunks = [[p] if p is not None else [] for p in result]
        return result
