"""Per-domain BatchNorm statistics, the balanced refresh and the warm start, each against a plain reference."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.evaluate import evaluate, recalibrate_bn
from engine.refresh import RefreshSpec, balanced_pool, refresh_prototypes
from models import NAPGNet
from models.labels import pseudo_labels, resize_labels
from models.prototypes import class_centroids


def _batches(seed: int, n: int, shift: float = 0.0, size: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"img": (torch.rand(2, 3, size, size, generator=gen) * 0.5 + shift),
             "label": torch.randint(0, 6, (2, size, size), generator=gen)} for _ in range(n)]


def _bn_buffers(model: NAPGNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")) and not k.startswith("target_bn.")}


@pytest.fixture(scope="module")
def trained():
    """A domain-BN network fed alternating source and target batches in training mode, and two plain
    (shared-BN) copies of the same initial network fed only source or only target batches."""
    torch.manual_seed(0)
    model = NAPGNet(backbone="resnet18", bn_stats="domain").train()
    ref_src = NAPGNet(backbone="resnet18").train()
    ref_src.load_state_dict(model.state_dict())
    ref_tgt = copy.deepcopy(ref_src)
    src, tgt = _batches(1, 3), _batches(2, 3, shift=0.4)
    with torch.no_grad():
        for s, t in zip(src, tgt):
            out_s = model(s["img"])
            with model.domain("target"):
                out_t = model(t["img"])
            torch.testing.assert_close(out_s["logits"], ref_src(s["img"])["logits"], rtol=0, atol=0)
            torch.testing.assert_close(out_t["logits"], ref_tgt(t["img"])["logits"], rtol=0, atol=0)
    return model.eval(), ref_src.eval(), ref_tgt.eval()


def test_each_domain_updates_only_its_own_statistics(trained):
    model, ref_src, ref_tgt = trained
    source_stats = _bn_buffers(model)
    for k, v in _bn_buffers(ref_src).items():
        assert torch.equal(source_stats[k], v), k
    with model.domain("target"):
        target_stats = _bn_buffers(model)
    for k, v in _bn_buffers(ref_tgt).items():
        assert torch.equal(target_stats[k], v), k
    assert not torch.equal(source_stats["backbone.bn1.running_mean"], target_stats["backbone.bn1.running_mean"])
    # leaving the block put the source statistics back
    assert all(torch.equal(v, _bn_buffers(model)[k]) for k, v in source_stats.items())


def test_evaluation_uses_the_evaluated_domains_statistics(trained):
    model, ref_src, ref_tgt = trained
    loader = _batches(3, 2, shift=0.4)
    protos = torch.rand(6, 128)
    for domain, ref in (("source", ref_src), ("target", ref_tgt)):
        got = evaluate(model, loader, protos, torch.device("cpu"), domain=domain)
        want = evaluate(ref, loader, protos, torch.device("cpu"))
        assert got == want, domain


def test_refresh_extracts_each_domain_with_its_statistics(trained):
    model, ref_src, ref_tgt = trained
    src, tgt = _batches(4, 2), _batches(5, 2, shift=0.4)
    tau = 0.0  # every target pixel is confident: the pools do not depend on a threshold's edge
    got = refresh_prototypes(model, src, tgt, tau, RefreshSpec((1,) * 6, kmeans_n_init=1), torch.device("cpu"))

    def pool(ref, batches, target):
        rows = [[] for _ in range(6)]
        for b in batches:
            out = ref(b["img"])
            labels = pseudo_labels(out["logits_up"].softmax(1), tau) if target else b["label"]
            for c, cen in enumerate(class_centroids(out["features"], resize_labels(labels, out["features"].shape[-2:]),
                                                    6)):
                rows[c].append(cen)
        return [len(torch.cat(r)) if r else 0 for r in rows], [torch.cat(r) if r else None for r in rows]

    (n_src, p_src), (n_tgt, p_tgt) = pool(ref_src, src, False), pool(ref_tgt, tgt, True)
    assert got.pool_sizes == {"source": n_src, "target": n_tgt}
    for c, k in enumerate(n_tgt):
        if k:  # K = 1: a prototype is the mean of its pool (target only, and source + target)
            torch.testing.assert_close(got.target[c], p_tgt[c].mean(0), rtol=1e-5, atol=1e-5)
            both = torch.cat([t for t in (p_src[c], p_tgt[c]) if t is not None])
            torch.testing.assert_close(got.source_target[c], both.mean(0), rtol=1e-5, atol=1e-5)


def test_shared_statistics_are_untouched_by_the_domain_switch():
    torch.manual_seed(0)
    model = NAPGNet(backbone="resnet18").train()
    assert not any(k.startswith("target_bn.") for k in model.state_dict())
    twin = copy.deepcopy(model)
    x = torch.rand(2, 3, 64, 64)
    with model.domain("target"):
        a = model(x)["logits"]
    b = twin(x)["logits"]
    assert torch.equal(a, b)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())


def test_checkpoints_load_across_bn_modes(trained):
    model, _, _ = trained
    shared = NAPGNet(backbone="resnet18")
    shared.load_state_dict(model.state_dict())  # a domain checkpoint in a shared network: source statistics
    assert torch.equal(shared.backbone.bn1.running_mean, model.backbone.bn1.running_mean)
    domain = NAPGNet(backbone="resnet18", bn_stats="domain")
    domain.load_state_dict(shared.state_dict())  # an older (shared) checkpoint: target starts as a copy
    with domain.domain("target"):
        assert torch.equal(domain.backbone.bn1.running_mean, shared.backbone.bn1.running_mean)


def test_recalibration_is_a_cumulative_average_of_the_domains_batches(trained):
    model, _, _ = trained
    model = copy.deepcopy(model)
    batches = _batches(6, 3, shift=0.2)
    used = recalibrate_bn(model, batches + [{"img": torch.rand(1, 3, 64, 64)}], torch.device("cpu"), domain="target")
    assert used == 6 and not model.training
    # reference: the stem's BN statistics by hand, mean of the per-batch means (equal batch sizes)
    stem = torch.nn.Sequential(model.backbone.conv1)
    means = [stem(b["img"]).mean((0, 2, 3)) for b in batches]
    with model.domain("target"):
        torch.testing.assert_close(model.backbone.bn1.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)


def test_balanced_pool_gives_both_domains_equal_weight():
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(3, 4), torch.randn(12, 4) + 5
    pool = balanced_pool(src, tgt, gen)
    assert pool.shape == (24, 4)
    # divisible sizes: exactly the source repeated 4 times, so the pool mean is the mean of the domain means
    torch.testing.assert_close(pool.mean(0), (src.mean(0) + tgt.mean(0)) / 2)
    uneven = balanced_pool(torch.randn(5, 4), tgt, gen)
    assert uneven.shape == (24, 4)  # 12 source rows (2 x 5 + 2 drawn) and 12 target rows
    assert torch.equal(balanced_pool(None, tgt, gen), tgt) and torch.equal(balanced_pool(src, None, gen), src)


def test_target_statistics_survive_syncbatchnorm_conversion(trained):
    model, _, ref_tgt = trained
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert isinstance(synced.backbone.bn1, torch.nn.SyncBatchNorm)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), synced.domain("target"):
        got = synced(x)["logits"]
    assert torch.equal(got, ref_tgt(x)["logits"])
    assert set(synced.state_dict()) == set(model.state_dict())
