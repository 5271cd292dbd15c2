"""Multi-prototype groups (CDR-MPG, docs/method.md §3): centroids, pools and the clustering rule.

Once per epoch the refresh pass pools image-level class centroids of the features ``f``
(:func:`class_centroids`, :class:`CentroidPool`) and turns every class's pool into ``K_c`` prototypes
(:func:`cluster_class`): z-score per dimension, k-means with ``K_c`` clusters when ``K_c < 3``, else
``K_c - 1`` clusters plus the global mean, then back to feature space. :func:`build_prototypes` pads
every class to ``K = max(K_c)`` by consecutive repetition (``a, a, b, b``) and stacks the classes
class-major, giving ``P`` [C*K, D] with row ``c*K + k``.

Two k-means back ends: ``"torch"`` (:func:`models.kmeans.kmeans`, Lloyd + greedy k-means++ on the data's device) and
``"sklearn"`` (``sklearn.cluster.KMeans``, bit for bit the original's numbers when ``n_init="auto"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.kmeans import kmeans
from utils.dist import is_dist

logger = logging.getLogger(__name__)

KMEANS_BACKENDS = ("torch", "sklearn")


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
                     previous: torch.Tensor | None = None,
                     **cluster_kwargs) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Prototypes P [C*K, D] (class-major, row ``c*K + k``) from per-class pools ([N_c, D] or None).

    K = max(clusters); class c's ``K_c`` centres (:func:`cluster_class`, which gets ``cluster_kwargs``)
    are each repeated ``K // K_c`` times in a row (numpy ``repeat``: a, a, b, b), so K_c must divide K.
    The duplicates do not change an argmax but do enter the joint softmax over the C*K logits, as in the
    original.

    The original's step-3 variant (``_tool2``) pads only classes with K_c == 1; for the lists where every
    K_c is 1 or K (step 3's [1, 1, 1, 2, 2, 2]) that is the same padding, and unequal class blocks cannot
    be represented anyway (the head and the losses group ``K`` consecutive channels per class).

    A class whose pool is empty (None or 0 rows) keeps its rows of ``previous`` ([C*K', D], any K'; see
    :func:`_previous_blocks`); without ``previous`` that is an error.

    Returns (P, report) with report = {"pool_sizes": N_c per class, "kept_previous": classes that kept
    their previous rows, "small_pools": classes with fewer centroids than k-means clusters}.
    """
    num_classes = len(clusters)
    if len(pools) != num_classes:
        raise ValueError(f"got {len(pools)} pools for {num_classes} cluster counts; give one of each per class")
    if min(clusters) < 1:
        raise ValueError(f"cluster counts must be >= 1, got {list(clusters)}")
    k_max = max(clusters)
    for c, k_c in enumerate(clusters):
        if k_max % k_c:
            raise ValueError(f"class {c} has K_c={k_c}, which does not divide K={k_max}; choose cluster "
                             f"counts that divide the largest one (e.g. 1, 2, 4)")
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
        if not is_dist() or dist.get_world_size() == 1:
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
