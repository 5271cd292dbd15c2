"""The two synthetic domains: a Potsdam-like source (5 cm, dense city blocks) and a Vaihingen-like target
(9 cm, village with detached houses), their scene models and looks, and one tile of either."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields

import numpy as np

from data.isprs import POTSDAM, VAIHINGEN, IsprsDataset
from data.synthetic.render import Look, render
from data.synthetic.scene import Layout, build_scene

# 0 = the target looks like the source (only layout and GSD differ); 1 = the default gap.
DOMAIN_GAP = 1.0


@dataclass(frozen=True)
class DomainSpec:
    """One synthetic domain: dataset it imitates, GSD, nominal tile size (H, W) and scene model."""

    dataset: IsprsDataset
    gsd_m: float
    tile_px: tuple[int, int]
    tile_jitter_px: int
    layout: Layout
    look: Look


SOURCE_LAYOUT = Layout(
    kind="blocks", road_spacing=(55.0, 80.0), road_width=(6.0, 9.0), road_keep=0.95, sidewalk=2.0,
    grid_rotation=0.35, building_size=(8.0, 25.0), building_depth=(8.0, 11.0), building_height=(10.0, 20.0),
    lot_size=(0.0, 0.0), lot_fill=0.0, grass_cover=0.95, tree_clusters=2.2, trees_per_cluster=(2, 5),
    tree_radius=(2.5, 5.0), tree_height=(6.0, 14.0), street_trees=0.35, parked_cars=0.25, moving_cars=0.08,
    driveway_cars=0.0, clutter=7.0, clutter_radius=(1.0, 4.0), lane_markings=True,
)
TARGET_LAYOUT = Layout(
    kind="village", road_spacing=(45.0, 75.0), road_width=(4.5, 6.5), road_keep=0.5, sidewalk=1.0,
    grid_rotation=0.7, building_size=(10.0, 17.0), building_depth=(0.0, 0.0), building_height=(5.0, 9.0),
    lot_size=(16.0, 22.0), lot_fill=0.9, grass_cover=0.65, tree_clusters=5.0, trees_per_cluster=(3, 8),
    tree_radius=(2.5, 5.5), tree_height=(5.0, 12.0), street_trees=0.1, parked_cars=0.12, moving_cars=0.03,
    driveway_cars=0.3, clutter=5.0, clutter_radius=(0.8, 2.5), lane_markings=False,
)
# Reflectances fitted so that the rendered class means match data/synthetic/calibration.py (Potsdam RGB; the
# target's fitted to Vaihingen IRRG through its own sensor; its blue band is never written and keeps the
# source's values). Potsdam's near-infrared is its own camera's response, not Vaihingen's: vegetation
# brighter and built surfaces darker in NIR (the calibration anchors it to Vaihingen's means only within
# the tests' tolerance). Classes share colours as in the real data: the flat roofs (the last roof type) are
# the ground's material, grass spans dark lush to dry yellowed patches (``veg_*``) and overlaps the trees,
# which differ by canopy shape, shading and shadow; tiles and flight strips vary in gain, white balance
# and offset. Low vegetation's base is darker than its mean colour by the dry patches' average brightening.
SOURCE_LOOK = Look(
    ground=(0.138, 0.164, 0.121, 0.088), road=(0.077, 0.092, 0.068, 0.052), marking=(0.331, 0.378, 0.271, 0.189),
    low_veg=(0.025, 0.033, 0.026, 0.118), tree=(0.072, 0.1, 0.086, 0.143),
    roofs=((0.065, 0.115, 0.275, 0.158), (0.057, 0.065, 0.072, 0.05), (0.138, 0.164, 0.121, 0.088)),
    roof_mix=(0.68, 0.07, 0.25), clutter=(0.36, 0.22, 0.12, 0.24), jitter=0.12,
    white_balance=(1.0, 1.0, 1.0, 1.0), gamma=2.2, contrast=1.0, brightness=0.0,
    sun_azimuth=math.radians(215.0), shadow_length=0.45, shadow_gain=(0.40, 0.33, 0.30, 0.26),
    roof_stripes=0.07, roof_stripe_period=0.33, gable=0.15, canopy_speckle=0.35, grass_texture=0.12,
    road_texture=0.05, blur_px=0.0, noise=0.004,
    veg_patchiness=0.4, veg_dryness=(0.3, 0.45, 0.8, -0.35), texture_tail=0.8,
    tile_gain=0.1, strip_gain=0.1, band_jitter=0.06, offset_jitter=0.015, strip_width=(40.0, 80.0),
)
TARGET_LOOK = Look(
    ground=(0.153, 0.094, 0.109, 0.083), road=(0.085, 0.068, 0.075, 0.056), marking=(0.368, 0.187, 0.2, 0.135),
    low_veg=(0.026, 0.05, 0.049, 0.157), tree=(0.078, 0.059, 0.065, 0.127),
    roofs=((0.069, 0.116, 0.19, 0.191), (0.057, 0.108, 0.101, 0.123), (0.153, 0.094, 0.109, 0.083)),
    roof_mix=(0.55, 0.35, 0.10), clutter=(0.30, 0.26, 0.20, 0.28), jitter=0.15,
    white_balance=(1.0, 1.06, 0.94, 1.12), gamma=2.0, contrast=1.05, brightness=0.0,
    sun_azimuth=math.radians(60.0), shadow_length=0.5, shadow_gain=(0.50, 0.45, 0.42, 0.40),
    roof_stripes=0.03, roof_stripe_period=0.3, gable=0.25, canopy_speckle=0.4, grass_texture=0.14,
    road_texture=0.04, blur_px=0.7, noise=0.012,
    veg_patchiness=0.3, veg_dryness=(0.3, 0.45, 0.8, -0.35), texture_tail=0.8,
    tile_gain=0.1, strip_gain=0.1, band_jitter=0.06, offset_jitter=0.015, strip_width=(30.0, 60.0),
)
# Label noise of both domains: the share of tree, roof and clutter instances an annotator gives a
# confusable class, and how far (metres, smoothly varying) the drawn borders wander.
MISLABEL = 0.03
BOUNDARY_JITTER_M = 0.1
SOURCE = DomainSpec(POTSDAM, 0.05, (1200, 1200), 0, SOURCE_LAYOUT, SOURCE_LOOK)
TARGET = DomainSpec(VAIHINGEN, 0.09, (700, 900), 40, TARGET_LAYOUT, TARGET_LOOK)


def _lerp(a: object, b: object, t: float) -> object:
    if isinstance(a, tuple):
        return tuple(_lerp(x, y, t) for x, y in zip(a, b))
    return (1 - t) * a + t * b  # type: ignore[operator]


def target_look(gap: float = DOMAIN_GAP) -> Look:
    """The target's look, blended from the source's (``gap=0``) to its own (``gap=1``)."""
    return Look(**{f.name: _lerp(getattr(SOURCE_LOOK, f.name), getattr(TARGET_LOOK, f.name), gap)
                   for f in fields(Look)})


def tile_rng(seed: int, dataset: str, tile: str) -> np.random.Generator:
    """Generator of one tile, independent of which other tiles are made (small is a subset of demo)."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), zlib.crc32(tile.encode())])


def make_tile(
    spec: DomainSpec, tile: str, seed: int, look: Look | None = None, tile_px: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic tile: bands ``[H, W, 4]`` uint8 (B, G, R, NIR) and raw ids ``[H, W]`` uint8 (1..6).

    ``tile_px`` replaces the domain's nominal tile size (the study size's larger tiles)."""
    rng = tile_rng(seed, spec.dataset.name, tile)
    jitter = spec.tile_jitter_px
    height, width = (size + (int(rng.integers(-jitter, jitter + 1)) if jitter else 0)
                     for size in tile_px or spec.tile_px)
    scene = build_scene(spec.layout, spec.gsd_m, height, width, rng)
    return render(scene, look or spec.look, rng), scene.noisy_labels(rng, MISLABEL, BOUNDARY_JITTER_M)
