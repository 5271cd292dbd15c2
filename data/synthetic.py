"""Synthetic ISPRS-like data: a Potsdam-like source and a Vaihingen-like target (spec section 3.5).

Each tile is a scene built in metres (street grid, buildings, trees, low vegetation, cars, clutter) and
rasterised at its domain's GSD (source 0.05 m, target 0.09 m). Four virtual bands (B, G, R, NIR) are
rendered from per-material reflectances with per-instance jitter, textures and cast shadows, then passed
through a per-domain sensor model (white balance, gamma, contrast, blur, noise). The source is written
as RGB and IRRG, the target as IRRG, with ISPRS colour labels and eroded noBoundary labels, in zips
that carry the official names. The knobs of the domain gap are the two ``Look`` constants below and
``DOMAIN_GAP``, which blends the target's look from the source's (0) to its own (1).

Calibration (targets and their sources in data/calibration.py): the layouts give each domain the class
shares of the real data set (Potsdam: dense perimeter blocks with green courtyards; Vaihingen: detached
houses on lots, more trees), and the reflectances were fitted once so that each class's mean colour
matches the real labelled patches. The gap is therefore in GSD, sensor response (white balance, gamma,
contrast, blur, noise), roof mix and layout, not in what colour a class has.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np

from data.isprs import POTSDAM, SYNTHETIC_MARKER, VAIHINGEN, IsprsDataset, encode_label
from data.prepare import prepare_isprs
from utils.errors import UserError
from utils.paths import check_output_folder

Vec4 = tuple[float, float, float, float]  # reflectance or gain per band, order (B, G, R, NIR)

# 0 = the target looks like the source (only layout and GSD differ); 1 = the default gap.
DOMAIN_GAP = 1.0
EROSION_RADIUS_PX = 3  # the noBoundary labels black out pixels this close to a class border
MODES = ("raw", "prepared")
SIZES = {"small": {"train": 2, "val": 1}, "demo": {"train": 6, "val": 4}}
TILE_IDS = {
    "potsdam": {"train": POTSDAM.splits["train"][:6], "val": ("2_13", "2_14", "3_13", "3_14")},
    "vaihingen": {"train": VAIHINGEN.splits["train"][:6], "val": ("area2", "area4", "area6", "area8")},
}
PREPARED_DOMAINS = (("potsdam", "rgb"), ("potsdam", "irrg"), ("vaihingen", "irrg"))
# Bands (B, G, R, NIR) in cv2's BGR array order for files whose slots are (R, G, B) or (NIR, R, G).
BGR_ORDER = {"rgb": [0, 1, 2], "irrg": [1, 2, 3]}

# Raw ids (mmseg_raw) of the classes drawn.
IMPERVIOUS, BUILDING, LOW_VEG, TREE, CAR, CLUTTER = 1, 2, 3, 4, 5, 6

# Materials: class, texture and height of each kind of surface. Cars are the same in both domains;
# their colours are scaled so that the car class's mean colour matches both real patches.
GROUND, ROAD, MARKING, GRASS, ROOF, TREE_CANOPY, CAR_BODY, CAR_GLASS, CLUTTER_BLOB = range(9)
MATERIAL_CLASS = np.array([IMPERVIOUS, IMPERVIOUS, IMPERVIOUS, LOW_VEG, BUILDING, TREE, CAR, CAR, CLUTTER])
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
class Layout:
    """Scene statistics of a domain; lengths in metres, rates per 1000 m^2 unless noted."""

    kind: str  # "blocks": perimeter city blocks; "village": detached houses on lots
    road_spacing: tuple[float, float]
    road_width: tuple[float, float]
    road_keep: float  # probability that a road of the grid exists
    sidewalk: float
    grid_rotation: float  # max |angle| of the street grid, radians
    building_size: tuple[float, float]  # footprint side (blocks: length along the street)
    building_depth: tuple[float, float]  # blocks only: depth of the perimeter buildings
    building_height: tuple[float, float]
    lot_size: tuple[float, float]  # village only
    lot_fill: float  # village only: probability that a lot holds a house
    grass_cover: float  # fraction of the free ground that is low vegetation
    tree_clusters: float
    trees_per_cluster: tuple[int, int]
    tree_radius: tuple[float, float]
    tree_height: tuple[float, float]
    street_trees: float  # probability that a road side is lined with trees
    parked_cars: float  # probability that a parking slot along a road is taken
    moving_cars: float  # probability that a lane slot holds a car
    driveway_cars: float  # village only: probability of a car beside a house
    clutter: float
    clutter_radius: tuple[float, float]
    lane_markings: bool


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
# Reflectances fitted so that the rendered class means match data/calibration.py (Potsdam RGB; NIR as
# Vaihingen's, the same materials). The target's were fitted to Vaihingen IRRG through its own sensor;
# its blue band is never written and keeps the source's values.
SOURCE_LOOK = Look(
    ground=(0.153, 0.182, 0.134, 0.111), road=(0.085, 0.102, 0.075, 0.066), marking=(0.368, 0.42, 0.301, 0.231),
    low_veg=(0.029, 0.039, 0.034, 0.098), tree=(0.078, 0.109, 0.093, 0.143),
    roofs=((0.069, 0.116, 0.236, 0.143), (0.057, 0.065, 0.072, 0.05), (0.19, 0.217, 0.19, 0.114)),
    roof_mix=(0.8, 0.05, 0.15), clutter=(0.36, 0.22, 0.12, 0.24), jitter=0.12,
    white_balance=(1.0, 1.0, 1.0, 1.0), gamma=2.2, contrast=1.0, brightness=0.0,
    sun_azimuth=math.radians(215.0), shadow_length=0.45, shadow_gain=(0.40, 0.33, 0.30, 0.26),
    roof_stripes=0.07, roof_stripe_period=0.33, gable=0.15, canopy_speckle=0.35, grass_texture=0.12,
    road_texture=0.05, blur_px=0.0, noise=0.004,
)
TARGET_LOOK = Look(
    ground=(0.153, 0.094, 0.109, 0.083), road=(0.085, 0.068, 0.075, 0.056), marking=(0.368, 0.187, 0.2, 0.135),
    low_veg=(0.029, 0.059, 0.064, 0.135), tree=(0.078, 0.059, 0.065, 0.127),
    roofs=((0.069, 0.116, 0.19, 0.191), (0.057, 0.108, 0.101, 0.123), (0.19, 0.225, 0.177, 0.168)),
    roof_mix=(0.55, 0.35, 0.10), clutter=(0.30, 0.26, 0.20, 0.28), jitter=0.15,
    white_balance=(1.0, 1.06, 0.94, 1.12), gamma=2.0, contrast=1.05, brightness=0.0,
    sun_azimuth=math.radians(60.0), shadow_length=0.5, shadow_gain=(0.50, 0.45, 0.42, 0.40),
    roof_stripes=0.03, roof_stripe_period=0.3, gable=0.25, canopy_speckle=0.4, grass_texture=0.14,
    road_texture=0.04, blur_px=0.7, noise=0.012,
)
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


class Scene:
    """Instance map of one tile being built; every instance has a material and render attributes."""

    def __init__(self, height: int, width: int, gsd: float) -> None:
        self.height, self.width, self.gsd = height, width, gsd
        self.inst = np.zeros((height, width), dtype=np.int32)
        self.attrs: list[dict] = []
        self.casters: list[tuple[np.ndarray, float]] = []

    def add(self, material: int, rng: np.random.Generator, height: float = 0.0, **attrs: float) -> int:
        """New instance id; ``u`` picks its variant (roof type, car colour), ``z`` its colour jitter."""
        self.attrs.append(
            dict(material=material, height=height, u=rng.random(), z=rng.standard_normal(5), **attrs)
        )
        return len(self.attrs) - 1

    def fill(self, polygon_m: np.ndarray, inst: int, cast_height: float = 0.0) -> None:
        """Rasterise a polygon ``[N, 2]`` given in metres (x, y) with sub-pixel precision."""
        points = np.round(polygon_m / self.gsd * 16.0).astype(np.int32)
        cv2.fillPoly(self.inst, [points], int(inst), lineType=cv2.LINE_8, shift=4)
        if cast_height > 0:
            self.casters.append((polygon_m, cast_height))

    def material_at(self, x: float, y: float) -> int | None:
        """Material under a point in metres, None outside the tile."""
        col, row = int(x / self.gsd), int(y / self.gsd)
        if not (0 <= row < self.height and 0 <= col < self.width):
            return None
        return self.attrs[self.inst[row, col]]["material"]

    def labels(self) -> np.ndarray:
        """Raw class ids ``[H, W]`` uint8 (1..6)."""
        materials = np.array([a["material"] for a in self.attrs])
        return MATERIAL_CLASS[materials][self.inst].astype(np.uint8)


class _Frame:
    """Street-grid frame: (u, v) metres rotated by ``angle`` about the tile centre."""

    def __init__(self, centre: tuple[float, float], angle: float) -> None:
        self.centre, self.angle = np.array(centre), angle
        self.rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def xy(self, uv: np.ndarray) -> np.ndarray:
        return uv @ self.rot.T + self.centre

    def rect(self, u0: float, v0: float, u1: float, v1: float) -> np.ndarray:
        return self.xy(np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], dtype=np.float64))


def oriented_rect(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    """Corners ``[4, 2]`` of a rectangle centred at (cx, cy), its length along ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * (length / 2, width / 2)
    return half @ np.array([[c, s], [-s, c]]) + (cx, cy)


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float, vertices: int, roughness: float):
    angles = np.linspace(0, 2 * math.pi, vertices, endpoint=False) + rng.uniform(0, 2 * math.pi)
    radii = radius * (1 + roughness * rng.uniform(-1, 1, vertices))
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell_px: float) -> np.ndarray:
    """Zero-mean, unit-std noise ``[H, W]`` float32 with features about ``cell_px`` pixels wide."""
    cell = max(cell_px, 1.0)
    grid = rng.standard_normal((int(height / cell) + 4, int(width / cell) + 4)).astype(np.float32)
    big = cv2.resize(grid, (round(grid.shape[1] * cell), round(grid.shape[0] * cell)),
                     interpolation=cv2.INTER_CUBIC)
    noise = big[int(cell) : int(cell) + height, int(cell) : int(cell) + width]
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _road_positions(rng: np.random.Generator, lay: Layout, extent: float) -> list[tuple[float, float]]:
    positions, p = [], -extent + rng.uniform(0, min(lay.road_spacing[1], extent))
    while p < extent:
        positions.append((p, rng.uniform(*lay.road_width)))
        p += rng.uniform(*lay.road_spacing)
    kept = [road for road in positions if rng.random() < lay.road_keep]
    return kept or [positions[rng.integers(len(positions))]]


def build_scene(spec: DomainSpec, height: int, width: int, rng: np.random.Generator) -> Scene:
    """Lay out one tile of ``spec``'s scene model at its GSD."""
    lay, gsd = spec.layout, spec.gsd_m
    scene = Scene(height, width, gsd)
    w_m, h_m = width * gsd, height * gsd
    area_k = w_m * h_m / 1000.0
    extent = 0.5 * math.hypot(w_m, h_m) + 15.0
    frame = _Frame((w_m / 2, h_m / 2), rng.uniform(-lay.grid_rotation, lay.grid_rotation))

    ground = scene.add(GROUND, rng)
    grass = scene.add(GRASS, rng)
    field = smooth_noise(rng, height, width, 10.0 / gsd)
    scene.inst[field > np.quantile(field, 1.0 - lay.grass_cover)] = grass

    u_roads, v_roads = _road_positions(rng, lay, extent), _road_positions(rng, lay, extent)
    road = scene.add(ROAD, rng)
    for roads, along_u in ((u_roads, False), (v_roads, True)):
        for p, w in roads:
            half = w / 2 + lay.sidewalk
            scene.fill(_strip(frame, p, half, extent, along_u), ground)
    for roads, along_u in ((u_roads, False), (v_roads, True)):
        for p, w in roads:
            scene.fill(_strip(frame, p, w / 2, extent, along_u), road)
    if lay.lane_markings:
        _lane_markings(scene, frame, rng, u_roads, v_roads, extent)

    u_edges = [(-extent, 0.0), *u_roads, (extent, 0.0)]
    v_edges = [(-extent, 0.0), *v_roads, (extent, 0.0)]
    for (ua, wa), (ub, wb) in zip(u_edges, u_edges[1:]):
        for (va, xa), (vb, xb) in zip(v_edges, v_edges[1:]):
            block = (ua + wa / 2 + lay.sidewalk, va + xa / 2 + lay.sidewalk,
                     ub - wb / 2 - lay.sidewalk, vb - xb / 2 - lay.sidewalk)
            if block[2] - block[0] > 6 and block[3] - block[1] > 6:
                if lay.kind == "blocks":
                    _fill_city_block(scene, frame, rng, lay, block)
                else:
                    _fill_village_block(scene, frame, rng, lay, block)

    _place_cars(scene, frame, rng, lay, u_roads, v_roads, extent)
    for _ in range(rng.poisson(lay.clutter * area_k)):
        x, y = rng.uniform(0, w_m), rng.uniform(0, h_m)
        if scene.material_at(x, y) in (GROUND, GRASS):
            blob = scene.add(CLUTTER_BLOB, rng, height=1.0)
            scene.fill(_blob(rng, x, y, rng.uniform(*lay.clutter_radius), 9, 0.4), blob, cast_height=1.0)
    _place_trees(scene, frame, rng, lay, u_roads, v_roads, extent, w_m, h_m, area_k)
    return scene


def _strip(frame: _Frame, p: float, half: float, extent: float, along_u: bool) -> np.ndarray:
    if along_u:
        return frame.rect(-extent, p - half, extent, p + half)
    return frame.rect(p - half, -extent, p + half, extent)


def _in_crossing(s: float, others: list[tuple[float, float]], margin: float) -> bool:
    return any(abs(s - q) < w / 2 + margin for q, w in others)


def _lane_markings(scene, frame, rng, u_roads, v_roads, extent) -> None:
    marking = scene.add(MARKING, rng)
    for roads, others, along_u in ((u_roads, v_roads, False), (v_roads, u_roads, True)):
        for p, _ in roads:
            for s in np.arange(-extent + rng.uniform(0, 8), extent, 8.0):
                if not _in_crossing(s + 1.5, others, 1.0):
                    uv = (s, p - 0.075, s + 3.0, p + 0.075) if along_u else (p - 0.075, s, p + 0.075, s + 3.0)
                    scene.fill(frame.rect(*uv), marking)


def _building(scene: Scene, rng: np.random.Generator, lay: Layout, polygon: np.ndarray, ridge: float) -> None:
    height = rng.uniform(*lay.building_height)
    centre = polygon.mean(axis=0) / scene.gsd
    inst = scene.add(ROOF, rng, height=height, angle=ridge, cx=centre[0], cy=centre[1])
    scene.fill(polygon, inst, cast_height=height)


def _fill_city_block(scene, frame, rng, lay: Layout, block) -> None:
    u0, v0, u1, v1 = block
    depth = rng.uniform(*lay.building_depth)
    if u1 - u0 < 2 * depth + 6 or v1 - v0 < 2 * depth + 6:
        if rng.random() < 0.6:
            _building(scene, rng, lay, frame.rect(u0, v0, u1, v1), frame.angle)
        return
    setback = rng.choice([0.0, 0.0, rng.uniform(1.0, 3.0)])
    sides = (
        (u0, u1, lambda a, b: (a, v0 + setback, b, v0 + setback + depth), 0.0),
        (u0, u1, lambda a, b: (a, v1 - setback - depth, b, v1 - setback), 0.0),
        (v0 + setback + depth, v1 - setback - depth, lambda a, b: (u0 + setback, a, u0 + setback + depth, b), 1.0),
        (v0 + setback + depth, v1 - setback - depth, lambda a, b: (u1 - setback - depth, a, u1 - setback, b), 1.0),
    )
    for start, stop, box, turn in sides:
        a = start
        while a < stop - 4:
            b = min(a + rng.uniform(*lay.building_size), stop)
            if rng.random() < 0.85:
                _building(scene, rng, lay, frame.rect(*box(a, b)), frame.angle + turn * math.pi / 2)
            a = b + (rng.uniform(2.0, 6.0) if rng.random() < 0.25 else 0.0)
    if rng.random() < 0.3:
        cu, cv = (u0 + u1) / 2, (v0 + v1) / 2
        size = rng.uniform(4.0, 8.0)
        _building(scene, rng, lay, frame.rect(cu - size, cv - size / 2, cu + size, cv + size / 2), frame.angle)


def _fill_village_block(scene, frame, rng, lay: Layout, block) -> None:
    u0, v0, u1, v1 = block
    lot = rng.uniform(*lay.lot_size)
    for lu in np.arange(u0, u1 - 8, lot):
        for lv in np.arange(v0, v1 - 8, lot):
            if rng.random() > lay.lot_fill:
                continue
            lot_u, lot_v = min(lot, u1 - lu), min(lot, v1 - lv)
            length = min(rng.uniform(*lay.building_size), lot_u - 3)
            width = min(rng.uniform(0.6, 1.0) * length, lot_v - 3)
            if min(length, width) < 5:
                continue
            cu = lu + rng.uniform(1.5 + length / 2, max(1.5 + length / 2, lot_u - 1.5 - length / 2))
            cv = lv + rng.uniform(1.5 + width / 2, max(1.5 + width / 2, lot_v - 1.5 - width / 2))
            x, y = frame.xy(np.array([cu, cv]))
            angle = frame.angle + rng.normal(0, 0.12) + (math.pi / 2 if rng.random() < 0.3 else 0.0)
            _building(scene, rng, lay, oriented_rect(x, y, length, width, angle), angle)
            if rng.random() < 0.3:
                ax, ay = np.array([x, y]) + 0.5 * width * np.array([-math.sin(angle), math.cos(angle)])
                _building(scene, rng, lay, oriented_rect(ax, ay, 0.5 * length, width, angle), angle)
            if rng.random() < lay.driveway_cars:
                dx, dy = np.array([x, y]) + (length / 2 + 2.0) * np.array([math.cos(angle), math.sin(angle)])
                pad = scene.add(GROUND, rng)
                scene.fill(oriented_rect(dx, dy, 6.0, 3.2, angle + math.pi / 2), pad)
                _car(scene, rng, dx, dy, angle + math.pi / 2)


def _car(scene: Scene, rng: np.random.Generator, x: float, y: float, angle: float) -> None:
    length, width = rng.uniform(3.9, 4.7), rng.uniform(1.6, 1.85)
    body = scene.add(CAR_BODY, rng, height=1.5)
    scene.fill(oriented_rect(x, y, length, width, angle), body, cast_height=1.5)
    glass = scene.add(CAR_GLASS, rng)
    direction = np.array([math.cos(angle), math.sin(angle)])
    for offset, size in ((0.45, 0.75), (-1.0, 0.5)):
        gx, gy = np.array([x, y]) + offset * length / 4.5 * direction
        scene.fill(oriented_rect(gx, gy, size, 0.85 * width, angle), glass)


def _place_cars(scene, frame, rng, lay: Layout, u_roads, v_roads, extent) -> None:
    for roads, others, along_u in ((u_roads, v_roads, False), (v_roads, u_roads, True)):
        heading = frame.angle + (0.0 if along_u else math.pi / 2)
        for p, w in roads:
            slots = (
                (w / 2 - 1.25, lay.parked_cars, 5.8),
                (-(w / 2 - 1.25), lay.parked_cars, 5.8),
                (w / 4 - 0.3, lay.moving_cars, 9.0),
                (-(w / 4 - 0.3), lay.moving_cars, 9.0),
            )
            for offset, rate, spacing in slots:
                for s in np.arange(-extent + rng.uniform(0, spacing), extent, spacing):
                    if rng.random() < rate and not _in_crossing(s, others, 3.0):
                        uv = np.array([s, p + offset] if along_u else [p + offset, s])
                        x, y = frame.xy(uv)
                        _car(scene, rng, x, y, heading + rng.normal(0, 0.03))


def _tree(scene: Scene, rng: np.random.Generator, lay: Layout, x: float, y: float) -> None:
    radius = rng.uniform(*lay.tree_radius)
    height = rng.uniform(*lay.tree_height)
    inst = scene.add(TREE_CANOPY, rng, height=height, cx=x / scene.gsd, cy=y / scene.gsd, radius=radius / scene.gsd)
    scene.fill(_blob(rng, x, y, radius, 20, 0.08), inst, cast_height=height)


def _place_trees(scene, frame, rng, lay: Layout, u_roads, v_roads, extent, w_m, h_m, area_k) -> None:
    for _ in range(rng.poisson(lay.tree_clusters * area_k)):
        cx, cy = rng.uniform(-5, w_m + 5), rng.uniform(-5, h_m + 5)
        for _ in range(rng.integers(lay.trees_per_cluster[0], lay.trees_per_cluster[1] + 1)):
            x, y = cx + rng.normal(0, 4.0), cy + rng.normal(0, 4.0)
            # Not on paved ground: in these towns trees stand in gardens and courtyards, and street trees
            # are planted separately (below), so parked cars stay mostly visible.
            if scene.material_at(x, y) in (GRASS, CLUTTER_BLOB, None):
                _tree(scene, rng, lay, x, y)
    for roads, others, along_u in ((u_roads, v_roads, False), (v_roads, u_roads, True)):
        for p, w in roads:
            for side in (-1.0, 1.0):
                if rng.random() >= lay.street_trees:
                    continue
                for s in np.arange(-extent + rng.uniform(0, 9), extent, rng.uniform(7.0, 10.0)):
                    if not _in_crossing(s, others, 4.0):
                        offset = side * (w / 2 + lay.sidewalk - 0.8)
                        x, y = frame.xy(np.array([s, p + offset] if along_u else [p + offset, s]))
                        _tree(scene, rng, lay, x, y)


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


def erode_labels(raw_ids: np.ndarray, radius: int = EROSION_RADIUS_PX) -> np.ndarray:
    """noBoundary version of ``[H, W]`` raw ids: pixels within ``radius`` px of another class -> 0."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    kernel = (x * x + y * y <= radius * radius).astype(np.uint8)
    border = cv2.dilate(raw_ids, kernel) != cv2.erode(raw_ids, kernel)
    return np.where(border, 0, raw_ids).astype(np.uint8)


def tile_rng(seed: int, dataset: str, tile: str) -> np.random.Generator:
    """Generator of one tile, independent of which other tiles are made (small is a subset of demo)."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), zlib.crc32(tile.encode())])


def make_tile(
    spec: DomainSpec, tile: str, seed: int, look: Look | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic tile: bands ``[H, W, 4]`` uint8 (B, G, R, NIR) and raw ids ``[H, W]`` uint8 (1..6)."""
    rng = tile_rng(seed, spec.dataset.name, tile)
    jitter = spec.tile_jitter_px
    height, width = (size + (int(rng.integers(-jitter, jitter + 1)) if jitter else 0) for size in spec.tile_px)
    scene = build_scene(spec, height, width, rng)
    return render(scene, look or spec.look, rng), scene.labels()


def _zip_entry(name: str) -> zipfile.ZipInfo:
    # A fixed timestamp keeps the zips byte-identical across runs with the same seed.
    info = zipfile.ZipInfo(name, date_time=(2016, 1, 1, 0, 0, 0))
    info.external_attr = (0o40755 << 16) | 0x10 if name.endswith("/") else 0o644 << 16
    info.compress_type = zipfile.ZIP_STORED if name.endswith("/") else zipfile.ZIP_DEFLATED
    return info


def _tif(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".tif", array)
    if not ok:
        raise OSError("cv2 could not encode a TIFF")
    return encoded.tobytes()


def _write_zip(path: Path, members: dict[str, bytes]) -> None:
    folders = sorted({name.rsplit("/", 1)[0] + "/" for name in members if "/" in name})
    with zipfile.ZipFile(path, "w") as archive:
        for folder in folders:
            archive.writestr(_zip_entry(folder), b"")
        for name, data in members.items():
            archive.writestr(_zip_entry(name), data, compresslevel=1)


def _tiles(dataset: str, size: str) -> dict[str, tuple[str, ...]]:
    counts = SIZES[size]
    return {split: TILE_IDS[dataset][split][: counts[split]] for split in ("train", "val")}


def _world_file(gsd: float, tile: str) -> bytes:
    east, north = 366000 + 600 * zlib.crc32(tile.encode()) % 10, 5808000
    return f"{gsd:.10f}\n0.0\n0.0\n{-gsd:.10f}\n{east}.0\n{north}.0\n".encode()


def _label_tif(raw_ids: np.ndarray) -> bytes:
    # ISPRS labels are RGB colour files; cv2 writes its BGR array as RGB.
    return _tif(np.ascontiguousarray(encode_label(raw_ids)[..., ::-1]))


def _write_full_labels(folder: Path, dataset: IsprsDataset, raw_ids: dict[str, np.ndarray]) -> None:
    """The complete ground truth (no eroded borders) of every tile, as its official zip holds it."""
    members = {dataset.label_member_name(tile, "full"): _label_tif(ids) for tile, ids in raw_ids.items()}
    _write_zip(folder / dataset.label_zip_name("full"), members)


def write_raw(out: Path, seed: int = 0, size: str = "small", domain_gap: float = DOMAIN_GAP) -> dict[str, Path]:
    """Fake ISPRS downloads in ``out/potsdam`` and ``out/vaihingen`` (official zip names and members)."""
    marker = json.dumps(
        {"generator": "data.synthetic", "seed": seed, "size": size, "domain_gap": domain_gap,
         "note": "synthetic ISPRS-like data, not real imagery"}, indent=2
    ).encode()
    paths = {}
    for spec, look in ((SOURCE, SOURCE.look), (TARGET, target_look(domain_gap))):
        dataset = spec.dataset
        images: dict[str, dict[str, bytes]] = {bands: {} for bands in dataset.bands}
        labels: dict[str, bytes] = {}
        full: dict[str, np.ndarray] = {}
        for split, tiles in _tiles(dataset.name, size).items():
            for tile in tiles:
                bands4, raw_ids = make_tile(spec, tile, seed, look)
                full[tile] = raw_ids
                for bands, members in images.items():
                    name = dataset.image_member_name(bands, tile)
                    members[name] = _tif(np.ascontiguousarray(bands4[..., BGR_ORDER[bands]]))
                    if dataset is POTSDAM:
                        members[name[:-4] + ".tfw"] = _world_file(spec.gsd_m, tile)
                    elif split == "train":
                        # The real image zip also ships the full (not eroded) labels of the training areas.
                        members[f"gts_for_participants/top_mosaic_09cm_{tile}.tif"] = _label_tif(raw_ids)
                labels[dataset.label_member_name(tile)] = _label_tif(erode_labels(raw_ids))
        if dataset is VAIHINGEN:
            # The real eroded-GT zip also holds area9, which has no image; mmseg (and prepare) drop it.
            first = dataset.label_member_name(TILE_IDS["vaihingen"]["train"][0])
            labels[dataset.label_member_name("area9")] = labels[first]
        folder = out / dataset.name
        folder.mkdir(parents=True)
        for bands, members in images.items():
            _write_zip(folder / dataset.image_zips[bands], members)
        _write_zip(folder / dataset.label_zip, labels)
        _write_full_labels(folder, dataset, full)
        (folder / SYNTHETIC_MARKER).write_bytes(marker)
        paths[dataset.name] = folder
    return paths


def _replace(staged: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    staged.rename(target)


def make_synthetic(
    out: Path,
    mode: str = "prepared",
    seed: int = 0,
    size: str = "small",
    overwrite: bool = False,
    domain_gap: float = DOMAIN_GAP,
) -> dict[str, Path]:
    """Write the synthetic data set under ``out``; returns the folders written by name.

    ``raw``: ``out/potsdam`` and ``out/vaihingen`` with fake official zips (run tools/prepare_isprs.py on
    them). ``prepared``: ``out/potsdam_rgb``, ``out/potsdam_irrg``, ``out/vaihingen_irrg`` exactly as the
    preparation tool writes them from those zips. Existing folders are replaced only with ``overwrite``.
    """
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; use one of {list(MODES)}")
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; use one of {sorted(SIZES)}")
    out = check_output_folder(out, "--out")
    names = ["potsdam", "vaihingen"] if mode == "raw" else [f"{d}_{b}" for d, b in PREPARED_DOMAINS]
    for name in names:
        check_output_folder(out / name, "--out", overwrite)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".synthetic-", dir=out) as staging:
        staging = Path(staging)
        raw = write_raw(staging / "raw", seed, size, domain_gap)
        staged = raw
        if mode == "prepared":
            staged = {}
            for dataset, bands in PREPARED_DOMAINS:
                staged[f"{dataset}_{bands}"] = staging / f"{dataset}_{bands}"
                prepare_isprs(dataset, bands, raw[dataset], staged[f"{dataset}_{bands}"], verbose=False)
        for name, path in staged.items():
            _replace(path, out / name)
    return {name: out / name for name in names}
