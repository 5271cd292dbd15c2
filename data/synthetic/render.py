"""The look of a synthetic tile: per-material reflectances (B, G, R, NIR) with per-instance jitter,
textures and cast shadows, then a domain's sensor model (white balance, gamma, contrast, blur, noise)."""

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
    # Each instance gets a brightness jitter shared by its bands plus a smaller per-band one (hue).
    z = np.stack([a["z"] for a in scene.attrs])
    spread = np.where(material == CLUTTER_BLOB, 3.0, 1.0)[:, None] * look.jitter
    colour = base * np.clip(1 + spread * (z[:, 4:] + 0.4 * z[:, :4]), 0.2, None)
    return colour.astype(np.float32), roof_type


def _shading(scene: Scene, look: Look, rng: np.random.Generator, roof_type: np.ndarray) -> np.ndarray:
    """Multiplicative texture ``[H, W]``: pavement grain, grass patches, roof tiles and gables, canopies."""
    h, w, gsd, inst = scene.height, scene.width, scene.gsd, scene.inst
    shade = np.ones((h, w), dtype=np.float32)
    fine = smooth_noise(rng, h, w, 0.12 / gsd)
    mid = smooth_noise(rng, h, w, 1.5 / gsd)
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
        # The roof half whose slope faces the sun is brighter; flat roofs (the last type) have no ridge.
        facing = np.sign(-np.sin(angle) * sun[0] + np.cos(angle) * sun[1])
        pitched = roof_type[ids] < len(look.roofs) - 1
        shade[rows, cols] += (look.roof_stripes * np.sin(2 * math.pi * across / look.roof_stripe_period)
                              + look.gable * pitched * np.sign(across) * facing)
    rows, cols = np.nonzero(material == TREE_CANOPY)
    if rows.size:
        ids = inst[rows, cols]
        cx, cy, radius = (_attr(scene, key, 1.0)[ids] for key in ("cx", "cy", "radius"))
        dx, dy = (cols - cx) / radius, (rows - cy) / radius
        shade[rows, cols] *= 1 - 0.3 * np.minimum(dx * dx + dy * dy, 1.0) + 0.2 * (dx * sun[0] + dy * sun[1])
        shade[rows, cols] *= 1 + look.canopy_speckle * smooth_noise(rng, h, w, 0.3 / gsd)[rows, cols]
    return np.clip(shade, 0.1, None)


def _sensor(image: np.ndarray, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Reflectance ``[H, W, 4]`` -> uint8 through white balance, gamma, contrast, blur and noise."""
    image = np.clip(image * np.asarray(look.white_balance, dtype=np.float32), 0, None) ** (1 / look.gamma)
    image = ((image - 0.5) * look.contrast + 0.5 + look.brightness) * 255.0
    if look.blur_px > 0:
        image = cv2.GaussianBlur(image, (0, 0), look.blur_px)
    if look.noise > 0:
        image += rng.normal(0, look.noise * 255, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(scene: Scene, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Render the scene's four bands ``[H, W, 4]`` uint8 in (B, G, R, NIR) order."""
    colour, roof_type = _instance_colours(scene, look)
    image = colour[scene.inst] * _shading(scene, look, rng, roof_type)[..., None]
    shadow = _shadow_mask(scene, look, _attr(scene, "height")[scene.inst])
    image *= 1 - (1 - np.asarray(look.shadow_gain, dtype=np.float32)) * shadow[..., None]
    return _sensor(image, look, rng)


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
