"""The synthetic data set on disk: fake official ISPRS downloads (zips with the official names and members,
eroded noBoundary labels) and, from them, the prepared folders exactly as tools/prepare_isprs.py writes them."""

from __future__ import annotations

import json
import tempfile
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np

from data.isprs import POTSDAM, SYNTHETIC_MARKER, VAIHINGEN, IsprsDataset, encode_label
from data.prepare import prepare_isprs
from data.synthetic.pair import DOMAIN_GAP, SOURCE, TARGET, make_tile, target_look
from utils.errors import UserError
from utils.paths import check_output_folder
from utils.publish import replace_dir

EROSION_RADIUS_PX = 3  # the noBoundary labels black out pixels this close to a class border
MODES = ("raw", "prepared")
# Tiles per split and dataset, and the nominal tile size (H, W) where it is not the domain's own.
# "small" is a subset of "demo" (the same tiles). "study" uses every mmseg training tile of both data sets
# (their ids decide the split, so more training data means larger tiles, as the real 6000 px Potsdam and
# ~2000-2500 px Vaihingen tiles are): 6 x 6 and 5 x 5 patches per tile give 864 / 216 Potsdam and
# 400 / 200 Vaihingen train / val patches.
SIZES: dict[str, dict[str, dict]] = {
    "small": {"potsdam": {"train": 2, "val": 1}, "vaihingen": {"train": 2, "val": 1}},
    "demo": {"potsdam": {"train": 6, "val": 4}, "vaihingen": {"train": 6, "val": 4}},
    "study": {"potsdam": {"train": 24, "val": 6, "tile_px": (3072, 3072)},
              "vaihingen": {"train": 16, "val": 8, "tile_px": (2500, 2500)}},
}
TILE_IDS = {
    "potsdam": {"train": POTSDAM.splits["train"], "val": ("2_13", "2_14", "3_13", "3_14", "4_13", "4_14")},
    "vaihingen": {"train": VAIHINGEN.splits["train"],
                  "val": tuple(f"area{n}" for n in (2, 4, 6, 8, 10, 12, 14, 16))},
}
PREPARED_DOMAINS = (("potsdam", "rgb"), ("potsdam", "irrg"), ("vaihingen", "irrg"))
# Bands (B, G, R, NIR) in cv2's BGR array order for files whose slots are (R, G, B) or (NIR, R, G).
BGR_ORDER = {"rgb": [0, 1, 2], "irrg": [1, 2, 3]}


def erode_labels(raw_ids: np.ndarray, radius: int = EROSION_RADIUS_PX) -> np.ndarray:
    """noBoundary version of ``[H, W]`` raw ids: pixels within ``radius`` px of another class -> 0."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    kernel = (x * x + y * y <= radius * radius).astype(np.uint8)
    border = cv2.dilate(raw_ids, kernel) != cv2.erode(raw_ids, kernel)
    return np.where(border, 0, raw_ids).astype(np.uint8)


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
    counts = SIZES[size][dataset]
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
                bands4, raw_ids = make_tile(spec, tile, seed, look, SIZES[size][dataset.name].get("tile_px"))
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
            replace_dir(path, out / name)
    return {name: out / name for name in names}
