"""What the project knows about the raw ISPRS Potsdam / Vaihingen downloads.

Palette, class names, the MMSegmentation train/val split, file-name patterns inside the official zips,
ground sampling distances, the crop grid of MMSegmentation's converters
(``tools/dataset_converters/{potsdam,vaihingen}.py``), patch names and label colour decoding.
Label ids come in two formats: ``mmseg_raw`` (0 = eroded boundary, 1..6 = classes) and ``train_ids``
(0..5 = classes, 255 = ignore).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255

# RGB colour of each raw id; 0 is the black boundary that the noBoundary labels paint over class borders.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
)
RAW_CLASS_NAMES: tuple[str, ...] = (
    "boundary",
    "impervious_surface",
    "building",
    "low_vegetation",
    "tree",
    "car",
    "clutter",
)
CLASS_NAMES: tuple[str, ...] = RAW_CLASS_NAMES[1:]
NUM_CLASSES = len(CLASS_NAMES)

LABEL_FORMATS = ("mmseg_raw", "train_ids")
# Which ground truth a prepared folder holds: the eroded (noBoundary) labels that mmseg and the benchmark
# use, with class borders set to 0, or the complete (full) labels, which have no ignored pixel.
LABEL_KINDS = ("eroded", "full")
GRIDS = ("mmseg", "sliding", "inside")

# Written by the synthetic generator into each fake raw folder, so prepared data can say it is not real.
SYNTHETIC_MARKER = "NAPG_SYNTHETIC.json"


@dataclass(frozen=True)
class IsprsDataset:
    """Names, patterns and splits of one ISPRS benchmark as downloaded.

    Patterns match the member path inside a zip (or the path below the raw folder, ``/``-separated) and
    capture the tile id pieces, which are joined with ``_`` ("2_10", "area1").
    """

    name: str
    gsd_m: float
    tile_placeholder: str
    bands: dict[str, tuple[str, ...]]
    image_zips: dict[str, str]
    image_patterns: dict[str, re.Pattern[str]]
    image_members: dict[str, str]
    label_zip: str
    label_pattern: re.Pattern[str]
    label_member: str
    full_label_zip: str
    full_label_pattern: re.Pattern[str]
    full_label_member: str
    splits: dict[str, tuple[str, ...]]
    dropped_tiles: frozenset[str]
    mmseg_counts: dict[str, int]

    def image_pattern_text(self, bands: str) -> str:
        """Human-readable image member pattern, e.g. ``2_Ortho_RGB/top_potsdam_{i}_{j}_RGB.tif``."""
        return self.image_member_name(bands, self.tile_placeholder)

    def label_pattern_text(self, labels: str = "eroded") -> str:
        """Human-readable label member pattern of ``labels`` ("eroded" or "full")."""
        return self.label_member_name(self.tile_placeholder, labels)

    def label_zip_name(self, labels: str = "eroded") -> str:
        """Official zip of the ``labels`` ground truth."""
        return self.full_label_zip if labels == "full" else self.label_zip

    def image_tile(self, bands: str, member: str) -> str | None:
        """Tile id of an image member for ``bands``, or None if the name does not match."""
        return _tile_of(self.image_patterns[bands], member)

    def label_tile(self, member: str, labels: str = "eroded") -> str | None:
        """Tile id of a label member of ``labels`` (noBoundary or full), or None if the name does not match."""
        return _tile_of(self.full_label_pattern if labels == "full" else self.label_pattern, member)

    def image_member_name(self, bands: str, tile: str) -> str:
        """Path of a tile's image inside the official zip (used by the synthetic generator)."""
        return self.image_members[bands].format(tile=tile)

    def label_member_name(self, tile: str, labels: str = "eroded") -> str:
        """Path of a tile's noBoundary (or full) label inside the official zip."""
        return (self.full_label_member if labels == "full" else self.label_member).format(tile=tile)

    def split_of(self, tile: str) -> str:
        """'train' for the mmseg train tiles, 'val' for everything else (what the converters do)."""
        return "train" if tile in self.splits["train"] else "val"

    def domain_name(self, bands: str) -> str:
        """Folder/domain name, e.g. ``potsdam_rgb``."""
        return f"{self.name}_{bands}"


def _tile_of(pattern: re.Pattern[str], member: str) -> str | None:
    match = pattern.search(member.replace("\\", "/"))
    return "_".join(match.groups()) if match else None


POTSDAM = IsprsDataset(
    name="potsdam",
    gsd_m=0.05,
    tile_placeholder="{i}_{j}",
    bands={"rgb": ("R", "G", "B"), "irrg": ("NIR", "R", "G")},
    image_zips={"rgb": "2_Ortho_RGB.zip", "irrg": "3_Ortho_IRRG.zip"},
    image_patterns={
        "rgb": re.compile(r"(?:^|/)top_potsdam_(\d+)_(\d+)_RGB\.tif$"),
        "irrg": re.compile(r"(?:^|/)top_potsdam_(\d+)_(\d+)_IRRG\.tif$"),
    },
    image_members={
        "rgb": "2_Ortho_RGB/top_potsdam_{tile}_RGB.tif",
        "irrg": "3_Ortho_IRRG/top_potsdam_{tile}_IRRG.tif",
    },
    label_zip="5_Labels_all_noBoundary.zip",
    label_pattern=re.compile(r"(?:^|/)top_potsdam_(\d+)_(\d+)_label_noBoundary\.tif$"),
    label_member="top_potsdam_{tile}_label_noBoundary.tif",
    full_label_zip="5_Labels_all.zip",
    full_label_pattern=re.compile(r"(?:^|/)top_potsdam_(\d+)_(\d+)_label\.tif$"),
    full_label_member="top_potsdam_{tile}_label.tif",
    splits={
        "train": (
            "2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
            "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11", "7_12", "7_7", "7_8", "7_9",
        ),
        "val": (
            "5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14", "5_13", "4_13",
            "3_14", "7_13",
        ),
    },
    dropped_tiles=frozenset(),
    mmseg_counts={"train": 3456, "val": 2016},
)

VAIHINGEN = IsprsDataset(
    name="vaihingen",
    gsd_m=0.09,
    tile_placeholder="area{N}",
    bands={"irrg": ("NIR", "R", "G")},
    image_zips={"irrg": "ISPRS_semantic_labeling_Vaihingen.zip"},
    # The image zip also holds gts_for_participants/ with the same file names, so insist on top/.
    image_patterns={"irrg": re.compile(r"(?:^|/)top/top_mosaic_09cm_(area\d+)\.tif$")},
    image_members={"irrg": "top/top_mosaic_09cm_{tile}.tif"},
    label_zip="ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip",
    label_pattern=re.compile(r"(?:^|/)top_mosaic_09cm_(area\d+)_noBoundary\.tif$"),
    label_member="top_mosaic_09cm_{tile}_noBoundary.tif",
    full_label_zip="ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip",
    # The images (top/) and the image zip's training labels (gts_for_participants/) have the same file
    # names; only the complete ground truth counts.
    full_label_pattern=re.compile(r"^(?!(?:.*/)?(?:top|gts_for_participants)/[^/]*$)(?:.*/)?top_mosaic_09cm_"
                                  r"(area\d+)\.tif$"),
    full_label_member="top_mosaic_09cm_{tile}.tif",
    splits={
        "train": tuple(f"area{n}" for n in (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)),
        "val": tuple(
            f"area{n}" for n in (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)
        ),
    },
    # mmseg's converter deletes the area9 ground truth, which has no image in the benchmark split.
    dropped_tiles=frozenset({"area9"}),
    mmseg_counts={"train": 344, "val": 398},
)

DATASETS: dict[str, IsprsDataset] = {"potsdam": POTSDAM, "vaihingen": VAIHINGEN}


@dataclass(frozen=True)
class Protocol:
    """How a published protocol cuts and splits the benchmarks: its grid and stride per data set, and the
    val tiles of the data sets whose split differs from MMSegmentation's (every other labelled tile is train)."""

    name: str
    source: str  # where its numbers and lists come from
    grid: dict[str, str]
    stride: dict[str, int | None]  # None: --stride (default clip // 2)
    clip: int | None = None  # the only patch side it defines (None: --clip)
    val_tiles: dict[str, tuple[str, ...]] | None = None

    def split_of(self, spec: IsprsDataset, tile: str) -> str:
        if self.val_tiles and spec.name in self.val_tiles:
            return "val" if tile in self.val_tiles[spec.name] else "train"
        return spec.split_of(tile)


PROTOCOLS: dict[str, Protocol] = {
    "mmseg": Protocol("mmseg", "MMSegmentation's potsdam.py / vaihingen.py converters (this project's default)",
                      grid={"potsdam": "mmseg", "vaihingen": "mmseg"}, stride={"potsdam": None, "vaihingen": None}),
    # ST-DASegNet (JAG 2024; github.com/cv516Buaa/ST-DASegNet, data/ lists): 512-px patches inside the tile
    # (no patch flush with the far edge), Potsdam every 512 px on mmseg's tile split (2,904 / 1,694),
    # Vaihingen every 256 px with its own area split (1,296 / 440).
    "st-dasegnet": Protocol(
        "st-dasegnet", "ST-DASegNet (JAG 2024): the patch lists of its repository's data/ folder",
        grid={"potsdam": "inside", "vaihingen": "inside"}, stride={"potsdam": 512, "vaihingen": 256}, clip=512,
        val_tiles={"vaihingen": tuple(f"area{n}" for n in (2, 5, 7, 8, 13, 20, 22, 24))}),
}


def crop_boxes(
    height: int, width: int, clip: int = 512, grid: str = "mmseg", stride: int = 256
) -> list[tuple[int, int, int, int]]:
    """Crop boxes ``(x0, y0, x1, y1)`` of a ``height x width`` tile, row by row.

    ``mmseg`` reproduces the converters exactly: the number of boxes per axis comes from ``stride`` but
    the origins step by ``clip``, boxes past the edge are snapped back to the border, and duplicates
    (which the converters overwrite) are removed. For ``stride <= clip`` that is a non-overlapping grid
    plus a last row/column flush with the edge; a larger stride leaves the far part of the tile uncovered,
    as in mmseg. ``sliding`` places origins every ``stride`` pixels, plus one flush with the edge;
    ``inside`` only every ``stride`` pixels, so the far strip narrower than a stride is left out (ST-DASegNet).
    """
    if clip <= 0 or stride <= 0:
        raise ValueError(f"clip and stride must be positive, got clip={clip}, stride={stride}")
    if height < clip or width < clip:
        raise ValueError(f"a {width}x{height} tile is smaller than the {clip} px crop")
    if grid == "mmseg":
        ys, xs = _mmseg_origins(height, clip, stride), _mmseg_origins(width, clip, stride)
    elif grid == "sliding":
        ys, xs = _sliding_origins(height, clip, stride), _sliding_origins(width, clip, stride)
    elif grid == "inside":
        ys, xs = (list(range(0, size - clip + 1, stride)) for size in (height, width))
    else:
        raise ValueError(f"unknown grid {grid!r}; use one of {GRIDS}")
    return [(x, y, x + clip, y + clip) for y in ys for x in xs]


def _mmseg_origins(size: int, clip: int, stride: int) -> list[int]:
    steps = math.ceil((size - clip) / stride)
    if steps * stride + clip < size:
        steps += 1
    origins = [min(k * clip, size - clip) for k in range(steps + 1)]
    return list(dict.fromkeys(origins))


def _sliding_origins(size: int, clip: int, stride: int) -> list[int]:
    origins = list(range(0, size - clip + 1, stride))
    if origins[-1] != size - clip:
        origins.append(size - clip)
    return origins


def patch_name(tile: str, box: tuple[int, int, int, int]) -> str:
    """``{tile}_{x0}_{y0}_{x1}_{y1}.png``: ``2_10_0_0_512_512.png`` or ``area1_0_0_512_512.png``."""
    x0, y0, x1, y1 = box
    return f"{tile}_{x0}_{y0}_{x1}_{y1}.png"


# mmseg matches colours by the weighted sum 2*B + 3*G + 4*R (cv2's BGR order); the seven palette sums are
# distinct, so a table indexed by the sum reproduces its per-colour loop, off-palette collisions included.
_SUM_WEIGHTS_BGR = (2, 3, 4)
_PALETTE_BGR = np.array([colour[::-1] for colour in PALETTE], dtype=np.uint8)


def _sum_to_id_table() -> np.ndarray:
    table = np.zeros(255 * sum(_SUM_WEIGHTS_BGR) + 1, dtype=np.uint8)
    for raw_id, bgr in enumerate(_PALETTE_BGR):
        table[int(np.dot(bgr.astype(np.int64), _SUM_WEIGHTS_BGR))] = raw_id
    return table


_SUM_TO_ID = _sum_to_id_table()


def decode_label(label_bgr: np.ndarray, strict: bool = False) -> tuple[np.ndarray, int]:
    """ISPRS colour label ``[H, W, 3]`` uint8 in cv2's BGR order -> raw ids ``[H, W]`` uint8 (0..6).

    Default: MMSegmentation's weighted-sum match, so off-palette pixels whose sum equals a palette
    colour's get that class, all others 0, exactly as the converters write them. ``strict``: only exact
    palette colours are decoded, everything else becomes 0. Returns the ids and the number of
    off-palette pixels (counted the same way in both modes).
    """
    if label_bgr.ndim != 3 or label_bgr.shape[2] != 3 or label_bgr.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 BGR label, got {label_bgr.shape} {label_bgr.dtype}")
    wide = label_bgr.astype(np.uint16)
    weighted = wide[..., 0] * 2 + wide[..., 1] * 3 + wide[..., 2] * 4
    ids = _SUM_TO_ID[weighted]
    exact = np.all(_PALETTE_BGR[ids] == label_bgr, axis=-1)
    off_palette = int(exact.size - np.count_nonzero(exact))
    if strict and off_palette:
        ids[~exact] = 0
    return ids, off_palette


def encode_label(raw_ids: np.ndarray) -> np.ndarray:
    """Raw ids ``[H, W]`` (0..6) -> ISPRS colour label ``[H, W, 3]`` uint8 in RGB order."""
    return np.asarray(PALETTE, dtype=np.uint8)[raw_ids]


_RAW_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_RAW_TO_TRAIN[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)


def raw_to_train_ids(raw_ids: np.ndarray) -> np.ndarray:
    """mmseg raw ids -> training ids (``reduce_zero_label``): 0 -> 255, k -> k-1; ``[H, W]`` uint8."""
    return _RAW_TO_TRAIN[raw_ids]
