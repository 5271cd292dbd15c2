"""The scene model of a synthetic tile: materials, a domain's layout statistics, and the street grid,
buildings, trees, cars and clutter laid out in metres and rasterised into an instance map."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

Vec4 = tuple[float, float, float, float]  # reflectance or gain per band, order (B, G, R, NIR)

# Raw ids (mmseg_raw) of the classes drawn.
IMPERVIOUS, BUILDING, LOW_VEG, TREE, CAR, CLUTTER = 1, 2, 3, 4, 5, 6

# Materials: class, texture and height of each kind of surface.
GROUND, ROAD, MARKING, GRASS, ROOF, TREE_CANOPY, CAR_BODY, CAR_GLASS, CLUTTER_BLOB = range(9)
MATERIAL_CLASS = np.array([IMPERVIOUS, IMPERVIOUS, IMPERVIOUS, LOW_VEG, BUILDING, TREE, CAR, CAR, CLUTTER])
# The classes an annotator may give an instance of a material instead (label noise): a tree taken for
# shrubs (low vegetation), a roof for paving (a terrace, a parking deck), clutter for paving or grass.
# Ground, roads and grass span whole tiles and are never flipped.
MISLABEL_AS = {TREE_CANOPY: (LOW_VEG,), ROOF: (IMPERVIOUS,), CLUTTER_BLOB: (IMPERVIOUS, LOW_VEG)}


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

    def noisy_labels(self, rng: np.random.Generator, mislabel: float, jitter_m: float) -> np.ndarray:
        """Raw class ids ``[H, W]`` as an annotator draws them: each tree, roof or clutter instance takes a
        confusable class with probability ``mislabel``, and the borders wander by about ``jitter_m``
        metres (a smooth displacement of the whole map, nearest-neighbour resampled)."""
        materials = np.array([a["material"] for a in self.attrs])
        per_instance = MATERIAL_CLASS[materials].astype(np.uint8)
        flip = rng.random(len(materials)) < mislabel
        for i in np.nonzero(flip)[0]:
            choices = MISLABEL_AS.get(int(materials[i]))
            if choices:
                per_instance[i] = choices[rng.integers(len(choices))]
        labels = per_instance[self.inst]
        if jitter_m <= 0:
            return labels
        # Displacements vary over a few metres, so neighbouring border pixels move together.
        dx, dy = (jitter_m / self.gsd * smooth_noise(rng, self.height, self.width, 3.0 / self.gsd) for _ in "xy")
        cols, rows = np.meshgrid(np.arange(self.width, dtype=np.float32), np.arange(self.height, dtype=np.float32))
        return cv2.remap(labels, cols + dx, rows + dy, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)


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


def build_scene(lay: Layout, gsd: float, height: int, width: int, rng: np.random.Generator) -> Scene:
    """Lay out one tile of the scene model ``lay`` at ``gsd`` metres per pixel."""
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
