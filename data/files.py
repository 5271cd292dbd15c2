"""Reading a prepared domain folder's files: meta.json, split listings, images, labels and their format.

Shared by the dataset (``data/dataset.py``) and the uint8 cache (``data/cache.py``), which both build on
these readers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from data.benchmarks import benchmark_of
from data.isprs import IGNORE_INDEX, LABEL_FORMATS
from utils.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Labels must be lossless; JPEG would smear the ids.
LABEL_SUFFIXES = (".png", ".tif", ".tiff")
_SHOW = 5


@functools.cache
def _lut(label_format: str, num_classes: int) -> np.ndarray:
    """Raw file value -> train id (int64 [256]); -1 marks values the format does not allow."""
    lut = np.full(256, -1, dtype=np.int64)
    if label_format == "mmseg_raw":
        lut[0] = IGNORE_INDEX
        lut[1 : num_classes + 1] = np.arange(num_classes)
    else:
        lut[:num_classes] = np.arange(num_classes)
        lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def _allowed(label_format: str | None, num_classes: int) -> np.ndarray:
    """Values ``label_format`` allows (None: that some format allows, for a folder whose format is not known)."""
    formats = LABEL_FORMATS if label_format is None else (label_format,)
    return np.logical_or.reduce([_lut(fmt, num_classes) >= 0 for fmt in formats])


def _format_values(label_format: str, num_classes: int) -> str:
    return f"0..{num_classes}" if label_format == "mmseg_raw" else f"0..{num_classes - 1} and 255"


def _names(paths: list[str]) -> str:
    more = f", ... (+{len(paths) - _SHOW} more)" if len(paths) > _SHOW else ""
    return ", ".join(paths[:_SHOW]) + more


def read_meta(root: Path) -> dict[str, Any]:
    """``<root>/meta.json`` as a dict ({} when absent)."""
    path = root / "meta.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}; fix or delete the file") from err
    if not isinstance(meta, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(meta).__name__}")
    return meta


def list_split(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files of one split folder keyed by stem, sorted by stem."""
    if not folder.is_dir():
        siblings = sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) if folder.parent.is_dir() else []
        hint = f" (splits present: {', '.join(siblings)})" if siblings else ""
        raise UserError(f"{folder} does not exist{hint}; expected <domain>/{folder.parent.name}/<split>/*.png")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in files:
                raise UserError(f"{folder} holds two files with the stem {path.stem!r}; keep only one")
            files[path.stem] = path
    if not files:
        raise UserError(f"{folder} holds no {'/'.join(suffixes)} files; check --data-root and the split name")
    return dict(sorted(files.items()))


def pair_by_stem(images: dict[str, Path], labels: dict[str, Path], img_dir: Path, ann_dir: Path) -> list[str]:
    """The shared stems; UserError naming unpaired files when the two sets differ."""
    lonely_img = sorted(set(images) - set(labels))
    lonely_ann = sorted(set(labels) - set(images))
    if lonely_img or lonely_ann:
        parts = []
        if lonely_img:
            parts.append(f"{len(lonely_img)} image(s) in {img_dir} without a label: {_names(lonely_img)}")
        if lonely_ann:
            parts.append(f"{len(lonely_ann)} label(s) in {ann_dir} without an image: {_names(lonely_ann)}")
        raise UserError(
            "images and labels do not pair by file name ("
            + f"{len(images)} images, {len(labels)} labels): "
            + "; ".join(parts)
            + ". Remove the strays or re-run the prepare tool"
        )
    return list(images)


def read_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] in the file's slot order (R,G,B slots; NIR,R,G for IRRG data)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if bgr is None:
        raise UserError(f"cannot decode image {path}; the file is damaged or not an image")
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise UserError(
            f"{path}: expected an 8-bit 3-channel image, found dtype {bgr.dtype} with shape {bgr.shape}; "
            "convert it to 8-bit RGB (the prepare tool writes such PNGs)"
        )
    return bgr[:, :, ::-1]


LABEL_MODES = ("L", "P")  # Pillow's modes of single-channel 8-bit images (grey and paletted)


def check_label_mode(path: Path, mode: str) -> None:
    """UserError unless ``mode`` (Pillow's) is one of a single-channel 8-bit label image."""
    if mode not in LABEL_MODES:
        raise UserError(
            f"{path}: expected a single-channel 8-bit label image, found mode {mode}; colour-coded "
            "ISPRS labels must be converted to ids first (tools/prepare_isprs.py)"
        )


def read_label(path: Path) -> np.ndarray:
    """uint8 [H, W] ids as stored (Pillow keeps palette indices, which OpenCV would expand to colours)."""
    try:
        with Image.open(path) as im:
            check_label_mode(path, im.mode)
            return np.asarray(im)
    except OSError as err:
        raise UserError(f"cannot decode label {path}: {err}") from err


def scan_label_format(ann_dir: Path, num_classes: int) -> str:
    """Infer the format from every label under ``ann_dir/*/``: the value ``num_classes`` (raw id of the last
    class) means mmseg_raw, a 255 train_ids."""
    has_last = has255 = False
    files = sorted(p for split in ann_dir.glob("*") if split.is_dir() for p in split.iterdir())
    for path in files:
        if path.suffix.lower() not in LABEL_SUFFIXES:
            continue
        counts = np.bincount(read_label(path).ravel(), minlength=256)
        has_last |= bool(counts[num_classes])
        has255 |= bool(counts[IGNORE_INDEX])
        if has_last and has255:
            break
    if has_last != has255:
        return "mmseg_raw" if has_last else "train_ids"
    found = (f"both a {num_classes} and a 255" if has_last else
             f"neither a {num_classes} (the last class in mmseg_raw) nor a 255 (ignore, train_ids)")
    raise UserError(
        f"cannot tell the label format of {ann_dir}: the labels hold {found}. Pass it explicitly "
        "(label_format / --label-format 'mmseg_raw' or 'train_ids') or set \"label_format\" in meta.json"
    )


def to_train_ids(raw: np.ndarray, label_format: str, path: Path, num_classes: int) -> np.ndarray:
    """Map stored ids to train ids (int64 [H, W], 255 = ignore); UserError on values the format forbids."""
    ids = _lut(label_format, num_classes)[raw]
    if ids.min() < 0:
        check_label_values(np.unique(raw), label_format, path, num_classes)
    return ids


def check_label_values(values: np.ndarray, label_format: str | None, where: Path, num_classes: int) -> None:
    """UserError naming ``where`` when a stored label value is not allowed in ``label_format`` (None: in
    neither format) for ``num_classes`` classes."""
    allowed = _allowed(label_format, num_classes)
    values = np.asarray(values, dtype=np.int64).ravel()
    ok = (values >= 0) & (values < allowed.size)  # values read from a meta.json may lie outside uint8
    ok[ok] = allowed[values[ok]]
    bad = np.unique(values[~ok]).tolist()
    if not bad:
        return
    if label_format is None:
        raise UserError(
            f"{where}: label value(s) {bad[:_SHOW]} are no label id of any format (mmseg_raw: "
            f"{_format_values('mmseg_raw', num_classes)}, train_ids: {_format_values('train_ids', num_classes)}); "
            "the labels must hold class ids, not colours or scaled values (re-run the prepare tool)"
        )
    raise UserError(
        f"{where}: label value(s) {bad[:_SHOW]} not allowed in label_format {label_format!r} (allowed: "
        f"{_format_values(label_format, num_classes)}); check the label format (meta.json / --label-format) or "
        f"re-run the prepare tool"
    )


def resolve_label_format(root: Path, meta: dict[str, Any], label_format: str | None, num_classes: int) -> str:
    """meta.json's ``label_format``, else the argument, else a scan of all labels; they must agree."""
    declared = meta.get("label_format")
    for source, value in (("meta.json", declared), ("label_format", label_format)):
        if value is not None and value not in LABEL_FORMATS:
            raise UserError(f"{source} gives label format {value!r}; use one of {', '.join(LABEL_FORMATS)}")
    if declared is not None and label_format is not None and declared != label_format:
        raise UserError(
            f"{root / 'meta.json'} says label_format {declared!r} but {label_format!r} was passed; "
            "drop the flag or fix meta.json"
        )
    return declared or label_format or scan_label_format(root / "ann_dir", num_classes)


def read_split(root: Path, split: str, resize: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Image ``[H, W, 3]`` uint8 and train ids ``[H, W]`` uint8 (255: ignore) of every patch of the domain
    folder ``root``'s ``split``, in stem order. ``resize`` scales both to that side as the training loaders
    do: area for the image, nearest for the labels."""
    meta = read_meta(root)
    num_classes = benchmark_of(meta).num_classes
    label_format = resolve_label_format(root, meta, None, num_classes)
    img_dir, ann_dir = root / "img_dir" / split, root / "ann_dir" / split
    images, labels = list_split(img_dir, IMAGE_SUFFIXES), list_split(ann_dir, LABEL_SUFFIXES)
    for stem in pair_by_stem(images, labels, img_dir, ann_dir):
        image = read_image(images[stem])
        label = to_train_ids(read_label(labels[stem]), label_format, labels[stem], num_classes).astype(np.uint8)
        if resize is not None:
            image = cv2.resize(image, (resize, resize), interpolation=cv2.INTER_AREA)
            label = cv2.resize(label, (resize, resize), interpolation=cv2.INTER_NEAREST)
        yield image, label
