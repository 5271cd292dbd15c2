"""Classifier CE, prototype NLL, entropy/adversarial losses and feature distillation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses import (
    bce,
    classifier_ce,
    discriminator_losses,
    feature_kd_loss,
    generator_adv_losses,
    prototype_nll,
    self_information,
)
from tests.helpers import assert_close, load_fixture


def group_prob(cat: torch.Tensor, k: int) -> torch.Tensor:
    """q = max over each class's K prototypes of the joint softmax over C*K (as the training scripts)."""
    b, ck, h, w = cat.shape
    return cat.softmax(1).view(b, ck // k, k, h, w).max(2)[0]


# ----------------------------------------------------------------------------- CE and NLL
def test_classifier_ce_matches_original():
    fx = load_fixture("proto_nll.pt")
    logits = fx["outUp"].clone().requires_grad_()
    loss = classifier_ce(logits, fx["labels64"])
    loss.backward()
    assert_close(loss.detach(), fx["ce"])
    assert_close(logits.grad, fx["grad_outUp"])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_prototype_nll_matches_original(k):
    fx = load_fixture("proto_nll.pt")
    cat = fx[f"k{k}"]["cat"].clone().requires_grad_()
    loss = prototype_nll(group_prob(cat, k), fx["labels16"], ignore_index=None)
    loss.backward()
    assert_close(loss.detach(), fx[f"k{k}"]["nll"], rel=1e-6)
    assert_close(cat.grad, fx[f"k{k}"]["grad_cat"])


def test_prototype_nll_ignore_index():
    g = torch.Generator().manual_seed(0)
    prob = torch.randn(2, 6, 5, 5, generator=g).softmax(1)
    labels = torch.randint(0, 6, (2, 5, 5), generator=g)
    labels[0, :2] = 255
    valid = labels != 255
    picked = prob.gather(1, labels.clamp(max=5)[:, None])[:, 0]
    expected = -picked.log()[valid].mean()
    torch.testing.assert_close(prototype_nll(prob, labels), expected)
    # The legacy call (F.nll_loss's default ignore index) cannot take 255, like the original.
    with pytest.raises(IndexError):
        prototype_nll(prob, labels, ignore_index=None)


# ------------------------------------------------------------------- entropy and discriminator
class TinyD(nn.Module):
    """FCDiscriminatorHighMask written out in plain torch, with the original's state-dict names."""

    def __init__(self):
        super().__init__()
        layers, c = [], 6
        for out in (32, 64, 128, 256):
            layers += [nn.Conv2d(c, out, 3, 2, 1), nn.LeakyReLU(0.2)]
            c = out
        layers += [nn.Conv2d(256, 1, 1), nn.Upsample(scale_factor=16, mode="bilinear"), nn.Sigmoid()]
        self.FCDiscriminator = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.FCDiscriminator(x)


def fixture_discriminator() -> TinyD:
    d = TinyD()
    d.load_state_dict(load_fixture("entropy_disc.pt")["D_state_dict"])
    return d


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 2) -> None:
    """float32 values equal up to ``ulps`` units in the last place. torch.log2's vector kernel is not the same
    on every CPU: bit-exact on the machine the fixtures were made on, 1-2 ulp off in a few values elsewhere."""
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    distance = (actual.view(torch.int32).long() - expected.view(torch.int32).long()).abs()
    assert distance.max() <= ulps, f"{int((distance > ulps).sum())} values more than {ulps} ulp apart"


def test_self_information_matches_the_original():
    fx = load_fixture("entropy_disc.pt")
    assert_within_ulps(self_information(fx["P32"]), fx["E32"])


def test_self_information_formula_and_saturation():
    prob = torch.tensor([1.0, 0.0, 0.25, 0.75]).view(1, 4, 1, 1)
    expected = -prob * torch.log2(prob + 1e-30) / torch.log2(torch.tensor(4.0))
    torch.testing.assert_close(self_information(prob), expected)
    assert self_information(prob)[0, :2].abs().sum() == 0  # p = 1 and p = 0 carry no information


@pytest.mark.parametrize("label", [0, 1])
def test_entropy_discriminator_bce_32(label):
    fx = load_fixture("entropy_disc.pt")
    d = fixture_discriminator()
    prob = fx["P32"].clone().requires_grad_()
    ent = self_information(prob)
    ent.retain_grad()
    out = d(ent)
    assert_close(out.detach(), fx["out32"])
    loss = bce(out, float(label))
    loss.backward()
    assert_close(loss.detach(), fx[f"bce{label}_32"], rel=1e-6)
    grads = fx[f"grad{label}_32"]
    assert_close(ent.grad, grads["E"])
    assert_close(prob.grad, grads["P"])
    for name in ("0.weight", "0.bias", "8.weight", "8.bias"):
        assert_close(d.get_parameter(f"FCDiscriminator.{name}").grad, grads["D"][f"FCDiscriminator.{name}"])


@pytest.mark.parametrize("label", [0, 1])
def test_entropy_discriminator_bce_128(label):
    fx = load_fixture("entropy_disc.pt")
    fx128 = load_fixture("entropy_disc_128.pt")
    d = fixture_discriminator()
    ent = self_information(fx["P128"])
    assert_within_ulps(ent, fx128["E128"])
    ent.requires_grad_()
    out = d(ent)
    assert_close(out.detach(), fx128["out128"])
    loss = bce(out, float(label))
    loss.backward()
    assert_close(loss.detach(), fx128[f"bce{label}_128"], rel=1e-6)
    grads = fx128[f"grad{label}_128"]
    assert_close(ent.grad, grads["E"])
    for name in ("0.weight", "0.bias", "8.weight", "8.bias"):
        assert_close(d.get_parameter(f"FCDiscriminator.{name}").grad, grads["D"][f"FCDiscriminator.{name}"])


def test_bce_formula():
    p = torch.rand(2, 1, 4, 4) * 0.98 + 0.01
    torch.testing.assert_close(bce(p, 0.0), -(1 - p).log().mean())
    torch.testing.assert_close(bce(p, 1.0), -p.log().mean())


def test_bce_reads_nan_as_one_half_and_leaves_the_rest_bit_for_bit():
    p = (torch.rand(2, 1, 4, 4) * 0.98 + 0.01).requires_grad_(True)
    assert torch.equal(bce(p, 1.0), F.binary_cross_entropy(p, torch.ones_like(p)))
    bce(p, 1.0).backward()
    plain = p.detach().clone().requires_grad_(True)
    F.binary_cross_entropy(plain, torch.ones_like(plain)).backward()
    assert torch.equal(p.grad, plain.grad)
    with_nan = p.detach().clone()
    with_nan[0, 0, 0, 0] = float("nan")
    half = with_nan.clone()
    half[0, 0, 0, 0] = 0.5
    assert torch.equal(bce(with_nan, 0.0), bce(half, 0.0))


class ConvD(nn.Module):
    """A small random discriminator [B, 6, H, W] -> sigmoid [B, 1, H, W]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x).sigmoid()


def entropy_maps(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = {"s_cls": 16, "t_cls": 16, "s_proto": 8, "t_proto": 8}
    return {k: self_information(torch.randn(2, 6, n, n, generator=g).softmax(1)).requires_grad_()
            for k, n in sizes.items()}


def test_generator_adv_losses():
    torch.manual_seed(0)
    d1, d2 = ConvD(), ConvD()
    e = entropy_maps()
    l_d1, l_d2 = generator_adv_losses(d1, d2, e["t_cls"], e["s_proto"], e["t_proto"], legacy_d2_gen=False)
    bce0 = lambda out: F.binary_cross_entropy(out, torch.zeros_like(out))  # noqa: E731
    torch.testing.assert_close(l_d1, bce0(d1(e["t_cls"])))
    torch.testing.assert_close(l_d2, 0.5 * (bce0(d2(e["s_proto"])) + bce0(d2(e["t_proto"]))))
    (l_d1 + l_d2).backward()
    assert all(e[k].grad is not None and e[k].grad.abs().sum() > 0 for k in ("t_cls", "s_proto", "t_proto"))

    _, l_legacy = generator_adv_losses(d1, d2, e["t_cls"], e["s_proto"], e["t_proto"], legacy_d2_gen=True)
    s_term = bce0(d2(e["s_proto"]))
    assert torch.equal(l_legacy, 0.5 * (s_term + s_term))  # the released code's duplicated source term


@pytest.mark.parametrize("legacy", [False, True])
def test_discriminator_losses(legacy):
    torch.manual_seed(0)
    d1, d2 = ConvD(), ConvD()
    e = entropy_maps(1)
    l_D1, l_D2, means = discriminator_losses(d1, d2, e["s_cls"], e["t_cls"], e["s_proto"], e["t_proto"],
                                             legacy_d2_step1=legacy)

    def b(out, y):
        return F.binary_cross_entropy(out, torch.full_like(out, y))

    torch.testing.assert_close(l_D1, b(d1(e["s_cls"]), 0.0) + b(d1(e["t_cls"]), 1.0))
    second = e["s_proto"] if legacy else e["t_proto"]
    expected_d2 = b(d2(e["s_cls"]), 0.0) + 0.5 * (b(d2(e["s_proto"]), 1.0) + b(d2(second), 1.0))
    torch.testing.assert_close(l_D2, expected_d2)
    # The monitoring means come from the same calls: each equals a fresh call's mean.
    calls = {"d1_source": (d1, "s_cls"), "d1_target": (d1, "t_cls"), "d2_source": (d2, "s_cls"),
             "d2_source_proto": (d2, "s_proto"), "d2_target_proto": (d2, "t_proto")}
    if legacy:
        del calls["d2_target_proto"]
    assert set(means) == set(calls)
    for name, (d, key) in calls.items():
        torch.testing.assert_close(means[name], d(e[key]).mean(), msg=name)
    (l_D1 + l_D2).backward()
    assert all(v.grad is None for v in e.values())  # the maps are detached for the D update
    assert d1.conv.weight.grad is not None and d2.conv.weight.grad is not None


# --------------------------------------------------------------------------- distillation
def kd_direct(fs, ft, T):
    """KL(p_t || p_s) * T^2 per pixel, written out: [B, h, w]."""
    p_t = (ft / T).softmax(1)
    return T**2 * (p_t * (p_t.log() - (fs / T).log_softmax(1))).sum(1)


def test_feature_kd_loss_formula_and_masks():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 8, 5, 5, generator=g)
    ft = torch.randn(2, 8, 5, 5, generator=g)
    valid = torch.rand(2, 5, 5, generator=g) > 0.4
    per_pixel = kd_direct(fs, ft, 2.0)
    torch.testing.assert_close(feature_kd_loss(fs, ft, valid, T=2.0, normalize="valid"),
                               per_pixel[valid].sum() / (valid.sum() * 8))
    torch.testing.assert_close(feature_kd_loss(fs, ft, valid, T=2.0, normalize="all"),
                               (per_pixel * valid).sum() / fs.numel())
    everything = torch.ones_like(valid)
    torch.testing.assert_close(feature_kd_loss(fs, ft, everything, normalize="valid"),
                               feature_kd_loss(fs, ft, everything, normalize="all"))
    assert feature_kd_loss(fs, ft, torch.zeros_like(valid)) == 0


def test_feature_kd_loss_zero_when_identical_and_teacher_detached():
    fs = torch.randn(1, 4, 3, 3, requires_grad=True)
    ft = fs.detach().clone().requires_grad_()
    loss = feature_kd_loss(fs, ft, torch.ones(1, 3, 3, dtype=torch.bool))
    assert abs(loss.item()) < 1e-6
    other = torch.randn(1, 4, 3, 3)
    loss = feature_kd_loss(fs, other.requires_grad_(), torch.ones(1, 3, 3, dtype=torch.bool))
    loss.backward()
    assert other.grad is None and fs.grad.abs().sum() > 0


def test_feature_kd_loss_rejects_bad_arguments():
    fs = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="normalize"):
        feature_kd_loss(fs, fs, torch.ones(1, 3, 3, dtype=torch.bool), normalize="sum")
    with pytest.raises(ValueError, match="shapes"):
        feature_kd_loss(fs, fs, torch.ones(1, 4, 4, dtype=torch.bool))
