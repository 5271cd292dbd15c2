"""Conversion of the official ISPRS Potsdam / Vaihingen downloads into the MMSegmentation layout.

The library behind ``tools/prepare_isprs.py`` (and the synthetic data set, which writes fake official
zips and converts them the same way). RAW holds the zips (2_Ortho_RGB.zip, 3_Ortho_IRRG.zip,
5_Labels_all_noBoundary.zip; or ISPRS_semantic_labeling_Vaihingen.zip and
..._ground_truth_eroded_COMPLETE.zip) or their extracted contents; zips are read in place.
``labels="full"`` reads the complete ground truth instead (5_Labels_all.zip;
..._ground_truth_COMPLETE.zip), which has no boundary (0) pixels. With the defaults the output equals
what MMSegmentation's converters write, file for file and pixel for pixel: OUT/img_dir/{train,val}/*.png,
OUT/ann_dir/{train,val}/*.png (raw ids 0..6), plus OUT/meta.json. The output is built in a hidden sibling
folder and renamed into place at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from data.isprs import (
    DATASETS,
    GRIDS,
    LABEL_FORMATS,
    LABEL_KINDS,
    PROTOCOLS,
    RAW_CLASS_NAMES,
    SYNTHETIC_MARKER,
    IsprsDataset,
    crop_boxes,
    decode_label,
    patch_name,
    raw_to_train_ids,
)
from utils.errors import UserError
from utils.paths import check_output_folder
from utils.publish import publish_dir

TOOL_NAME = "prepare_isprs"
TOOL_VERSION = "1.0"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class RawFile:
    """One raw TIFF: a member of a zip (``member`` set) or a plain file below the raw folder."""

    path: Path
    member: str | None = None

    def read(self) -> bytes:
        """The file's bytes, read straight from the zip when it is a member."""
        if self.member is None:
            return self.path.read_bytes()
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(self.member)

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member is not None else str(self.path)


@dataclass(frozen=True)
class TileJob:
    """Everything one worker needs to cut one tile into patches."""

    tile: str
    split: str
    image: RawFile
    label: RawFile
    out: Path
    clip: int
    grid: str
    stride: int
    scale: float
    strict_colors: bool
    label_format: str


@dataclass(frozen=True)
class TileResult:
    """What a worker wrote: tile size after resampling, patch count, raw-id histogram, colour noise."""

    tile: str
    split: str
    height: int
    width: int
    patches: int
    histogram: tuple[int, ...]
    off_palette: int


def _unsafe_member(name: str) -> bool:
    path = name.replace("\\", "/")
    return path.startswith("/") or re.match(r"^[A-Za-z]:", path) is not None or ".." in path.split("/")


def _zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path} is not a readable zip ({err}); download it again") from None
    for name in names:
        if _unsafe_member(name):
            raise UserError(
                f"{path} holds member {name!r} whose path leaves its folder (absolute or '..'); "
                "refusing to use this zip"
            )
    return [name for name in names if not name.endswith("/")]


def _add_unique(found: dict[str, RawFile], tile: str, raw: RawFile, what: str) -> None:
    if tile in found:
        raise UserError(f"{what} of tile {tile} found twice: {found[tile]} and {raw}; keep only one copy")
    found[tile] = raw


def find_tiles(
    spec: IsprsDataset, bands: str, raw: Path, labels_kind: str = "eroded"
) -> tuple[dict[str, RawFile], dict[str, RawFile], list[str]]:
    """Image and ``labels_kind`` label (noBoundary or full) of every tile in ``raw`` (zips first, then
    extracted files).

    Returns ``(images, labels, notes)``; both dicts are keyed by tile id, with dropped tiles removed.
    """
    if not raw.is_dir():
        raise UserError(
            f"raw folder {raw} does not exist; pass --raw the folder holding "
            f"{spec.image_zips[bands]} and {spec.label_zip_name(labels_kind)} (or their extracted contents)"
        )
    images: dict[str, RawFile] = {}
    labels: dict[str, RawFile] = {}
    notes: list[str] = []
    for zip_path in sorted(p for p in raw.rglob("*.zip") if p.is_file()):
        n_images = n_labels = 0
        for member in _zip_members(zip_path):
            if (tile := spec.image_tile(bands, member)) is not None:
                _add_unique(images, tile, RawFile(zip_path, member), "image")
                n_images += 1
            elif (tile := spec.label_tile(member, labels_kind)) is not None:
                _add_unique(labels, tile, RawFile(zip_path, member), "label")
                n_labels += 1
        if zip_path.name == spec.image_zips[bands] and n_images == 0:
            raise UserError(
                f"{zip_path} holds no member named like {spec.image_pattern_text(bands)}; "
                "is it the complete official download?"
            )
        if zip_path.name == spec.label_zip_name(labels_kind) and n_labels == 0:
            raise UserError(
                f"{zip_path} holds no member named like {spec.label_pattern_text(labels_kind)}; "
                "is it the complete official download?"
            )
    from_zips = (set(images), set(labels))
    duplicates = 0
    for path in sorted(p for p in raw.rglob("*.tif") if p.is_file()):
        relative = path.relative_to(raw).as_posix()
        for found, tile, in_zip, what in (
            (images, spec.image_tile(bands, relative), from_zips[0], "image"),
            (labels, spec.label_tile(relative, labels_kind), from_zips[1], "label"),
        ):
            if tile is None:
                continue
            if tile in in_zip:
                duplicates += 1
            else:
                _add_unique(found, tile, RawFile(path), what)
    if duplicates:
        notes.append(f"note: read {duplicates} tiles from the zips and ignored their extracted copies")
    dropped = sorted(spec.dropped_tiles & (set(images) | set(labels)))
    for tile in dropped:
        images.pop(tile, None)
        labels.pop(tile, None)
    if dropped:
        notes.append(f"note: dropped {', '.join(dropped)} (not in the benchmark split, as mmseg does)")
    if not images:
        raise UserError(
            f"no {spec.name} {bands.upper()} images ({spec.image_pattern_text(bands)}) in {raw}; "
            f"put {spec.image_zips[bands]} or its extracted contents there"
        )
    if not labels:
        raise UserError(
            f"no {spec.name} {labels_kind} labels ({spec.label_pattern_text(labels_kind)}) in {raw}; "
            f"put {spec.label_zip_name(labels_kind)} or its extracted contents there"
        )
    return images, labels, notes


def decode_raw(raw: RawFile) -> np.ndarray:
    # IMREAD_COLOR as mmcv.imread does: 3-channel BGR uint8, written back as BGR so slot order survives.
    image = cv2.imdecode(np.frombuffer(raw.read(), dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot decode {raw} as an image; the file is damaged, download it again")
    return image


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise OSError(f"cv2 could not encode {path}")
    path.write_bytes(encoded.tobytes())


def convert_tile(job: TileJob) -> TileResult:
    """Decode one tile's image and label, resample if asked, and write every crop of the grid as PNG."""
    image = decode_raw(job.image)
    label_bgr = decode_raw(job.label)
    if image.shape[:2] != label_bgr.shape[:2]:
        raise UserError(
            f"label {job.label} is {label_bgr.shape[1]}x{label_bgr.shape[0]} px but image {job.image} is "
            f"{image.shape[1]}x{image.shape[0]} px; the label does not belong to this image"
        )
    raw_ids, off_palette = decode_label(label_bgr, strict=job.strict_colors)
    del label_bgr
    if job.scale != 1.0:
        size = (round(image.shape[1] * job.scale), round(image.shape[0] * job.scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        # Nearest on the decoded ids: interpolating colours would invent off-palette labels.
        raw_ids = cv2.resize(raw_ids, size, interpolation=cv2.INTER_NEAREST)
    height, width = raw_ids.shape
    try:
        boxes = crop_boxes(height, width, job.clip, job.grid, job.stride)
    except ValueError as err:
        raise UserError(f"tile {job.tile}: {err}; choose a smaller --clip") from None
    stored = raw_ids if job.label_format == "mmseg_raw" else raw_to_train_ids(raw_ids)
    histogram = np.zeros(len(RAW_CLASS_NAMES), dtype=np.int64)
    for box in boxes:
        x0, y0, x1, y1 = box
        name = patch_name(job.tile, box)
        _write_png(job.out / "img_dir" / job.split / name, image[y0:y1, x0:x1])
        _write_png(job.out / "ann_dir" / job.split / name, stored[y0:y1, x0:x1])
        histogram += np.bincount(raw_ids[y0:y1, x0:x1].ravel(), minlength=len(RAW_CLASS_NAMES))
    return TileResult(
        job.tile, job.split, height, width, len(boxes), tuple(int(v) for v in histogram), off_palette
    )


def _run_jobs(jobs: list[TileJob], workers: int, desc: str, progress: bool) -> list[TileResult]:
    results = []
    with tqdm(total=len(jobs), desc=desc, unit="tile", disable=not progress) as bar:
        try:
            if workers == 1 or len(jobs) == 1:
                for job in jobs:
                    results.append(convert_tile(job))
                    bar.update()
            else:
                # Not fork: this process may run threads (tqdm, torch) that a fork copies unsafely. A fork
                # server is a fresh process that imports this module once and forks the workers from it.
                forkserver = "forkserver" in multiprocessing.get_all_start_methods()
                context = multiprocessing.get_context("forkserver" if forkserver else "spawn")
                if forkserver:
                    context.set_forkserver_preload([convert_tile.__module__])
                with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
                    futures = [pool.submit(convert_tile, job) for job in jobs]
                    try:
                        for future in as_completed(futures):
                            results.append(future.result())
                            bar.update()
                    finally:
                        for future in futures:
                            future.cancel()
        except BaseException:
            bar.leave = False  # erase the bar so that a failed run shows only its error line
            raise
    return results


def _check_output(raw: Path, out: Path, overwrite: bool) -> None:
    raw_abs, out_abs = raw.resolve(), out.resolve()
    if out_abs == raw_abs or out_abs in raw_abs.parents:
        raise UserError(f"--out {out} is or contains the raw folder {raw}; choose another output folder")
    check_output_folder(out, "--out", overwrite)


def _histogram(results: list[TileResult], split: str) -> dict[str, int]:
    total = np.zeros(len(RAW_CLASS_NAMES), dtype=np.int64)
    for result in results:
        if result.split == split:
            total += result.histogram
    return dict(zip(RAW_CLASS_NAMES, total.tolist()))


def _stored_values(histogram: dict[str, int], label_format: str) -> list[int]:
    """The values the label files of a split hold (what data/checks.py reads instead of decoding them)."""
    raw = np.array([i for i, count in enumerate(histogram.values()) if count], dtype=np.uint8)
    stored = raw if label_format == "mmseg_raw" else raw_to_train_ids(raw)
    return sorted(set(stored.tolist()))


def _check_counts(staging: Path, spec: IsprsDataset, meta: dict, results: list[TileResult]) -> list[str]:
    """Written files must equal the grid formula; returns a warning if real-data totals differ from mmseg's."""
    for split in SPLITS:
        expected = {
            patch_name(r.tile, box)
            for r in results
            if r.split == split
            for box in crop_boxes(r.height, r.width, meta["clip"], meta["grid"], meta["stride"])
        }
        images = {p.name for p in (staging / "img_dir" / split).iterdir()}
        labels = {p.name for p in (staging / "ann_dir" / split).iterdir()}
        if not images == labels == expected:
            raise RuntimeError(
                f"{split}: wrote {len(images)} images and {len(labels)} labels, the grid gives {len(expected)}"
            )
    all_tiles = all(set(spec.splits[s]) <= set(meta["splits"][s]) for s in SPLITS)
    standard = meta["clip"] == 512 and meta["grid"] == "mmseg" and meta["scale"] == 1.0
    if all_tiles and standard and not meta["synthetic"] and meta["counts"] != spec.mmseg_counts:
        return [f"warning: patch counts {meta['counts']} differ from mmseg's documented {spec.mmseg_counts}"]
    return []


def prepare_isprs(
    dataset: str,
    bands: str,
    raw: Path,
    out: Path,
    *,
    overwrite: bool = False,
    clip: int = 512,
    grid: str = "mmseg",
    stride: int | None = None,
    target_gsd: float | None = None,
    strict_colors: bool = False,
    label_format: str = "mmseg_raw",
    labels: str = "eroded",
    workers: int = 1,
    verbose: bool = True,
    protocol: str = "mmseg",
) -> dict:
    """Cut one ISPRS dataset/band combination into patches under ``out``; returns the meta.json dict.

    ``stride`` defaults to ``clip // 2`` (mmseg's 256 for 512). ``target_gsd`` resamples each tile by
    native/target GSD before cropping. ``labels`` picks the eroded (noBoundary) or the full ground truth.
    ``protocol`` (``PROTOCOLS``) other than mmseg sets the grid, stride, clip and split of a published
    protocol. ``verbose`` shows the progress bar and notes on stderr.
    """
    spec = DATASETS.get(dataset)
    if spec is None:
        raise UserError(f"unknown dataset {dataset!r}; use one of {sorted(DATASETS)}")
    proto = PROTOCOLS.get(protocol)
    if proto is None:
        raise UserError(f"unknown protocol {protocol!r}; use one of {sorted(PROTOCOLS)}")
    if protocol != "mmseg":
        if grid != "mmseg" or stride is not None or (proto.clip is not None and clip != proto.clip):
            raise UserError(f"--protocol {protocol} sets the grid, stride and clip ({proto.grid[dataset]}, "
                            f"{proto.stride[dataset]}, {proto.clip}); drop --grid, --stride and --clip")
        grid, stride = proto.grid[dataset], proto.stride[dataset]
    if bands not in spec.bands:
        raise UserError(f"{dataset} is available as {sorted(spec.bands)}, not {bands!r}")
    if grid not in GRIDS:
        raise UserError(f"unknown grid {grid!r}; use one of {list(GRIDS)}")
    if label_format not in LABEL_FORMATS:
        raise UserError(f"unknown label format {label_format!r}; use one of {list(LABEL_FORMATS)}")
    if labels not in LABEL_KINDS:
        raise UserError(f"unknown labels {labels!r}; use one of {list(LABEL_KINDS)}")
    stride = max(1, clip // 2) if stride is None else stride
    if clip <= 0 or stride <= 0 or workers <= 0:
        raise UserError(f"--clip, --stride and --workers must be positive (got {clip}, {stride}, {workers})")
    gsd = spec.gsd_m if target_gsd is None else target_gsd
    if gsd < spec.gsd_m:
        raise UserError(f"--target-gsd {gsd} is finer than {dataset}'s native {spec.gsd_m} m; only downsampling")
    scale = spec.gsd_m / gsd
    raw, out = Path(raw), Path(out)
    _check_output(raw, out, overwrite)
    images, label_files, notes = find_tiles(spec, bands, raw, labels)
    if missing := sorted(set(images) - set(label_files)):
        raise UserError(
            f"no label for image tile(s) {', '.join(missing)} (expected {spec.label_pattern_text(labels)})"
        )
    if missing := sorted(set(label_files) - set(images)):
        raise UserError(
            f"no image for label tile(s) {', '.join(missing)} (expected {spec.image_pattern_text(bands)})"
        )
    known = set(spec.splits["train"]) | set(spec.splits["val"])
    if (unknown := sorted(set(images) - known)) and proto.val_tiles is None:
        notes.append(f"note: tile(s) {', '.join(unknown)} are in no mmseg split; put in val as mmseg does")
    order = {tile: k for k, tile in enumerate(spec.splits["train"] + spec.splits["val"])}
    tiles = sorted(images, key=lambda t: (order.get(t, len(order)), t))
    domain = spec.domain_name(bands) + (f"_{round(gsd * 100)}cm" if scale != 1.0 else "")
    synthetic = (raw / SYNTHETIC_MARKER).is_file()

    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        with publish_dir(out) as staging:
            for kind in ("img_dir", "ann_dir"):
                for split in SPLITS:
                    (staging / kind / split).mkdir(parents=True)
            jobs = [
                TileJob(
                    tile, proto.split_of(spec, tile), images[tile], label_files[tile], staging,
                    clip, grid, stride, scale, strict_colors, label_format,
                )
                for tile in tiles
            ]
            results = _run_jobs(jobs, workers, f"prepare {domain}", verbose)
            results.sort(key=lambda r: tiles.index(r.tile))
            meta = {
                "dataset": spec.name,
                "domain": domain,
                "bands": list(spec.bands[bands]),
                "gsd_m": gsd,
                "label_format": label_format,
                "labels": labels,
                "color_decoding": "strict" if strict_colors else "mmseg",
                "clip": clip,
                "protocol": protocol,
                "grid": grid,
                "stride": stride,
                "scale": scale,
                "splits": {s: [r.tile for r in results if r.split == s] for s in SPLITS},
                "counts": {s: sum(r.patches for r in results if r.split == s) for s in SPLITS},
                "label_histogram": {s: _histogram(results, s) for s in SPLITS},
                "label_values": {s: _stored_values(_histogram(results, s), label_format) for s in SPLITS},
                "off_palette_pixels": sum(r.off_palette for r in results),
                "synthetic": synthetic,
                "tool": TOOL_NAME,
                "version": TOOL_VERSION,
            }
            notes += _check_counts(staging, spec, meta, results)
            (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        for path in created:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
    if verbose:
        for note in notes:
            print(note, file=sys.stderr)
    return meta


def summary_lines(meta: dict) -> list[str]:
    """One line per split: tiles, patches and the label histogram in percent."""
    lines = []
    for split in SPLITS:
        histogram = meta["label_histogram"][split]
        total = max(1, sum(histogram.values()))
        classes = " ".join(f"{name}={100 * count / total:.1f}%" for name, count in histogram.items())
        lines.append(
            f"{meta['domain']} {split}: {len(meta['splits'][split])} tiles -> {meta['counts'][split]} patches"
            f" | labels {classes}"
        )
    return lines
