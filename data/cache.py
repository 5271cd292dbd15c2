"""Decoded uint8 cache of one split of a prepared domain folder, read through memory maps.

Decoding PNGs dominates data loading at ISPRS patch sizes, so a split can be decoded once into::

    <root>/.cache/<split>/images.u8   uint8 [N, H, W, 3] in the files' slot order (R,G,B or NIR,R,G)
                          labels.u8   uint8 [N, H, W] train ids 0..5, 255 = ignore (labelled use only)
                          index.json  names in order, shape, source file sizes + mtimes, label format, version

Patches are stored at full size: ``Resize`` runs on float images, so resizing before the uint8 store would
round, and cached samples would no longer equal the PNG path's. A cache is written into a staging folder
and renamed into place (``utils/publish.py``); every open checks it against the source files and rebuilds a
stale one. When the domain folder is read-only the cache goes to ``~/.cache/napg`` (or ``cache_dir``) instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.benchmarks import benchmark_of
from data.checks import common_size, header
from data.files import (
    IMAGE_SUFFIXES,
    LABEL_FORMATS,
    LABEL_SUFFIXES,
    list_split,
    pair_by_stem,
    read_image,
    read_label,
    read_meta,
    to_train_ids,
)
from utils.errors import UserError
from utils.publish import publish_dir

CACHE_VERSION = 1
FALLBACK_DIR = Path("~/.cache/napg")
IMAGES, LABELS, INDEX = "images.u8", "labels.u8", "index.json"
# Errors that mean "this folder cannot be written", as opposed to a full disk or a broken file.
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass
class _Sources:
    """The files a cache is built from, in dataset order."""

    names: list[str]
    images: list[Path]
    labels: list[Path] | None
    label_format: str | None
    num_classes: int  # of the folder's benchmark (meta.json)


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _sources(root: Path, split: str, label_format: str | None) -> _Sources:
    img_dir = root / "img_dir" / split
    images = list_split(img_dir, IMAGE_SUFFIXES)
    labels = None
    if label_format is not None:
        if label_format not in LABEL_FORMATS:
            raise UserError(f"label format {label_format!r} is not supported; use one of {', '.join(LABEL_FORMATS)}")
        ann_dir = root / "ann_dir" / split
        found = list_split(ann_dir, LABEL_SUFFIXES)
        pair_by_stem(images, found, img_dir, ann_dir)
        labels = [found[name] for name in images]
    num_classes = benchmark_of(read_meta(root)).num_classes
    return _Sources(list(images), list(images.values()), labels, label_format, num_classes)


def cache_folders(dataset_root: str | Path, split: str, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(primary, fallback) folders of a split's cache: inside the domain folder, and under ``cache_dir``
    (default ``~/.cache/napg``) in a subfolder named after the domain folder's resolved path."""
    root = Path(dataset_root)
    resolved = root.resolve()
    key = f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    base = Path(cache_dir if cache_dir is not None else FALLBACK_DIR).expanduser()
    return root / ".cache" / split, base / key / split


def _stale_reason(folder: Path, src: _Sources) -> str | None:
    """Why the cache in ``folder`` cannot serve ``src`` (None when it can)."""
    index_path = folder / INDEX
    if not index_path.is_file():
        return "no cache yet"
    try:
        index = json.loads(index_path.read_text())
        version, names, shape = index["version"], index["names"], index["shape"]
        image_stamps, label_stamps, held = index["images"], index["labels"], index["label_format"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable index ({err})"
    if version != CACHE_VERSION:
        return f"cache version {version}, this code writes {CACHE_VERSION}"
    if names != src.names:
        return f"the file names changed ({len(names)} cached, {len(src.names)} now)"
    expected = {IMAGES: int(np.prod(shape)) * 3}
    for name, path, stamp in zip(src.names, src.images, image_stamps):
        if _fingerprint(path) != stamp:
            return f"image {name} changed"
    if src.labels is not None:
        if held != src.label_format:
            return f"labels cached as {held or 'none'}, wanted {src.label_format}"
        for name, path, stamp in zip(src.names, src.labels, label_stamps):
            if _fingerprint(path) != stamp:
                return f"label {name} changed"
        expected[LABELS] = int(np.prod(shape))
    for file, size in expected.items():
        if not (folder / file).is_file() or (folder / file).stat().st_size != size:
            return f"{file} is missing or truncated"
    return None


def _common_shape(src: _Sources) -> tuple[int, int]:
    """(H, W) shared by every image of the split, from the file headers; UserError when sizes differ."""
    sizes = {path: header(path)[:2] for path in src.images}
    return common_size(sizes, src.images[0].parent, "the uint8 cache needs one size per split: disable it "
                       "(--cache false / cache: false) for this data")


def _fill(staging: Path, src: _Sources, shape: tuple[int, int]) -> None:
    """Decode every patch into the memmaps and write the index (source stamps taken before decoding)."""
    height, width = shape
    n = len(src.names)
    index: dict[str, Any] = {"version": CACHE_VERSION, "names": src.names, "shape": [n, height, width],
                             "label_format": src.label_format,
                             "images": [_fingerprint(p) for p in src.images],
                             "labels": None if src.labels is None else [_fingerprint(p) for p in src.labels]}
    images = np.memmap(staging / IMAGES, dtype=np.uint8, mode="w+", shape=(n, height, width, 3))
    labels = None
    if src.labels is not None:
        labels = np.memmap(staging / LABELS, dtype=np.uint8, mode="w+", shape=(n, height, width))
    for i, path in enumerate(src.images):
        rgb = read_image(path)
        if rgb.shape[:2] != shape:  # a header that lied about the size
            raise UserError(f"{path} decodes to {rgb.shape[1]}x{rgb.shape[0]}, its header says {width}x{height}")
        images[i] = rgb
        if labels is not None:
            label_path = src.labels[i]
            raw = read_label(label_path)
            if raw.shape != shape:
                raise UserError(f"{label_path} is {raw.shape[1]}x{raw.shape[0]} but its image is {width}x{height}")
            labels[i] = to_train_ids(raw, src.label_format, label_path, src.num_classes)
    for array in (images, labels):
        if array is not None:
            array.flush()
    del images, labels
    (staging / INDEX).write_text(json.dumps(index) + "\n")


def _build_in(folder: Path, src: _Sources, reason: str) -> Path | None:
    """Build the cache into ``folder``; None when its parent cannot be written."""
    try:
        with ExitStack() as stack:
            try:
                staging = stack.enter_context(publish_dir(folder, prefix=".building-"))
            except OSError as err:
                if err.errno in _READ_ONLY:
                    return None
                if err.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder of the cache goes
                    blocker = next(p for p in (folder.parent, *folder.parents) if p.exists())
                    raise UserError(f"cannot build the uint8 cache in {folder.parent}: {blocker} is a file, not a "
                                    f"folder; remove it or pass --cache false") from None
                raise
            shape = _common_shape(src)
            kind = "images and labels" if src.labels is not None else "images"
            print(f"cache: {reason}; decoding {len(src.names)} {kind} of {src.images[0].parent} into {folder}",
                  file=sys.stderr, flush=True)
            _fill(staging, src, shape)
    except OSError as err:
        # Another process published its cache between our two renames; it was built from the same files.
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    return folder


def build_cache(dataset_root: str | Path, split: str, label_format: str | None, *,
                cache_dir: str | Path | None = None) -> Path:
    """The folder of an up-to-date cache of ``<dataset_root>/img_dir/<split>``, built when missing or stale.

    ``label_format`` (``mmseg_raw`` or ``train_ids``) also caches the labels as train ids; None caches the
    images only and never reads ``ann_dir``. A cache with labels serves unlabelled use too. The cache lives
    in ``<dataset_root>/.cache/<split>``, or under ``cache_dir`` (default ``~/.cache/napg``) when the
    domain folder is read-only. Rebuilding prints one line on stderr saying why.
    """
    root = Path(dataset_root)
    src = _sources(root, split, label_format)
    primary, fallback = cache_folders(root, split, cache_dir)
    reasons = {}
    for folder in (primary, fallback):
        reasons[folder] = _stale_reason(folder, src)
        if reasons[folder] is None:
            return folder
    for folder in (primary, fallback):
        built = _build_in(folder, src, reasons[folder])
        if built is not None:
            return built
    raise UserError(f"cannot write a cache to {primary.parent} nor to {fallback.parent} (both read-only); "
                    "make one of them writable or disable --cache")


class SplitCache:
    """Read side of a cache folder: uint8 patches and train ids by index.

    The memmaps open on first use in each process and are not pickled, so DataLoader workers (fork or
    spawn) map the files themselves instead of receiving a copy of the data.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        self.names: list[str] = index["names"]
        self.shape: tuple[int, int, int] = tuple(index["shape"])
        self.label_format: str | None = index["label_format"]
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_labels": None}

    def _open(self) -> None:
        self._images = np.memmap(self.folder / IMAGES, dtype=np.uint8, mode="r", shape=(*self.shape, 3))
        if self.label_format is not None:
            self._labels = np.memmap(self.folder / LABELS, dtype=np.uint8, mode="r", shape=self.shape)

    def image(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3], a private copy (the memmap is read-only)."""
        if self._images is None:
            self._open()
        return np.array(self._images[index])

    def label(self, index: int) -> np.ndarray:
        """Train ids int64 [H, W] (255 = ignore), as ``to_train_ids`` returns them."""
        if self.label_format is None:
            raise ValueError(f"the cache {self.folder} holds no labels")
        if self._labels is None:
            self._open()
        return self._labels[index].astype(np.int64)
