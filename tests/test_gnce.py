"""GNCE neighbourhood loss: parity with the original (gnce.pt) and fast vs reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses import gnce_loss, gnce_loss_reference
from tests.helpers import assert_close, load_fixture

IMPLS = [gnce_loss_reference, gnce_loss]
CASES = [("w111111", [1, 1, 1, 1, 1, 1], False), ("w222210", [2, 2, 2, 2, 1, 0], False),
         ("w222210_mask", [2, 2, 2, 2, 1, 0], True)]


def run(fn, sim, feats, windows, mask=None):
    """Value and gradients of one implementation on fresh leaf copies."""
    s = sim.clone().requires_grad_()
    f = feats.clone().requires_grad_()
    value = fn(s, f, windows, mask)
    value.backward()
    return value.detach(), s.grad, f.grad


@pytest.mark.parametrize("fn", IMPLS, ids=["reference", "fast"])
@pytest.mark.parametrize("key,windows,masked", CASES, ids=[c[0] for c in CASES])
def test_gnce_matches_original(fn, key, windows, masked):
    fx = load_fixture("gnce.pt")
    value, grad_s, grad_f = run(fn, fx["S"], fx["F"], windows, fx["mask"] if masked else None)
    ref = fx[key]
    assert value.shape == ()
    assert_close(value, ref["value"][0])
    assert_close(grad_s, ref["grad_S"])
    assert_close(grad_f, ref["grad_F"])


def test_gnce_ties_get_no_similarity_gradient():
    fx = load_fixture("gnce.pt")
    _, grad_s, _ = run(gnce_loss, fx["S"], fx["F"], [1, 1, 1, 1, 1, 1])
    # Sample 0, channel 4 is flat (-0.5 everywhere): every |dS| is an exact tie, whose derivative is 0.
    assert torch.equal(fx["S"][0, 4], torch.full_like(fx["S"][0, 4], -0.5))
    assert grad_s[0, 4].abs().max() == 0
    assert fx["w111111"]["grad_S"][0, 4].abs().max() == 0


def random_inputs(seed: int, b: int = 2, c: int = 6, d: int = 8, h: int = 7, w: int = 9):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(b, c, h, w, generator=g)
    sim[:, 1:2] = sim[:, 1:2].round()  # ties (channel 1 when there is one)
    feats = F.relu(torch.randn(b, d, h, w, generator=g)) + 0.01
    mask = (torch.rand(b, 1, h, w, generator=g) > 0.3).float()
    return sim, feats, mask


@pytest.mark.parametrize("windows", [[1, 1, 1, 1, 1, 1], [3, 0, 2, 1, 0, 4], [0, 0, 0, 0, 0, 9]])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_matches_reference(windows, masked):
    sim, feats, mask = random_inputs(sum(windows))
    m = mask if masked else None
    ref = run(gnce_loss_reference, sim, feats, windows, m)
    fast = run(gnce_loss, sim, feats, windows, m)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()) + 1e-12)


def test_window_beyond_the_map_contributes_nothing():
    sim, feats, _ = random_inputs(0, h=4, w=4)
    value, grad_s, grad_f = run(gnce_loss, sim, feats, [0, 0, 0, 0, 0, 9])
    assert value == 0 and grad_s.abs().max() == 0 and grad_f.abs().max() == 0


def test_plain_formula_on_a_single_class():
    """One class, window 1: the mean over [B, 4, H, W] of (1 - cos) / (1 + |dS|), borders 0."""
    sim, feats, _ = random_inputs(3, c=1)
    b, _, h, w = sim.shape
    total = 0.0
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    y, x = i + dy, j + dx
                    if 0 <= y < h and 0 <= x < w:
                        cos = F.cosine_similarity(feats[bi, :, i, j], feats[bi, :, y, x], dim=0)
                        total += float((1 - cos) / (1 + (sim[bi, 0, y, x] - sim[bi, 0, i, j]).abs()))
    torch.testing.assert_close(gnce_loss(sim, feats, [1]).item(), total / (b * 4 * h * w))


def test_mask_shapes_and_uniform_features():
    sim, feats, mask = random_inputs(5)
    windows = [2, 2, 2, 2, 1, 0]
    torch.testing.assert_close(gnce_loss(sim, feats, windows, mask), gnce_loss(sim, feats, windows, mask[:, 0]))
    same_direction = feats[:, :, :1, :1].expand_as(feats) * torch.rand(1, 1, 7, 9)  # cos = 1 everywhere
    assert gnce_loss(sim, same_direction, windows).abs() < 1e-6


def test_invalid_windows():
    sim, feats, _ = random_inputs(0)
    with pytest.raises(ValueError, match="one window per class"):
        gnce_loss(sim, feats, [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        gnce_loss(sim, feats, [0] * 6)
