"""FCDiscriminatorHighMask: parity with the original (fixtures) and the fixed-scale upsampling it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import FCDiscriminatorHighMask
from tests.helpers import assert_close, load_fixture


@pytest.fixture(scope="module")
def fixture_files() -> dict[int, dict]:
    return {32: load_fixture("entropy_disc.pt"), 128: load_fixture("entropy_disc_128.pt")}


@pytest.mark.parametrize("size", [32, 128])
def test_discriminator_matches_original_fixture(fixture_files: dict[int, dict], size: int) -> None:
    fx = fixture_files[size]
    d = FCDiscriminatorHighMask(num_classes=6)
    d.load_state_dict(fixture_files[32]["D_state_dict"])  # original key names load as they are
    d.train()
    assert_close(d(fx[f"E{size}"]), fx[f"out{size}"], f"out{size}")
    for label in (0, 1):
        d.zero_grad(set_to_none=True)
        e = fx[f"E{size}"].clone().requires_grad_(True)
        out = d(e)
        bce = F.binary_cross_entropy(out, torch.full_like(out, float(label)))
        bce.backward()
        assert_close(bce, fx[f"bce{label}_{size}"], f"bce{label}")
        grads = fx[f"grad{label}_{size}"]
        assert_close(e.grad, grads["E"], f"grad{label} E")
        params = dict(d.named_parameters())
        assert set(grads["D"]) == {"FCDiscriminator.0.weight", "FCDiscriminator.0.bias",
                                   "FCDiscriminator.8.weight", "FCDiscriminator.8.bias"}
        for name, grad in grads["D"].items():
            assert_close(params[name].grad, grad, f"grad{label} {name}")


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (128, 128), (48, 80)])
def test_resize_to_input_equals_fixed_scale_upsample(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    d = FCDiscriminatorHighMask(num_classes=6)
    x = torch.rand(2, 6, *size)
    # the original: a fixed nn.Upsample(scale_factor=16) after the conv stack, then a sigmoid
    original = torch.sigmoid(nn.Upsample(scale_factor=16, mode="bilinear")(d.FCDiscriminator(x)))
    out = d(x)
    assert out.shape == (2, 1, *size)
    assert_close(out, original, "D(x)", rel=1e-6)


def test_logits_are_the_pre_sigmoid_output() -> None:
    torch.manual_seed(1)
    d = FCDiscriminatorHighMask(num_classes=6)
    x = torch.rand(2, 6, 64, 32)
    logits = d.logits(x)
    assert_close(torch.sigmoid(logits), d(x), "sigmoid(logits)")
    target = torch.ones_like(logits)
    assert_close(F.binary_cross_entropy_with_logits(logits, target),
                 F.binary_cross_entropy(d(x), target), "BCE")


def test_any_input_side_gives_an_output_of_the_input_size() -> None:
    torch.manual_seed(2)
    d = FCDiscriminatorHighMask()
    x = torch.rand(1, 6, 40, 12)
    low = d.FCDiscriminator(x)  # 40 x 12 -> ceil(40/16) x ceil(12/16) = 3 x 1
    assert low.shape[-2:] == (3, 1)
    expected = torch.sigmoid(F.interpolate(low, size=(40, 12), mode="bilinear", align_corners=False))
    assert_close(d(x), expected, "resized output")
