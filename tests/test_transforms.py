"""Weak/strong views and warp_to_strong, checked against plain references (slicing, F.interpolate,
and the augmentation's own output: warping the image itself must reproduce the strong view)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from data.transforms import (
    GEOMETRIC_OPS,
    GRAY,
    PHOTOMETRIC_OPS,
    Resize,
    WeakAugment,
    WeakStrongAugment,
    warp_to_strong,
    weak_view,
)

SIZE = 48


def smooth_image(size: int = SIZE) -> torch.Tensor:
    """Low-frequency [3, H, W] image in [0, 1] (bilinear resampling error stays small)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack(
        [0.5 + 0.4 * torch.sin(2.1 * x + 1.3 * y), 0.5 + 0.4 * torch.cos(1.7 * y - 0.6 * x), 0.3 + 0.5 * x * y]
    )


def sample(size: int = SIZE) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "img": torch.rand(3, size, size, generator=g),
        "label": torch.randint(0, 6, (size, size), generator=g),
        "name": "x",
    }


def augment(aug: WeakStrongAugment, s: dict) -> dict:
    """``aug(s)`` plus the label seen through both views (255 outside the crop and in the cutout), the
    reference the geometry tests compare the image path and :func:`warp_to_strong` against."""
    out = aug(s)
    out["label_weak"] = weak_view(s["label"], out["weak_params"], "nearest", 255)
    out["label_strong"] = aug._strong_view(out["label_weak"], out["strong_params"], "nearest", 255)
    return out


def cutout_mask(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Reference: pixels whose centre lies in the normalised box [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = ((v.item() + 1) / 2 for v in box)
    cols = (torch.arange(w) + 0.5) / w
    rows = (torch.arange(h) + 0.5) / h
    return ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]


def test_weak_unscaled_is_an_exact_crop_and_flip():
    torch.manual_seed(0)
    s = sample()
    aug = WeakAugment(32, scale_range=(1.0, 1.0), hflip=0.5)
    flips = set()
    for _ in range(8):
        out = aug(s)
        top, left, ch, cw = out["weak_params"]["crop_box"].tolist()
        flip = bool(out["weak_params"]["flip"])
        flips.add(flip)
        ref_img = s["img"][:, top : top + ch, left : left + cw]
        ref_lab = s["label"][top : top + ch, left : left + cw]
        if flip:
            ref_img, ref_lab = ref_img.flip(-1), ref_lab.flip(-1)
        assert torch.equal(out["img"], ref_img) and torch.equal(out["label"], ref_lab)
        assert out["label"].dtype == torch.int64
    assert flips == {True, False}


def test_weak_scaled_matches_interpolate_then_crop():
    torch.manual_seed(1)
    s = sample()
    aug = WeakAugment(40, scale_range=(1.2, 2.0))
    for _ in range(4):
        out = aug(s)
        p = out["weak_params"]
        sh, sw = p["scaled_size"].tolist()
        top, left, ch, cw = p["crop_box"].tolist()
        big = F.interpolate(s["img"][None], size=(sh, sw), mode="bilinear", align_corners=False)[0]
        ref = big[:, top : top + ch, left : left + cw]
        ref = ref.flip(-1) if bool(p["flip"]) else ref
        torch.testing.assert_close(out["img"], ref, atol=1e-5, rtol=0)


def test_weak_label_at_scale_two_matches_nearest_reference():
    torch.manual_seed(2)
    s = sample()
    out = WeakAugment(40, scale_range=(2.0, 2.0), hflip=0.0)(s)
    top, left, ch, cw = out["weak_params"]["crop_box"].tolist()
    big = F.interpolate(s["label"][None, None].float(), scale_factor=2, mode="nearest-exact")[0, 0].long()
    assert torch.equal(out["label"], big[top : top + ch, left : left + cw])


def test_weak_pads_when_scaled_tile_is_smaller_than_crop():
    torch.manual_seed(3)
    s = sample(32)
    out = WeakAugment(48, scale_range=(1.0, 1.0), hflip=0.0)(s)
    top, left, _, _ = out["weak_params"]["crop_box"].tolist()
    assert top <= 0 and left <= 0
    inside = torch.zeros(48, 48, dtype=torch.bool)
    inside[-top : -top + 32, -left : -left + 32] = True
    assert torch.equal(out["label"][inside].view(32, 32), s["label"])
    assert (out["label"][~inside] == 255).all() and (out["img"][:, ~inside] == 0).all()


def test_strong_view_keys_shapes_and_collate():
    torch.manual_seed(4)
    aug = WeakStrongAugment(32)
    batch = default_collate([augment(aug, sample()) for _ in range(3)])
    assert batch["img"].shape == (3, 3, SIZE, SIZE)
    assert batch["img_weak"].shape == batch["img_strong"].shape == (3, 3, 32, 32)
    assert batch["label_weak"].shape == batch["label_strong"].shape == (3, 32, 32)
    assert batch["strong_params"]["affine"].shape == (3, 2, 3)
    assert batch["strong_params"]["cutout"].shape == (3, 4)
    assert batch["weak_params"]["crop_box"].shape == (3, 4)
    assert batch["img_strong"].min() >= 0 and batch["img_strong"].max() <= 1
    assert torch.equal(batch["img"][0], sample()["img"])  # the full tile is passed through untouched
    for key in ("img_strong", "label_strong"):
        fill = GRAY if key == "img_strong" else 255
        for b in range(3):
            mask = cutout_mask(batch["strong_params"]["cutout"][b], 32, 32)
            side = int(32 / 3)
            assert 0 < mask.sum() <= side * side
            assert (batch[key][b][..., mask] == fill).all()


def test_same_seed_same_views():
    aug = WeakStrongAugment(32, pool=PHOTOMETRIC_OPS + GEOMETRIC_OPS, op_prob=1.0)
    torch.manual_seed(5)
    a = augment(aug, sample())
    torch.manual_seed(5)
    b = augment(aug, sample())
    assert torch.equal(a["img_strong"], b["img_strong"]) and torch.equal(a["label_strong"], b["label_strong"])


def test_photometric_ops_leave_geometry_alone():
    torch.manual_seed(6)
    aug = WeakStrongAugment(32, pool=PHOTOMETRIC_OPS[1:], op_prob=1.0, n_ops=3, strong_hflip=0.0, cutout_frac=0)
    changed = 0
    for _ in range(6):
        out = augment(aug, sample())
        assert torch.equal(out["strong_params"]["affine"], torch.eye(2, 3))
        assert torch.equal(out["label_strong"], out["label_weak"])
        assert 0 <= out["img_strong"].min() and out["img_strong"].max() <= 1
        changed += not torch.equal(out["img_strong"], out["img_weak"])
    assert changed == 6


def test_geometric_magnitudes_stay_within_limits():
    torch.manual_seed(7)
    for op, limit in (("rotate", 6.0), ("shear_x", 0.06), ("translate_x", 0.06)):
        aug = WeakStrongAugment(32, pool=(op,), n_ops=1, op_prob=1.0, magnitude=3, strong_hflip=0.0)
        for _ in range(10):
            a = aug.sample_strong(32, 32)[0]["affine"]
            if op == "rotate":
                value = math.degrees(math.atan2(a[1, 0].item(), a[0, 0].item()))
            elif op == "shear_x":
                value = a[0, 1].item()
            else:
                value = a[0, 2].item() / 2  # normalised offset 2f for a fraction f of the side
            assert 0 < abs(value) <= limit + 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_warp_exact_for_flip_and_crop(seed):
    """No scaling, no geometric ops: warping the full tile with nearest reproduces the strong view."""
    torch.manual_seed(seed)
    aug = WeakStrongAugment(32, scale_range=(1.0, 1.0), pool=(), strong_hflip=0.5)
    batch = default_collate([augment(aug, sample()) for _ in range(4)])
    wp, sp = batch["weak_params"], batch["strong_params"]
    img, valid = warp_to_strong(batch["img"], wp, sp, (32, 32), mode="nearest")
    lab, lab_valid = warp_to_strong(batch["label"][:, None], wp, sp, (32, 32), mode="nearest", fill=255)
    assert torch.equal(valid, lab_valid)
    for b in range(4):
        assert torch.equal(valid[b], ~cutout_mask(sp["cutout"][b], 32, 32))
    assert torch.equal(img.permute(0, 2, 3, 1)[valid], batch["img_strong"].permute(0, 2, 3, 1)[valid])
    assert torch.equal(lab[:, 0], batch["label_strong"])
    assert lab.dtype == torch.int64
    weak, weak_valid = warp_to_strong(batch["img_weak"], wp, sp, (32, 32), source="weak", mode="nearest")
    assert torch.equal(weak_valid, valid) and torch.equal(weak, img)


@pytest.mark.parametrize(("seed", "crop"), [(0, (40, 40)), (1, (40, 40)), (2, (40, 24))])
def test_warp_full_tile_reproduces_geometric_strong_view(seed, crop):
    torch.manual_seed(seed)
    aug = WeakStrongAugment(crop, scale_range=(1.0, 1.6), pool=GEOMETRIC_OPS, op_prob=1.0, n_ops=3)
    s = {"img": smooth_image(), "label": torch.zeros(SIZE, SIZE, dtype=torch.long)}
    batch = default_collate([augment(aug, s) for _ in range(4)])
    wp, sp = batch["weak_params"], batch["strong_params"]
    assert not torch.equal(sp["affine"][:, :, :2].abs(), torch.eye(2).expand(4, 2, 2))
    warped, valid = warp_to_strong(batch["img"], wp, sp, crop)
    err = (warped - batch["img_strong"]).abs().amax(1)
    assert valid.float().mean() > 0.6
    assert err[valid].max() < 0.02  # two bilinear resamplings versus one
    # Outside the valid mask the strong view is gray fill (off-crop or cutout), the warp holds `fill`.
    assert (warped.permute(0, 2, 3, 1)[~valid] == 0).all()
    off = ~valid & (batch["label_strong"] == 255)
    assert torch.equal(off, ~valid)
    # From the weak view the strong image is one resampling with the same grid: equal up to rounding.
    from_weak, weak_valid = warp_to_strong(batch["img_weak"], wp, sp, crop, source="weak")
    assert torch.equal(weak_valid, valid)
    torch.testing.assert_close(from_weak * valid[:, None], batch["img_strong"] * valid[:, None], atol=1e-5, rtol=0)


def test_rotation_of_a_non_square_view_is_rigid_in_pixels():
    torch.manual_seed(9)
    aug = WeakStrongAugment((40, 24), pool=("rotate",), n_ops=1, op_prob=1.0, strong_hflip=0.0)
    lin = aug.sample_strong(40, 24)[0]["affine"][:, :2].double()
    d = torch.diag(torch.tensor([12.0, 20.0], dtype=torch.float64))  # half width, half height
    pixel = d @ lin @ torch.linalg.inv(d)
    assert not torch.allclose(pixel, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(pixel @ pixel.T, torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_warp_does_not_depend_on_map_resolution():
    torch.manual_seed(8)
    aug = WeakStrongAugment(40, scale_range=(1.0, 1.5), pool=GEOMETRIC_OPS, op_prob=1.0)
    s = {"img": smooth_image()}
    batch = default_collate([aug(s) for _ in range(2)])
    wp, sp = batch["weak_params"], batch["strong_params"]
    fine, valid = warp_to_strong(batch["img"], wp, sp, (10, 10))
    coarse, coarse_valid = warp_to_strong(F.avg_pool2d(batch["img"], 4), wp, sp, (10, 10))
    assert torch.equal(valid, coarse_valid)
    assert (fine - coarse).abs().amax(1)[valid].max() < 0.03


def _translation_batch(shift_px: int, size: int) -> tuple[dict, dict]:
    """Identity weak view, strong view = translation by ``shift_px`` pixels (x), cutout of pixels 8..16."""
    t = 2 * shift_px / size
    weak = {
        "scale": torch.ones(1),
        "scaled_size": torch.tensor([[size, size]]),
        "crop_box": torch.tensor([[0, 0, size, size]]),
        "flip": torch.tensor([False]),
    }
    box = torch.tensor([[2 * 8 / size - 1, -1.0, 2 * 16 / size - 1, 1.0]])
    strong = {
        "affine": torch.tensor([[[1.0, 0.0, t], [0.0, 1.0, 0.0]]]),
        "translate": torch.tensor([[t, 0.0]]),
        "cutout": box,
        "flip": torch.tensor([False]),
    }
    return weak, strong


def test_legacy_geometry_scale_applies_pixel_units_to_the_small_map():
    # Params in 48-px units: shift 4 px, cutout columns 8..16. On a 12-px map (4x smaller) the correct
    # warp shifts by 1 px and cuts columns 2..4; the released code (scale 1) shifts by 4 px and cuts 8..16.
    weak, strong = _translation_batch(4, 48)
    small = torch.arange(12.0).expand(1, 1, 12, 12).contiguous()

    def warp(scale):
        return warp_to_strong(small, weak, strong, (12, 12), mode="nearest", fill=-1, legacy_geometry_scale=scale)

    cols = torch.arange(12.0)
    for scale, shift, cut in ((None, 1, (2, 4)), (4.0, 1, (2, 4)), (2.0, 2, (4, 8)), (1.0, 4, (8, 12))):
        ref = torch.where((cols + shift <= 11) & ((cols < cut[0]) | (cols >= cut[1])), cols + shift, -1.0)
        warped, valid = warp(scale)
        assert torch.equal(warped[0, 0, 0], ref) and torch.equal(valid[0, 0], ref >= 0)


def test_warp_rejects_unknown_source():
    weak, strong = _translation_batch(0, 8)
    with pytest.raises(ValueError, match="source"):
        warp_to_strong(torch.zeros(1, 1, 8, 8), weak, strong, (8, 8), source="strong")


def test_resize_matches_plain_references():
    x = torch.linspace(0, 1, 32)
    s = {"img": x.expand(3, 32, 32).contiguous(), "label": torch.randint(0, 6, (32, 32)), "name": "a"}
    out = Resize(16)(s)
    assert out["img"].shape == (3, 16, 16) and out["label"].dtype == torch.int64 and out["name"] == "a"
    assert torch.equal(out["label"], s["label"][::2, ::2])  # nearest at factor 2 picks even pixels
    # A linear ramp stays the ramp sampled at the output pixel centres (symmetric filter), away from borders.
    centres = (torch.arange(16) * 2 + 0.5) / 31
    torch.testing.assert_close(out["img"][:, :, 1:-1], centres[1:-1].expand(3, 16, 14), atol=1e-5, rtol=0)
