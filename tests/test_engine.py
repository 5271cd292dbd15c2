"""One training iteration against a plain re-statement of the released code's arithmetic."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.build import build_method
from engine.config import resolve_config
from engine.methods import Method, method_class
from engine.methods.napg import NAPG
from engine.refresh import RefreshResult, RefreshSpec, refresh_prototypes
from models import FCDiscriminatorHighMask, NAPGNet
from utils.errors import UserError
from utils.stages import STAGES


def prob_2_entropy(prob: torch.Tensor) -> torch.Tensor:
    """The original ``util/func.prob_2_entropy``."""
    n, c, h, w = prob.size()
    return -torch.mul(prob, torch.log2(prob + 1e-30)) / np.log2(c)


def original_iteration(model, d1, d2, x_s, y_s, x_t, P, legacy: bool):
    """Step-1 generator and discriminator losses as the released scripts write them (K = 1, no GNCE)."""
    out_s = model(x_s, P)
    out_t = model(x_t, P)
    y128 = F.interpolate(y_s[:, None].float(), size=out_s["logits_up"].shape[-2:], mode="nearest")[:, 0].long()
    y32 = F.interpolate(y_s[:, None].float(), size=out_s["features"].shape[-2:], mode="nearest")[:, 0].long()
    ce = F.cross_entropy(out_s["logits_up"], y128, ignore_index=255)
    q_s = F.softmax(out_s["proto_logits"], 1)  # K = 1: the group probability is the plain softmax
    q_t = F.softmax(out_t["proto_logits"], 1)
    nll = F.nll_loss(torch.log(q_s), y32)
    e_t_cls = prob_2_entropy(F.softmax(out_t["logits_up"], 1))
    e_s_p, e_t_p = prob_2_entropy(q_s), prob_2_entropy(q_t)
    bce = F.binary_cross_entropy
    d2_second = e_s_p if legacy else e_t_p
    d_out1 = d1(e_t_cls)
    d_out2_s, d_out2_t = d2(e_s_p), d2(d2_second)
    adv = 0.001 * bce(d_out1, torch.zeros_like(d_out1)) + 0.001 * 0.5 * (
        bce(d_out2_s, torch.zeros_like(d_out2_s)) + bce(d_out2_t, torch.zeros_like(d_out2_t)))
    g_loss = ce + nll + adv
    e_s_cls = prob_2_entropy(F.softmax(out_s["logits_up"], 1)).detach()
    dd1 = bce(d1(e_s_cls), torch.zeros_like(d_out1)) + bce(d1(e_t_cls.detach()), torch.ones_like(d_out1))
    second = e_s_p if legacy else e_t_p
    o_real = d2(e_s_cls)
    o1, o2 = d2(e_s_p.detach()), d2(second.detach())
    dd2 = bce(o_real, torch.zeros_like(o_real)) + 0.5 * (bce(o1, torch.ones_like(o1)) + bce(o2, torch.ones_like(o2)))
    return g_loss, dd1, dd2


@pytest.mark.parametrize("preset", ["legacy", "paper"])
def test_step1_iteration_matches_the_released_arithmetic(preset):
    torch.manual_seed(0)
    # GNCE is checked against the fixtures in test_gnce.py
    cfg = resolve_config("step1", {"backbone": "resnet18", "proto_ignore_index": False, "w_gnce": 0.0}, preset=preset)
    model = NAPGNet(num_classes=6, backbone="resnet18")
    d1, d2 = FCDiscriminatorHighMask(6), FCDiscriminatorHighMask(6)
    ref_model, ref_d1, ref_d2 = copy.deepcopy(model), copy.deepcopy(d1), copy.deepcopy(d2)
    x_s, x_t = torch.rand(2, 3, 256, 256), torch.rand(2, 3, 256, 256)
    y_s = torch.randint(0, 6, (2, 256, 256))
    P = torch.randn(6, 128)

    napg = NAPG(model, d1, d2, cfg)
    logs = napg.train_step({"img": x_s, "label": y_s}, {"img": x_t}, RefreshResult(P, None), epoch=1)

    g_loss, dd1, dd2 = original_iteration(ref_model, ref_d1, ref_d2, x_s, y_s, x_t, P, legacy=preset == "legacy")
    assert logs["loss_total"].item() == pytest.approx(g_loss.item(), rel=1e-5)
    assert logs["loss_d1"].item() == pytest.approx(dd1.item(), rel=1e-5)
    assert logs["loss_d2"].item() == pytest.approx(dd2.item(), rel=1e-5)
    # Gradients left by the step equal the released code's gradients of each loss.
    pairs = ((model, ref_model, g_loss), (d1, ref_d1, dd1), (d2, ref_d2, dd2))
    for ours, ref, loss in pairs:
        params = [p for p in ref.parameters()]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for (name, p), g in zip(ours.named_parameters(), grads):
            if g is None:
                assert p.grad is None or not p.grad.any(), name
                continue
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-12, msg=name)


def test_legacy_and_paper_differ_only_where_the_flags_say():
    paper = resolve_config("step1", {}).to_dict()
    legacy = resolve_config("step1", {}, preset="legacy").to_dict()
    differing = {k for k in paper if paper[k] != legacy[k]}
    assert differing == {"preset", "legacy_d2_gen", "legacy_d2_step1", "proto_ignore_index", "refresh",
                         "legacy_geometry", "kd_normalize", "legacy_epoch_length", "kmeans_backend", "kmeans_n_init",
                         "bn_stats", "refresh_balance"}


def test_bf16_autocast_stays_close_to_float32():
    """A few step-2 iterations on CPU: bf16 autocast losses track the float32 ones (tolerance 5 %)."""
    losses = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        cfg = resolve_config("step2", {"backbone": "resnet18", "amp": amp})
        model = NAPGNet(num_classes=6, backbone="resnet18")
        napg = NAPG(model, FCDiscriminatorHighMask(6), FCDiscriminatorHighMask(6), cfg)
        gen = torch.Generator().manual_seed(1)
        P = torch.randn(24, 128, generator=gen).abs()
        per_step = []
        for _ in range(3):
            src = {"img": torch.rand(2, 3, 128, 128, generator=gen), "label": torch.randint(0, 6, (2, 128, 128),
                                                                                            generator=gen)}
            tgt = {"img": torch.rand(2, 3, 128, 128, generator=gen)}
            logs = napg.train_step(src, tgt, RefreshResult(P, None), epoch=1)
            per_step.append([logs[k].item() for k in ("loss_ce", "loss_proto", "loss_gnce_src", "loss_d1", "loss_d2")])
        losses[amp] = torch.tensor(per_step)
    assert torch.isfinite(losses["bf16"]).all()
    torch.testing.assert_close(losses["bf16"], losses["off"], rtol=0.05, atol=0.01)


def test_refresh_with_auto_k_follows_the_variance_rule():
    from models.labels import resize_labels
    from models.prototypes import auto_clusters, class_centroids

    torch.manual_seed(0)
    model = NAPGNet(backbone="resnet18").eval()
    batches = [{"img": torch.rand(2, 3, 64, 64), "label": torch.randint(0, 6, (2, 64, 64))} for _ in range(3)]
    result = refresh_prototypes(model, batches, None, None, RefreshSpec((1,) * 6, auto_k=(2, 0.5)), torch.device("cpu"))
    pools = [[] for _ in range(6)]
    with torch.no_grad():
        for batch in batches:
            feats = model(batch["img"])["features"]
            for c, rows in enumerate(class_centroids(feats, resize_labels(batch["label"], feats.shape[-2:]), 6)):
                pools[c].append(rows)
    expected = auto_clusters([torch.cat(p) for p in pools], k_min=1, k_max=2, threshold=0.5)
    assert result.clusters == expected and 2 in expected
    assert result.source_target.shape == (6 * 2, 128)


def test_legacy_epoch_is_one_batch_short_of_a_pass():
    from types import SimpleNamespace

    from engine.build import iters_per_epoch

    data = {"source": SimpleNamespace(batches_per_pass=5), "target": SimpleNamespace(batches_per_pass=3)}
    for stage, paper_n in (("step1", 5), ("step3", 3)):
        assert iters_per_epoch(resolve_config(stage, {}), data) == paper_n
        assert iters_per_epoch(resolve_config(stage, {}, preset="legacy"), data) == paper_n - 1
    assert iters_per_epoch(resolve_config("step1", {"iters_per_epoch": 2}, preset="legacy"), data) == 2
    with pytest.raises(UserError, match="--legacy-epoch-length false") as err:
        iters_per_epoch(resolve_config("step1", {}, preset="legacy"), {"source": SimpleNamespace(batches_per_pass=1)})
    assert "\n" not in str(err.value)


def test_each_stage_builds_the_method_its_table_entry_names():
    for name, stage in STAGES.items():
        cls = method_class(stage.method)
        assert issubclass(cls, Method) and cls.__module__ + "." + cls.__name__ == stage.method
        cfg = resolve_config(name, {"backbone": "resnet18"})
        method = build_method(cfg, torch.device("cpu"))
        assert type(method) is cls
        assert [d for d in ("d1", "d2") if getattr(method, d) is not None] == list(cls.discriminators)
    with pytest.raises(ValueError, match="not a Method class"):
        method_class("engine.methods.base.set_requires_grad")
