"""A prepared domain split (mmseg layout) as a torch Dataset.

Layout: ``<root>/img_dir/<split>/*.png`` (uint8, 3 channels) and ``<root>/ann_dir/<split>/*.png``
(uint8, 1 channel), paired by file stem; optional ``<root>/meta.json`` with ``label_format``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.domains import IGNORE_INDEX, NUM_CLASSES
from utils.errors import UserError

LABEL_FORMATS = ("mmseg_raw", "train_ids")
NORMALIZATIONS = ("unit", "imagenet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Labels must be lossless; JPEG would smear the ids.
LABEL_SUFFIXES = (".png", ".tif", ".tiff")
# mmseg's ImageNet statistics in 0..255 units, applied in slot order (R,G,B or NIR,R,G).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
_SHOW = 5


def _lut(label_format: str) -> np.ndarray:
    """Raw file value -> train id (int64 [256]); -1 marks values the format does not allow."""
    lut = np.full(256, -1, dtype=np.int64)
    if label_format == "mmseg_raw":
        lut[0] = IGNORE_INDEX
        lut[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES)
    else:
        lut[:NUM_CLASSES] = np.arange(NUM_CLASSES)
        lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


_LUTS = {fmt: _lut(fmt) for fmt in LABEL_FORMATS}


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


def read_label(path: Path) -> np.ndarray:
    """uint8 [H, W] ids as stored (Pillow keeps palette indices, which OpenCV would expand to colours)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise UserError(
                    f"{path}: expected a single-channel 8-bit label image, found mode {im.mode}; colour-coded "
                    "ISPRS labels must be converted to ids first (tools/prepare_isprs.py)"
                )
            return np.asarray(im)
    except OSError as err:
        raise UserError(f"cannot decode label {path}: {err}") from err


def scan_label_format(ann_dir: Path) -> str:
    """Infer the format from every label under ``ann_dir/*/``: a 6 means mmseg_raw, a 255 train_ids."""
    has6 = has255 = False
    files = sorted(p for split in ann_dir.glob("*") if split.is_dir() for p in split.iterdir())
    for path in files:
        if path.suffix.lower() not in LABEL_SUFFIXES:
            continue
        counts = np.bincount(read_label(path).ravel(), minlength=256)
        has6 |= bool(counts[NUM_CLASSES])
        has255 |= bool(counts[IGNORE_INDEX])
        if has6 and has255:
            break
    if has6 != has255:
        return "mmseg_raw" if has6 else "train_ids"
    found = "both a 6 and a 255" if has6 else "neither a 6 (clutter, mmseg_raw) nor a 255 (ignore, train_ids)"
    raise UserError(
        f"cannot tell the label format of {ann_dir}: the labels hold {found}. Pass it explicitly "
        "(label_format / --label-format 'mmseg_raw' or 'train_ids') or set \"label_format\" in meta.json"
    )


def to_train_ids(raw: np.ndarray, label_format: str, path: Path) -> np.ndarray:
    """Map stored ids to train ids (int64 [H, W], 255 = ignore); UserError on values the format forbids."""
    ids = _LUTS[label_format][raw]
    if ids.min() < 0:
        bad = np.unique(raw[ids < 0]).tolist()
        allowed = "0..6" if label_format == "mmseg_raw" else "0..5 and 255"
        raise UserError(
            f"{path}: label value(s) {bad[:_SHOW]} not allowed in label_format {label_format!r} (allowed: "
            f"{allowed}); check the label format (meta.json / --label-format) or re-run the prepare tool"
        )
    return ids


def resolve_label_format(root: Path, meta: dict[str, Any], label_format: str | None) -> str:
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
    return declared or label_format or scan_label_format(root / "ann_dir")


@functools.cache
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg's mean and std in [0, 1] units, [3, 1, 1] each, made once per device (a copy to a GPU
    from host memory would wait for the device every time)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / 255.0
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) / 255.0
    return mean.to(device), std.to(device)


def normalize_images(x: torch.Tensor, normalize: str) -> torch.Tensor:
    """Images [..., 3, H, W] in [0, 1] -> the network's input: ``unit`` as is, ``imagenet`` by mean/std."""
    if normalize == "unit":
        return x
    mean, std = _imagenet_stats(x.device)
    return (x - mean) / std


def to_model_input(img: torch.Tensor, device: torch.device, normalize: str) -> torch.Tensor:
    """A batch of images [B, 3, H, W] on ``device`` as the network takes it.

    uint8 batches (``SegmentationFolder(uint8=True)``) travel as they are (a quarter of float32's bytes)
    and are scaled and normalised on the device, giving the same values as the dataset's float path;
    float batches are already normalised. The copy does not wait for the device (pinned memory).
    """
    x = img.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x
    return normalize_images(x.float().div_(255.0), normalize)


class SegmentationFolder(Dataset):
    """One split of a prepared domain folder.

    A sample is ``{"img": float32 [3, H, W], "label": int64 [H, W] (train ids 0..5, 255 ignore),
    "name": stem}`` plus whatever ``transform`` adds; ``with_labels=False`` drops ``label`` (and
    never touches ``ann_dir``). The transform sees images in [0, 1]; afterwards every ``img*`` tensor
    is normalised: ``unit`` leaves x/255, ``imagenet`` applies mmseg's mean/std in 0..255 units.
    ``cache=True`` reads decoded patches from a memory-mapped uint8 cache (``data/cache.py``, built on
    first use, in ``cache_dir`` when the folder is read-only) instead of the files; samples are identical.
    ``uint8=True`` keeps ``img`` uint8 [3, H, W] through the transform and leaves the scaling and
    normalisation to :func:`to_model_input` on the device; a transform that must resample (a patch smaller
    than the crop) returns float, normalised here as usual. A split has one patch size (the prepare tool's),
    so a batch is all uint8 or all float.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        label_format: str | None = None,
        normalize: str = "unit",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        with_labels: bool = True,
        cache: bool = False,
        cache_dir: str | Path | None = None,
        uint8: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        if normalize not in NORMALIZATIONS:
            raise UserError(f"normalize={normalize!r} is not supported; use one of {', '.join(NORMALIZATIONS)}")
        self.normalize = normalize
        self.transform = transform
        self.with_labels = with_labels
        self.uint8 = uint8
        self.meta = read_meta(self.root)
        img_dir = self.root / "img_dir" / split
        images = list_split(img_dir, IMAGE_SUFFIXES)
        self.label_format: str | None = None
        self.label_paths: list[Path] | None = None
        if with_labels:
            ann_dir = self.root / "ann_dir" / split
            labels = list_split(ann_dir, LABEL_SUFFIXES)
            pair_by_stem(images, labels, img_dir, ann_dir)
            self.label_format = resolve_label_format(self.root, self.meta, label_format)
            self.label_paths = [labels[s] for s in images]
        self.names = list(images)
        self.image_paths = list(images.values())
        self.cache = None
        if cache:
            # Imported here: data.cache builds on this module's readers.
            from data.cache import SplitCache, build_cache

            self.cache = SplitCache(build_cache(self.root, split, self.label_format, cache_dir=cache_dir))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.cache is not None:
            rgb = self.cache.image(index)
            ids = self.cache.label(index) if self.label_paths is not None else None
        else:
            rgb = read_image(self.image_paths[index])
            ids = None
            if self.label_paths is not None:
                path = self.label_paths[index]
                raw = read_label(path)
                if raw.shape != rgb.shape[:2]:
                    raise UserError(
                        f"{path} is {raw.shape[1]}x{raw.shape[0]} but its image is {rgb.shape[1]}x{rgb.shape[0]}"
                    )
                ids = to_train_ids(raw, self.label_format, path)
        img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        sample: dict[str, Any] = {"img": img if self.uint8 else img.float().div_(255.0), "name": self.names[index]}
        if ids is not None:
            sample["label"] = torch.from_numpy(ids)
        if self.transform is not None:
            sample = self.transform(sample)
        for key, value in sample.items():
            if key.startswith("img") and torch.is_tensor(value) and value.is_floating_point():
                sample[key] = normalize_images(value, self.normalize)
        return sample
