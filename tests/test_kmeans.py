"""Torch k-means against scikit-learn's KMeans (same algorithm, different random stream)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from models.kmeans import _update_centers, kmeans


def blobs(seed: int, k: int, n_per: int = 20, d: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 20
    x = centres.repeat_interleave(n_per, 0) + torch.randn(k * n_per, d, generator=g)
    return x[torch.randperm(len(x), generator=g)]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a renaming of the clusters."""
    return torch.equal(a[:, None] == a[None], b[:, None] == b[None])


def direct_inertia(x: torch.Tensor, centers: torch.Tensor) -> float:
    return float(torch.cdist(x.double(), centers.double()).min(1).values.pow(2).sum())


@pytest.mark.parametrize("k", [2, 3, 5])
def test_same_partition_as_sklearn_on_separated_blobs(k):
    x = blobs(k, k)
    ours = kmeans(x, k, seed=0)
    theirs = KMeans(k, random_state=0, n_init=10).fit(x.numpy())
    assert same_partition(ours.labels, torch.from_numpy(theirs.labels_).long())
    assert ours.inertia == pytest.approx(theirs.inertia_, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inertia_close_to_sklearn_on_random_data(seed):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((300, 16)).astype(np.float32))
    for k in (2, 3, 5, 8):
        ours = kmeans(x, k, n_init=10, seed=seed)
        theirs = KMeans(k, random_state=seed, n_init=10).fit(x.numpy()).inertia_
        assert ours.inertia == pytest.approx(theirs, rel=0.01)
        # The result is a Lloyd fixed point: labels are the nearest centres, the inertia is theirs.
        assert ours.inertia == pytest.approx(direct_inertia(x, ours.centers), rel=1e-5)
        assert torch.equal(ours.labels, torch.cdist(x, ours.centers).argmin(1))


def test_k1_gives_the_mean_and_total_variance():
    x = torch.randn(50, 4, dtype=torch.float64)
    result = kmeans(x, 1)
    assert result.centers.dtype == torch.float64
    torch.testing.assert_close(result.centers[0], x.mean(0))
    assert result.inertia == pytest.approx(float(((x - x.mean(0)) ** 2).sum()))
    assert torch.equal(result.labels, torch.zeros(50, dtype=torch.long))


def test_deterministic_for_a_seed():
    x = torch.randn(200, 8)
    a, b = kmeans(x, 4, seed=3), kmeans(x, 4, seed=3)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)


def test_fewer_distinct_rows_than_clusters():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    result = kmeans(x, 3, n_init=2)
    assert result.inertia == 0
    assert all(any(torch.equal(c, r) for r in x) for c in result.centers)


def test_empty_cluster_takes_the_farthest_point():
    x = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    old = torch.tensor([[0.0], [100.0]], dtype=torch.float64)
    labels = torch.zeros(3, dtype=torch.long)  # cluster 1 is empty
    new = _update_centers(x, labels, old, 2)
    # The point farthest from its centre (10) moves to the empty cluster; cluster 0 keeps 0 and 1.
    torch.testing.assert_close(new, torch.tensor([[0.5], [10.0]], dtype=torch.float64))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="k <= N"):
        kmeans(torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        kmeans(torch.randn(3), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda():
    x = blobs(0, 4)
    on_gpu = kmeans(x.cuda(), 4, seed=0)
    assert on_gpu.centers.is_cuda and on_gpu.labels.is_cuda
    on_cpu = kmeans(x, 4, seed=0)
    assert same_partition(on_gpu.labels.cpu(), on_cpu.labels)
    torch.testing.assert_close(on_gpu.centers.cpu(), on_cpu.centers, rtol=1e-4, atol=1e-4)
