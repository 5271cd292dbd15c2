"""Prototype groups: clustering rule, padding, parity with the original, centroids and pools."""

from __future__ import annotations

import itertools
import logging

import pytest
import sklearn
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.labels import pseudo_labels, resize_labels
from models.prototypes import (
    CentroidPool,
    auto_clusters,
    build_prototypes,
    class_centroids,
    cluster_class,
)
from tests.helpers import load_fixture

LISTS = {"k111111": [1, 1, 1, 1, 1, 1], "k222244": [2, 2, 2, 2, 4, 4], "k111222": [1, 1, 1, 2, 2, 2]}


def fixture_pools() -> tuple[dict, list[torch.Tensor]]:
    fx = load_fixture("kmeans_groups.pt")
    return fx, [fx[f"X{c}"] for c in range(6)]


def assert_sklearn_close(actual: torch.Tensor, expected: torch.Tensor, fx: dict) -> None:
    """1e-5 with the fixtures' scikit-learn version, 1e-4 with another (tests/fixtures/README.md)."""
    rel = 1e-5 if sklearn.__version__ == fx["meta"]["sklearn"] else 1e-4
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


# ------------------------------------------------------------------------ parity with the original
@pytest.mark.parametrize("name", list(LISTS))
def test_sklearn_backend_reproduces_the_original(name):
    fx, pools = fixture_pools()
    assert fx["cluster_lists"][list(LISTS).index(name)].tolist() == LISTS[name]
    protos, report = build_prototypes(pools, LISTS[name], backend="sklearn", n_init="auto", seed=0)
    expected = fx[f"{name}_tool"]
    assert protos.shape == expected.shape and protos.dtype == torch.float32
    assert_sklearn_close(protos, expected, fx)
    assert report == {"pool_sizes": [5, 12, 23, 37, 48, 60], "kept_previous": [], "small_pools": []}


def test_legacy_kmeans_is_sklearn_kmeans_on_standardised_centroids():
    """The legacy preset's clustering equals sklearn's KMeans(random_state=0) with its default n_init on
    StandardScaler-ed pools (ValidateVisualization_tool.py), bit for bit: same centres, same labels."""
    import inspect

    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    from engine.config import resolve_config
    from engine.refresh import RefreshSpec

    cfg = resolve_config("step2", {}, preset="legacy")
    default_n_init = inspect.signature(KMeans).parameters["n_init"].default
    assert default_n_init == cfg.kmeans_n_init == "auto"  # the released code's default in sklearn >= 1.4
    captured = RefreshSpec.from_config(cfg).kmeans  # what a stage's refresh hands to the clustering
    assert captured == {"backend": "sklearn", "n_init": "auto", "seed": 0}
    _, pools = fixture_pools()
    for x in pools:
        for k_c in (1, 2, 4):
            ours = cluster_class(x, k_c, **captured)
            scaler = StandardScaler()
            z = scaler.fit_transform(x.numpy())
            k = k_c if k_c < 3 else k_c - 1
            km = KMeans(k, random_state=0).fit(z)
            centres = km.cluster_centers_
            if k_c >= 3:
                centres = np.concatenate([centres, KMeans(1, random_state=0).fit(z).cluster_centers_])
            expected = torch.from_numpy(scaler.inverse_transform(centres)).float()
            assert torch.equal(ours, expected), (x.shape, k_c)
            ours_z = scaler.transform(ours[:k].numpy())
            labels = ((z[:, None, :] - ours_z[None]) ** 2).sum(-1).argmin(1)
            assert (labels == km.labels_).all()


@pytest.mark.parametrize("name", ["k111111", "k111222"])
def test_tool2_padding_where_it_has_equal_blocks(name):
    # The original's step-3 padding (_tool2) pads only K_c == 1 classes: where every K_c is 1 or K it is ours.
    fx, pools = fixture_pools()
    protos, _ = build_prototypes(pools, LISTS[name], backend="sklearn", n_init="auto")
    assert_sklearn_close(protos, fx[f"{name}_tool2"], fx)


def test_tool2_padding_with_unequal_blocks_differs():
    fx, _ = fixture_pools()
    # What tool2 gives there: the 2-centre classes unpadded, i.e. every other row of the repeat padding,
    # which the grouped head cannot represent.
    repeat = fx["k222244_tool"].view(6, 4, -1)
    tool2 = fx["k222244_tool2"]
    assert tool2.shape == (16, 128)
    torch.testing.assert_close(tool2[:8], repeat[:4, ::2].reshape(8, -1))
    torch.testing.assert_close(tool2[8:], repeat[4:].reshape(8, -1))


def zscore(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x.double() - ref.double().mean(0)) / ref.double().std(0, unbiased=False)


def objective(pool: torch.Tensor, centres: torch.Tensor) -> float:
    """k-means objective of centres (feature space) on the z-scored pool."""
    return float(torch.cdist(zscore(pool, pool), zscore(centres, pool)).min(1).values.pow(2).sum())


@pytest.mark.parametrize("name", list(LISTS))
def test_torch_backend_agrees_with_sklearn(name):
    fx, pools = fixture_pools()
    clusters = LISTS[name]
    ours, _ = build_prototypes(pools, clusters, backend="torch", n_init=10, seed=0)
    ref = fx[f"{name}_tool"]
    assert ours.shape == ref.shape
    k_max = max(clusters)
    for c, k_c in enumerate(clusters):
        block, ref_block = ours.view(6, k_max, -1)[c], ref.view(6, k_max, -1)[c]
        reps = k_max // k_c
        centres, ref_centres = block[::reps], ref_block[::reps]
        assert torch.equal(block, centres.repeat_interleave(reps, 0))  # a, a, b, b
        n_blobs = int(fx[f"blob{c}"].max()) + 1
        n_kmeans = k_c if k_c < 3 else k_c - 1
        if n_kmeans in (1, n_blobs):  # a unique optimum: the same centres up to their order
            if k_c >= 3:  # the appended global mean comes last in both
                torch.testing.assert_close(centres[-1], ref_centres[-1], rtol=1e-5, atol=1e-4)
            err = min(float((centres[list(p)] - ref_centres[:n_kmeans]).abs().max())
                      for p in itertools.permutations(range(n_kmeans)))
            assert err < 1e-4 * float(ref_centres.abs().max())
        else:  # several blobs per cluster: any local optimum; ours (10 runs) is no worse than one run
            assert objective(pools[c], centres[:n_kmeans]) <= objective(pools[c], ref_centres[:n_kmeans]) * 1.01


# ------------------------------------------------------------------------------- clustering rule
@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_cluster_class_rule(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10, 5, generator=g) + 10, torch.randn(10, 5, generator=g) - 10])
    x[:, 2] = 3.0  # a constant dimension (std 0 counts as 1)
    one = cluster_class(x, 1, backend=backend)
    torch.testing.assert_close(one[0], x.mean(0))
    four = cluster_class(x, 4, backend=backend)  # 3 k-means centres, then the global mean
    assert four.shape == (4, 5)
    torch.testing.assert_close(four[-1], x.mean(0))
    assert torch.all(four[:, 2] == 3.0)
    two = cluster_class(x, 2, backend=backend)
    halves = torch.stack([x[:10].mean(0), x[10:].mean(0)])
    assert min(float((two[list(p)] - halves).abs().max()) for p in [(0, 1), (1, 0)]) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_small_pool_repeats_rows(backend, caplog):
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    with caplog.at_level(logging.WARNING, logger="models.prototypes"):
        centres = cluster_class(x, 4, backend=backend)  # 3 k-means clusters from 2 rows
    assert "only 2 centroids" in caplog.text
    torch.testing.assert_close(centres, torch.stack([x[0], x[0], x[1], x.mean(0)]))
    _, report = build_prototypes([x, x[:1]], [4, 2], backend=backend)
    assert report["small_pools"] == [0, 1]


def test_empty_pool_keeps_previous_rows():
    g = torch.Generator().manual_seed(0)
    pools = [torch.randn(6, 3, generator=g), None, torch.zeros(0, 3)]
    previous = torch.arange(6 * 3, dtype=torch.float32).view(6, 3)  # [C*K, D] with K = 2
    protos, report = build_prototypes(pools, [2, 2, 1], previous=previous)
    assert protos.shape == (6, 3)
    torch.testing.assert_close(protos[2:], previous[2:])
    assert report["kept_previous"] == [1, 2] and report["pool_sizes"] == [6, 0, 0]
    # Previous prototypes with fewer rows per class (K' = 1) are repeated like the new ones.
    prev_k1 = torch.tensor([[0.0, 0, 0], [1, 1, 1], [2, 2, 2]])
    protos, _ = build_prototypes(pools, [2, 2, 1], previous=prev_k1)
    torch.testing.assert_close(protos[2:], torch.tensor([[1.0, 1, 1], [1, 1, 1], [2, 2, 2], [2, 2, 2]]))
    # ... and with more rows per class (a step-2 hand-off with K' = 4 starting step 3 with K = 2), rows
    # k * K' // K: the first and the third of each class.
    prev_k4 = torch.arange(12 * 3, dtype=torch.float32).view(12, 3)
    protos, _ = build_prototypes(pools, [2, 2, 1], previous=prev_k4)
    torch.testing.assert_close(protos[2:], prev_k4[[4, 6, 8, 10]])
    with pytest.raises(ValueError, match="do not fit 3 classes"):
        build_prototypes(pools, [2, 2, 1], previous=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="no previous prototypes"):
        build_prototypes(pools, [2, 2, 1])


def test_build_prototypes_argument_errors():
    pools = [torch.randn(5, 3) for _ in range(3)]
    with pytest.raises(ValueError, match="does not divide"):
        build_prototypes(pools, [3, 4, 1])
    with pytest.raises(ValueError, match="3 cluster counts"):
        build_prototypes(pools[:2], [1, 1, 1])


def spread_pool(a: float, n_dims: int = 3) -> torch.Tensor:
    """Two rows +-a: population variance a^2 in every dimension."""
    return torch.tensor([[a] * n_dims, [-a] * n_dims])


def test_auto_clusters_variance_rule():
    # Variances 1, 1, 4, 9, (empty), 6: normalised (v - 1) / 8 = 0, 0, 0.375, 1, -, 0.625.
    pools = [spread_pool(1), spread_pool(1), spread_pool(2), spread_pool(3), None, spread_pool(6 ** 0.5)]
    assert auto_clusters(pools, k_min=1, k_max=4, threshold=0.5) == [1, 1, 1, 4, 1, 4]
    assert auto_clusters(pools, k_min=2, k_max=4, threshold=0.3) == [2, 2, 4, 4, 2, 4]
    assert auto_clusters([spread_pool(1), spread_pool(1)]) == [1, 1]
    with pytest.raises(ValueError, match="dividing"):
        auto_clusters(pools, k_min=3, k_max=4)


# ------------------------------------------------------------------------------------ centroids
def centroids_loop(features, labels, num_classes):
    out = [[] for _ in range(num_classes)]
    for b in range(features.shape[0]):
        for c in range(num_classes):
            where = labels[b] == c
            if where.any():
                mean = features[b][:, where].mean(1)
                if mean.sum() != 0:
                    out[c].append(mean)
    return [torch.stack(rows) if rows else torch.zeros(0, features.shape[1]) for rows in out]


def test_class_centroids_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(3, 8, 6, 5, generator=g))
    labels = torch.randint(0, 4, (3, 6, 5), generator=g)  # classes 4 and 5 never occur
    labels[0, :3] = 255
    labels[1][labels[1] == 2] = 1  # class 2 absent from image 1
    feats[2][:, labels[2] == 3] = 0  # an all-zero centroid is dropped, as in the original
    ours = class_centroids(feats, labels, 6)
    ref = centroids_loop(feats, labels, 6)
    assert [len(t) for t in ours] == [len(t) for t in ref]
    assert len(ours[2]) == 2 and len(ours[3]) == 2 and len(ours[4]) == 0
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_class_centroids_rejects_unknown_labels():
    with pytest.raises(ValueError, match="labels must be"):
        class_centroids(torch.rand(1, 2, 2, 2), torch.full((1, 2, 2), 250), 6)


def test_pseudo_labels():
    prob = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 1, 3)
    assert pseudo_labels(prob, 0.6).tolist() == [[[0, 255, 2]]]
    assert pseudo_labels(prob, 0.5, ignore_index=250).tolist() == [[[0, 1, 2]]]  # max == tau is kept


@pytest.mark.parametrize("size", [(5, 4), (3, 3), (12, 10), (13, 7)])
def test_resize_labels_is_legacy_nearest(size):
    labels = torch.randint(0, 6, (2, 12, 10))
    labels[0, 0, 0] = 255
    h, w = size
    rows = (torch.arange(h) * 12 / h).floor().long()  # source index floor(i * in / out)
    cols = (torch.arange(w) * 10 / w).floor().long()
    out = resize_labels(labels, size)
    assert out.dtype == labels.dtype
    assert torch.equal(out, labels[:, rows][:, :, cols])
    assert resize_labels(labels, 4).shape == (2, 4, 4)


# --------------------------------------------------------------------------------------- pools
def test_centroid_pool_accumulates():
    pool = CentroidPool(3)
    pool.add([torch.ones(2, 4), torch.zeros(0, 4), torch.full((1, 4), 2.0)])
    pool.add([torch.full((1, 4), 3.0), torch.zeros(0, 4), torch.zeros(0, 4)])
    assert pool.counts == [3, 0, 1]
    pools = pool.pools
    assert pools[1] is None
    torch.testing.assert_close(pools[0], torch.tensor([[1.0] * 4, [1.0] * 4, [3.0] * 4]))
    gathered = pool.gather()  # no process group: unchanged
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(gathered, pools))
    with pytest.raises(ValueError, match="3 per-class"):
        pool.add([torch.ones(1, 4)])


def _gather_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        pool = CentroidPool(3)
        if rank == 0:
            pool.add([torch.full((2, 4), 1.0), torch.zeros(0, 4), torch.zeros(0, 4)])
        else:
            pool.add([torch.full((1, 4), 2.0), torch.zeros(0, 4), torch.full((3, 4), 5.0)])
        torch.save(pool.gather(), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_centroid_pool_gathers_across_ranks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    # fork: the children need no fresh interpreter (spawn would re-import torch, seconds per rank)
    mp.start_processes(_gather_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    expected = [torch.tensor([[1.0] * 4, [1.0] * 4, [2.0] * 4]), None, torch.full((3, 4), 5.0)]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got[1] is None
        assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
