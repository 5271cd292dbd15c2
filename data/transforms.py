"""Sample transforms: a plain resize, the weak and strong views of the teacher-student stage, and the
warp of maps between the views' frames.

All geometry lives in normalised coordinates ``[-1, 1]`` with ``align_corners=False`` (pixel i of n
has its centre at ``(2i + 1) / n - 1``), so the same parameters apply to a 512-px image and to a
32-px feature map of it. Randomness comes from torch's global RNG, which DataLoader seeds per worker.

Frames: *full* (the loaded tile), *weak* (random scale of the tile, crop, h-flip) and *strong*
(the weak crop after RandAugment-style ops: photometric ops, one affine warp, a gray cutout).
Affines are 2x3 matrices ``theta`` that map output coordinates to input coordinates
(``F.affine_grid`` convention): ``p_in = theta[:, :2] @ p_out + theta[:, 2]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from data.domains import IGNORE_INDEX
from data.preprocess import unit_float
from utils.errors import UserError

# The released code re-warped the teacher's 128-px map (1/4 of the 512-px view); see warp_to_strong.
LEGACY_MAP_STRIDE = 4
GRAY = 0.5  # fill of the strong view (FixMatch's 127/255), before any mean/std normalisation
PHOTOMETRIC_OPS = (
    "identity", "autocontrast", "equalize", "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
)  # fmt: skip
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
POOL = PHOTOMETRIC_OPS + GEOMETRIC_OPS
# FixMatch's maxima (reached at v = 10); an op runs at v/10 of its maximum. With magnitude 3, v <= 2:
# rotate <= 6 deg, shear <= 0.06, translate <= 6 % of the side, enhance factors 1 +- 0.18.
_MAX = {"rotate": 30.0, "shear": 0.3, "translate": 0.3, "enhance": 0.9}


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi)."""
    return int(torch.randint(lo, hi, ()).item())


def _coin(p: float) -> bool:
    return p > 0 and torch.rand(()).item() < p


def _pixel_grid(height: int, width: int, batch: int, device: torch.device | None = None) -> Tensor:
    """Normalised pixel-centre coordinates ``[B, H, W, 2]`` (x, y)."""
    ys = (2 * torch.arange(height, device=device, dtype=torch.float32) + 1) / height - 1
    xs = (2 * torch.arange(width, device=device, dtype=torch.float32) + 1) / width - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    return grid.expand(batch, height, width, 2)


def _apply_affine(grid: Tensor, theta: Tensor) -> Tensor:
    """Map points ``[B, H, W, 2]`` through affines ``[B, 2, 3]``."""
    return torch.einsum("bhwj,bij->bhwi", grid, theta[:, :, :2]) + theta[:, None, None, :, 2]


def _inside(grid: Tensor) -> Tensor:
    return (grid.abs() <= 1).all(dim=-1)


def _sample(maps: Tensor, grid: Tensor, valid: Tensor, mode: str, fill: float) -> Tensor:
    """``grid_sample`` in float32 that returns the input dtype and writes ``fill`` where not ``valid``."""
    # Border padding: a point just inside the edge takes the edge value instead of a blend with zeros;
    # points outside are overwritten through ``valid`` anyway.
    out = F.grid_sample(maps.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    out = torch.where(valid[:, None], out, torch.full((), fill, dtype=out.dtype, device=out.device))
    return out.to(maps.dtype)


def weak_to_full(weak_params: dict[str, Tensor]) -> Tensor:
    """Affines ``[B, 2, 3]`` from the weak view's coordinates to the full tile's (batched params)."""
    top, left, ch, cw = weak_params["crop_box"].double().unbind(-1)
    sh, sw = weak_params["scaled_size"].double().unbind(-1)
    sign = 1.0 - 2.0 * weak_params["flip"].double()
    zero = torch.zeros_like(top)
    theta = torch.stack(
        [
            torch.stack([sign * cw / sw, zero, (2 * left + cw) / sw - 1], dim=-1),
            torch.stack([zero, ch / sh, (2 * top + ch) / sh - 1], dim=-1),
        ],
        dim=-2,
    )
    return theta.float()


def _compose(outer: Tensor, inner: Tensor) -> Tensor:
    """The affine ``outer(inner(p))`` for batched ``[B, 2, 3]`` matrices."""
    lin = outer[:, :, :2] @ inner[:, :, :2]
    off = (outer[:, :, :2] @ inner[:, :, 2:])[..., 0] + outer[:, :, 2]
    return torch.cat([lin, off[..., None]], dim=-1)


def _batch(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v[None] for k, v in params.items()}


def _resample_one(x: Tensor, theta: Tensor, size: tuple[int, int], mode: str, fill: float) -> Tensor:
    """Resample one map ``[C, H, W]`` or ``[H, W]`` through ``theta`` ``[1, 2, 3]`` to ``size``."""
    maps = x[None] if x.dim() == 3 else x[None, None]
    grid = _apply_affine(_pixel_grid(*size, batch=1, device=x.device), theta)
    out = _sample(maps, grid, _inside(grid), mode, fill)[0]
    return out if x.dim() == 3 else out[0]


def weak_view(x: Tensor, params: dict[str, Tensor], mode: str, fill: float) -> Tensor:
    """The weak view of a full tile ``[C, H, W]`` (image) or ``[H, W]`` (label) for one sample's params."""
    top, left, ch, cw = (int(v) for v in params["crop_box"])
    height, width = x.shape[-2:]
    sh, sw = (int(v) for v in params["scaled_size"])
    if (sh, sw) == (height, width) and 0 <= top <= height - ch and 0 <= left <= width - cw:
        # Unscaled crop: exact slicing, no interpolation.
        out = x[..., top : top + ch, left : left + cw]
        return out.flip(-1) if bool(params["flip"]) else out.clone()
    x = unit_float(x)  # a uint8 image (data.dataset's uint8 samples) resamples as the float path does
    theta = weak_to_full(_batch(params))
    return _resample_one(x, theta, (ch, cw), mode, fill)


def _strong_linear(flip: bool, angle: float, shear: tuple[float, float], size: tuple[int, int]) -> Tensor:
    """Linear part ``[2, 2]`` of the strong geometry in normalised coordinates.

    In pixel units about the centre the ops are applied as h-flip, rotate, shear x, shear y (the
    first-applied op is outermost in the strong->weak map); the normalised form is ``D^-1 L D`` with
    ``D = diag(W/2, H/2)``, so non-square crops rotate without distortion.
    """
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    lin = torch.tensor([[-1.0 if flip else 1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    lin = lin @ torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    lin = lin @ torch.tensor([[1.0, shear[0]], [0.0, 1.0]], dtype=torch.float64)
    lin = lin @ torch.tensor([[1.0, 0.0], [shear[1], 1.0]], dtype=torch.float64)
    d = torch.tensor([size[1] / 2, size[0] / 2], dtype=torch.float64)
    return (lin * d[None, :] / d[:, None]).float()


def _photometric(img: Tensor, op: str, v: float, sign: int) -> Tensor:
    """One photometric op on an image ``[3, H, W]`` in [0, 1]; ``v`` is the magnitude in tenths."""
    factor = 1.0 + sign * _MAX["enhance"] * v
    if op == "brightness":
        return TF.adjust_brightness(img, factor)
    if op == "color":
        return TF.adjust_saturation(img, factor)
    if op == "contrast":
        return TF.adjust_contrast(img, factor)
    if op == "sharpness":
        return TF.adjust_sharpness(img, factor)
    if op == "posterize":
        return TF.posterize(img, 8 - math.ceil(4 * v))
    if op == "solarize":
        return TF.solarize(img, 1.0 - v)
    if op == "equalize":
        return TF.equalize(img)
    if op == "autocontrast":
        return TF.autocontrast(img)
    return img


class Resize:
    """Resize ``img`` (bilinear, antialiased) and ``label`` (nearest) of a sample to ``size``."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = dict(sample)
        img = sample["img"][None]
        out["img"] = F.interpolate(img, self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        if "label" in sample:
            label = sample["label"][None, None].float()
            out["label"] = F.interpolate(label, self.size, mode="nearest")[0, 0].to(sample["label"].dtype)
        return out


class WeakAugment:
    """Random scale of the tile side, random crop, h-flip; replaces ``img``/``label`` by the weak view.

    Adds ``weak_params``: ``scale`` (drawn factor), ``scaled_size`` [2] (h, w after scaling),
    ``crop_box`` [4] (top, left, height, width in the scaled tile; negative offsets when the scaled
    tile is smaller than the crop, the rest is padded with 0 / ignore), ``flip``. Images are resampled
    bilinearly, labels with nearest.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        scale_range: tuple[float, float] = (1.0, 2.0),
        hflip: float = 0.5,
    ) -> None:
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.scale_range = scale_range
        self.hflip = hflip

    def sample_params(self, height: int, width: int) -> dict[str, Tensor]:
        """Draw the weak geometry for a ``height x width`` tile."""
        scale = _uniform(*self.scale_range)
        sh, sw = max(1, round(height * scale)), max(1, round(width * scale))
        ch, cw = self.crop
        top = _randint(min(0, sh - ch), max(0, sh - ch) + 1)
        left = _randint(min(0, sw - cw), max(0, sw - cw) + 1)
        return {
            "scale": torch.tensor(scale, dtype=torch.float32),
            "scaled_size": torch.tensor([sh, sw]),
            "crop_box": torch.tensor([top, left, ch, cw]),
            "flip": torch.tensor(_coin(self.hflip)),
        }

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        params = self.sample_params(*sample["img"].shape[-2:])
        out = dict(sample)
        out["img"] = weak_view(sample["img"], params, "bilinear", 0.0)
        if "label" in sample:
            out["label"] = weak_view(sample["label"], params, "nearest", IGNORE_INDEX)
        out["weak_params"] = params
        return out


class WeakStrongAugment:
    """Weak view plus a strong view of the same crop (FixMatch-style RandAugment + cutout).

    Keeps ``img`` (the full tile) and adds ``img_weak``, ``img_strong``, ``weak_params`` and
    ``strong_params``: ``affine`` [2, 3] (strong -> weak, normalised), ``translate`` [2] (the
    translation part, normalised strong-frame units), ``cutout`` [4] (x0, y0, x1, y1 normalised; an
    empty box when off), ``flip``.

    Strong ops: h-flip with ``strong_hflip``; ``n_ops`` draws (with replacement) from ``pool``, each
    applied with ``op_prob`` at magnitude ``v = randint(1, magnitude) / 10`` of its maximum and a
    random sign (FixMatch's RandAugmentMC(n, m); its enhance map ``0.05 + 0.9 v`` only darkens, here
    factors are ``1 +- 0.9 v``). Photometric ops run in the drawn order; the geometric ones are summed
    per kind and applied as one warp (flip, rotate, shear, translate) so the strong geometry is a
    single affine; then a gray square of side ``min(H, W) * cutout_frac``.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        scale_range: tuple[float, float] = (1.0, 2.0),
        hflip: float = 0.5,
        n_ops: int = 2,
        magnitude: int = 3,
        op_prob: float = 0.5,
        pool: Sequence[str] = POOL,
        strong_hflip: float = 0.5,
        cutout_frac: float = 1 / 3,
    ) -> None:
        unknown = sorted(set(pool) - set(POOL))
        if unknown:
            raise ValueError(f"unknown ops {unknown}; choose from {POOL}")
        if magnitude < 2:
            raise ValueError(f"magnitude must be >= 2 (v is drawn from 1..magnitude-1), got {magnitude}")
        self.weak = WeakAugment(crop_size, scale_range, hflip)
        self.n_ops, self.magnitude, self.op_prob = n_ops, magnitude, op_prob
        self.pool = tuple(pool)
        self.strong_hflip, self.cutout_frac = strong_hflip, cutout_frac

    def sample_strong(self, height: int, width: int) -> tuple[dict[str, Tensor], list[tuple[str, float, int]]]:
        """Draw the strong params for a ``height x width`` weak view, and the photometric ops to run."""
        flip = _coin(self.strong_hflip)
        geo = dict.fromkeys(GEOMETRIC_OPS, 0.0)
        photometric = []
        for _ in range(self.n_ops if self.pool else 0):
            op = self.pool[_randint(0, len(self.pool))]
            v = _randint(1, self.magnitude) / 10
            sign = 1 if _coin(0.5) else -1
            if not _coin(self.op_prob):
                continue
            if op in geo:
                geo[op] += sign * v * _MAX[op.split("_")[0]]
            else:
                photometric.append((op, v, sign))
        lin = _strong_linear(flip, geo["rotate"], (geo["shear_x"], geo["shear_y"]), (height, width))
        # A translation by a fraction f of the side is 2f in normalised units.
        translate = torch.tensor([2 * geo["translate_x"], 2 * geo["translate_y"]], dtype=torch.float32)
        affine = torch.cat([lin, (lin @ translate)[:, None]], dim=1)
        side = int(min(height, width) * self.cutout_frac)
        box = torch.zeros(4)
        if side > 0:
            cx, cy = _randint(0, width), _randint(0, height)
            x0, y0 = max(0, cx - side // 2), max(0, cy - side // 2)
            x1, y1 = min(width, x0 + side), min(height, y0 + side)
            box = torch.tensor([2 * x0 / width - 1, 2 * y0 / height - 1, 2 * x1 / width - 1, 2 * y1 / height - 1])
        params = {"affine": affine, "translate": translate, "cutout": box, "flip": torch.tensor(flip)}
        return params, photometric

    def _strong_view(self, x: Tensor, params: dict[str, Tensor], mode: str, fill: float) -> Tensor:
        if torch.equal(params["affine"], torch.eye(2, 3)):
            out = x.clone()
        elif torch.equal(params["affine"], torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])):
            out = x.flip(-1)
        else:
            out = _resample_one(x, params["affine"][None], tuple(x.shape[-2:]), mode, fill)
        height, width = x.shape[-2:]
        x0, y0, x1, y1 = params["cutout"].tolist()
        rows = slice(round((y0 + 1) * height / 2), round((y1 + 1) * height / 2))
        cols = slice(round((x0 + 1) * width / 2), round((x1 + 1) * width / 2))
        out[..., rows, cols] = fill
        return out

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        img = sample["img"]
        weak_params = self.weak.sample_params(*img.shape[-2:])
        img_weak = weak_view(img, weak_params, "bilinear", 0.0)
        strong_params, photometric = self.sample_strong(*img_weak.shape[-2:])
        img_strong = img_weak
        for op, v, sign in photometric:
            img_strong = _photometric(img_strong, op, v, sign)
        out = dict(sample)
        out["img_weak"] = img_weak
        out["img_strong"] = self._strong_view(img_strong, strong_params, "bilinear", GRAY)
        out["weak_params"] = weak_params
        out["strong_params"] = strong_params
        return out


def warp_to_strong(
    maps: Tensor,
    weak_params: dict[str, Tensor],
    strong_params: dict[str, Tensor],
    out_size: tuple[int, int],
    source: str = "full",
    mode: str = "bilinear",
    fill: float = 0.0,
    legacy_geometry_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Warp maps ``[B, C, h, w]`` of the full tile (``source="full"``) or of the weak view
    (``source="weak"``) into the strong view's frame at ``out_size``.

    Params are the batched (collated) ``weak_params``/``strong_params``. ``mode`` is ``bilinear``
    (features, probabilities) or ``nearest`` (label maps, any integer dtype, e.g. ``label[:, None]``).
    Returns ``(warped [B, C, H', W'], valid [B, H', W'] bool)``; ``valid`` is False where the point
    falls outside the weak crop or the full tile, or inside the cutout, and ``warped`` holds ``fill``
    there. Being in normalised coordinates, the result does not depend on the map resolution.

    ``legacy_geometry_scale`` reproduces the released code (ProDA's re-warping helpers), which
    applied the strong translation and cutout, given in pixels of the 512-px view, to a 128-px map
    after dividing them by this ``scale``: 4 is right, the code passed 1, which makes both 4x too large
    relative to the map. Here the translation is multiplied by ``4 / scale`` and the cutout box by
    ``4 / scale`` about the top-left corner; rotation, shear and flip are scale-free and stay right.
    ``None`` (default) is the correct geometry, as is ``4``.
    """
    if source not in ("full", "weak"):
        raise ValueError(f"source must be 'full' or 'weak', got {source!r}")
    batch, device = maps.shape[0], maps.device
    affine = strong_params["affine"].to(device, torch.float32)
    cutout = strong_params["cutout"].to(device, torch.float32)
    if legacy_geometry_scale is not None:
        scale = LEGACY_MAP_STRIDE / float(legacy_geometry_scale)
        translate = strong_params["translate"].to(device, torch.float32)
        shift = (affine[:, :, :2] @ translate[..., None])[..., 0] * (scale - 1)
        affine = torch.cat([affine[:, :, :2], (affine[:, :, 2] + shift)[..., None]], dim=-1)
        cutout = (cutout + 1) * scale - 1
    to_full = weak_to_full(weak_params).to(device)
    base = _pixel_grid(*out_size, batch=batch, device=device)
    in_weak = _apply_affine(base, affine)
    in_full = _apply_affine(base, _compose(to_full, affine))
    x0, y0, x1, y1 = (c[:, None, None] for c in cutout.unbind(-1))
    bx, by = base.unbind(-1)
    in_cutout = (bx >= x0) & (bx < x1) & (by >= y0) & (by < y1)
    valid = _inside(in_weak) & _inside(in_full) & ~in_cutout
    warped = _sample(maps, in_full if source == "full" else in_weak, valid, mode, fill)
    return warped, valid


class RejectIgnored:
    """Refuse a sample whose ``label`` has ignored (255) pixels where the legacy prototype NLL, which has no
    ignore index, reads it: every ``stride``-th pixel (the labels nearest-downsampled to the feature map).

    Checked here, on the loader's workers, so that the training step never reads labels back from the device.
    """

    def __init__(self, stride: int):
        self.stride = stride

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        grid = sample["label"][..., :: self.stride, :: self.stride] if "label" in sample else None
        if grid is not None and bool((grid == IGNORE_INDEX).any()):
            raise UserError(f"the legacy prototype NLL has no ignore index (as released), so source labels must be "
                            f"0..5, but {sample.get('name', 'a patch')} has ignored (255) pixels; prepare the source "
                            f"with tools/prepare_isprs.py --labels full, or pass --proto-ignore-index true")
        return sample


class Compose:
    """Apply sample transforms in order."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for transform in self.transforms:
            sample = transform(sample)
        return sample
