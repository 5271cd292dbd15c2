"""The look of a synthetic tile: per-material reflectances (B, G, R, NIR) with per-instance jitter,
heavy-tailed textures, patchy vegetation and cast shadows, then a domain's sensor model (white balance,
gamma, contrast, blur, noise) with per-tile and per-flight-strip radiometric variation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from data.synthetic.scene import (
    CAR_BODY,
    CAR_GLASS,
    CLUTTER_BLOB,
    GRASS,
    GROUND,
    MARKING,
    ROAD,
    ROOF,
    TREE_CANOPY,
    Scene,
    Vec4,
    smooth_noise,
)

# Cars are the same in both domains; their colours are scaled so that the car class's mean colour matches
# both real patches.
CAR_COLOURS: tuple[Vec4, ...] = (
    (0.372, 0.372, 0.372, 0.33),  # white
    (0.024, 0.024, 0.027, 0.03),  # black
    (0.204, 0.204, 0.198, 0.192),  # silver
    (0.042, 0.042, 0.252, 0.228),  # red
    (0.198, 0.072, 0.036, 0.084),  # blue
    (0.072, 0.072, 0.072, 0.072),  # dark grey
)
GLASS: Vec4 = (0.05, 0.05, 0.05, 0.05)


@dataclass(frozen=True)
class Look:
    """Appearance of a domain: reflectances (B, G, R, NIR), textures, shadows and the sensor model."""

    ground: Vec4
    road: Vec4
    marking: Vec4
    low_veg: Vec4
    tree: Vec4
    roofs: tuple[Vec4, Vec4, Vec4]  # red tiles, dark tiles, grey flat roofs
    roof_mix: tuple[float, float, float]
    clutter: Vec4
    jitter: float  # per-instance relative colour spread
    white_balance: Vec4
    gamma: float
    contrast: float
    brightness: float
    sun_azimuth: float  # direction the shadows fall, radians in image coordinates
    shadow_length: float  # metres of shadow per metre of height
    shadow_gain: Vec4
    roof_stripes: float
    roof_stripe_period: float  # metres
    gable: float  # brightness difference between the two halves of a pitched roof
    canopy_speckle: float
    grass_texture: float
    road_texture: float
    blur_px: float
    noise: float  # sensor noise std as a fraction of full scale
    # Low vegetation is not one colour per tile: lush, mown and dry patches (brightness and a dry hue).
    veg_patchiness: float  # relative std of the patch brightness
    veg_dryness: Vec4  # relative colour change per unit of the dryness field, per band
    texture_tail: float  # 0: Gaussian textures; larger: heavier tails (sinh of the noise)
    # Radiometry varies between tiles and between flight strips (vertical bands ``strip_width`` metres
    # wide): log-normal gain, per-band white-balance jitter, and an offset in grey levels (fractions of
    # full scale). They widen every class's colour distribution, as between the real tiles.
    tile_gain: float
    strip_gain: float
    band_jitter: float
    offset_jitter: float
    strip_width: tuple[float, float]


def _attr(scene: Scene, key: str, default: float = 0.0) -> np.ndarray:
    return np.array([a.get(key, default) for a in scene.attrs])


def _instance_colours(scene: Scene, look: Look) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance ``[N, 4]`` of every instance, and the roof type of each (flat roofs get no gable)."""
    material, u = _attr(scene, "material").astype(int), _attr(scene, "u")
    roof_type = np.searchsorted(np.cumsum(look.roof_mix) / sum(look.roof_mix), u)
    roof_type = np.minimum(roof_type, len(look.roofs) - 1)
    plain = {GROUND: look.ground, ROAD: look.road, MARKING: look.marking, GRASS: look.low_veg,
             TREE_CANOPY: look.tree, CAR_GLASS: GLASS, CLUTTER_BLOB: look.clutter}
    base = np.array([
        look.roofs[kind] if mat == ROOF else CAR_COLOURS[int(v * len(CAR_COLOURS))] if mat == CAR_BODY
        else plain[mat]
        for mat, kind, v in zip(material, roof_type, u)
    ])
    # Each instance gets a brightness jitter shared by its bands plus a smaller per-band one (hue). Clutter
    # is anything (gravel, tarpaulins, skips, sheds): three times the spread, and as much hue as brightness.
    z = np.stack([a["z"] for a in scene.attrs])
    is_clutter = (material == CLUTTER_BLOB)[:, None]
    spread = np.where(is_clutter, 3.0, 1.0) * look.jitter
    colour = base * np.clip(1 + spread * (z[:, 4:] + np.where(is_clutter, 1.0, 0.4) * z[:, :4]), 0.2, None)
    return colour.astype(np.float32), roof_type


def _heavy_tailed(noise: np.ndarray, tail: float) -> np.ndarray:
    """Unit-std noise with heavier tails than ``noise`` (Gaussian): sinh stretches its extremes."""
    if tail <= 0:
        return noise
    out = np.sinh(tail * noise)
    return out / (out.std() + 1e-6)


def _shading(scene: Scene, look: Look, rng: np.random.Generator, roof_type: np.ndarray) -> np.ndarray:
    """Multiplicative texture ``[H, W]``: pavement grain, grass patches, roof tiles and gables, canopies."""
    h, w, gsd, inst = scene.height, scene.width, scene.gsd, scene.inst
    shade = np.ones((h, w), dtype=np.float32)
    fine = _heavy_tailed(smooth_noise(rng, h, w, 0.12 / gsd), look.texture_tail)
    mid = _heavy_tailed(smooth_noise(rng, h, w, 1.5 / gsd), look.texture_tail)
    material = _attr(scene, "material").astype(int)[inst]
    sun = -np.array([math.cos(look.sun_azimuth), math.sin(look.sun_azimuth)])
    for mat, amp, noise in ((ROAD, look.road_texture, fine), (GROUND, look.road_texture, fine),
                            (GRASS, look.grass_texture, mid)):
        mask = material == mat
        shade[mask] += amp * noise[mask]
    rows, cols = np.nonzero(material == ROOF)
    if rows.size:
        ids = inst[rows, cols]
        angle, cx, cy = (_attr(scene, key)[ids] for key in ("angle", "cx", "cy"))
        across = ((cols - cx) * -np.sin(angle) + (rows - cy) * np.cos(angle)) * gsd
        # The roof half whose slope faces the sun is brighter. Flat roofs (the last type) have no ridge and
        # no tile rows: they are the ground's material with its grain, told apart only by shape and context.
        facing = np.sign(-np.sin(angle) * sun[0] + np.cos(angle) * sun[1])
        pitched = roof_type[ids] < len(look.roofs) - 1
        shade[rows, cols] += np.where(
            pitched,
            look.roof_stripes * np.sin(2 * math.pi * across / look.roof_stripe_period)
            + look.gable * np.sign(across) * facing,
            look.road_texture * fine[rows, cols])
    rows, cols = np.nonzero(material == TREE_CANOPY)
    if rows.size:
        ids = inst[rows, cols]
        cx, cy, radius = (_attr(scene, key, 1.0)[ids] for key in ("cx", "cy", "radius"))
        dx, dy = (cols - cx) / radius, (rows - cy) / radius
        shade[rows, cols] *= 1 - 0.3 * np.minimum(dx * dx + dy * dy, 1.0) + 0.2 * (dx * sun[0] + dy * sun[1])
        speckle = _heavy_tailed(smooth_noise(rng, h, w, 0.3 / gsd), look.texture_tail)
        shade[rows, cols] *= 1 + look.canopy_speckle * speckle[rows, cols]
    return np.clip(shade, 0.1, None)


def _vegetation_patches(scene: Scene, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Relative colour ``[H, W, 4]`` of the low vegetation: brightness patches and dry (yellowed) patches
    a few metres wide, so that grass spans the colours of trees and of bare ground."""
    h, w, gsd = scene.height, scene.width, scene.gsd
    brightness = 1 + look.veg_patchiness * smooth_noise(rng, h, w, 6.0 / gsd)
    dryness = np.clip(smooth_noise(rng, h, w, 10.0 / gsd), 0, None)[..., None]
    return np.clip(brightness[..., None] * (1 + dryness * np.asarray(look.veg_dryness, np.float32)), 0.2, None)


def _strip_radiometry(scene: Scene, look: Look, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gain and offset ``[W, 4]`` per image column: one tile-wide draw times one per flight strip."""
    tile_gain = np.exp(look.tile_gain * rng.standard_normal() + look.band_jitter * rng.standard_normal(4))
    width_px = rng.uniform(*look.strip_width) / scene.gsd
    strip = ((np.arange(scene.width) + rng.uniform(0, width_px)) // width_px).astype(int)
    count = strip.max() + 1
    strip_gain = np.exp(look.strip_gain * rng.standard_normal((count, 1))
                        + 0.5 * look.band_jitter * rng.standard_normal((count, 4)))
    offset = look.offset_jitter * 255.0 * rng.standard_normal((count, 4))
    return (tile_gain * strip_gain)[strip].astype(np.float32), offset[strip].astype(np.float32)


def _sensor(image: np.ndarray, look: Look, rng: np.random.Generator, gain: np.ndarray,
            offset: np.ndarray) -> np.ndarray:
    """Reflectance ``[H, W, 4]`` -> uint8 through white balance (times the per-column ``gain`` ``[W, 4]``),
    gamma, contrast, the per-column ``offset`` in grey levels, blur and noise."""
    image = np.clip(image * (np.asarray(look.white_balance, dtype=np.float32) * gain), 0, None) ** (1 / look.gamma)
    image = ((image - 0.5) * look.contrast + 0.5 + look.brightness) * 255.0 + offset
    if look.blur_px > 0:
        image = cv2.GaussianBlur(image, (0, 0), look.blur_px)
    if look.noise > 0:
        image += rng.normal(0, look.noise * 255, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(scene: Scene, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Render the scene's four bands ``[H, W, 4]`` uint8 in (B, G, R, NIR) order."""
    colour, roof_type = _instance_colours(scene, look)
    image = colour[scene.inst] * _shading(scene, look, rng, roof_type)[..., None]
    grass = _attr(scene, "material").astype(int)[scene.inst] == GRASS
    image[grass] *= _vegetation_patches(scene, look, rng)[grass]
    shadow = _shadow_mask(scene, look, _attr(scene, "height")[scene.inst])
    image *= 1 - (1 - np.asarray(look.shadow_gain, dtype=np.float32)) * shadow[..., None]
    return _sensor(image, look, rng, *_strip_radiometry(scene, look, rng))


def _shadow_mask(scene: Scene, look: Look, receiver_height: np.ndarray) -> np.ndarray:
    """Soft shadow weight ``[H, W]`` in 0..1: a pixel is shaded by any taller caster's swept footprint."""
    caster_height = np.zeros((scene.height, scene.width), dtype=np.float32)
    offset = np.array([math.cos(look.sun_azimuth), math.sin(look.sun_azimuth)]) * look.shadow_length
    for polygon, height in sorted(scene.casters, key=lambda c: c[1]):
        swept = np.concatenate([polygon, polygon + offset * height]) / scene.gsd
        hull = cv2.convexHull(np.round(swept * 16).astype(np.int32))
        cv2.fillConvexPoly(caster_height, hull, float(height), lineType=cv2.LINE_8, shift=4)
    hard = (caster_height > receiver_height + 0.3).astype(np.float32)
    return cv2.GaussianBlur(hard, (0, 0), max(0.1 / scene.gsd, 0.5))
