"""What a run needs of its prepared folders, checked before training or evaluation starts.

Faults of the data that would otherwise show only when batches are built (or thousands of iterations
later, when a bad file's turn comes) end here in one line: patches of different sizes where batches need
one, training crops larger than a patch, images that are not 8-bit three-band, labels that are not
single-band or not the size of their image, and label values their format does not allow.

Sizes and bands come from the file headers, no pixel decoded (3,456 patches and their labels: 0.3 s
once the files are in the page cache, 1.3 s from a cold disk); a ``meta.json`` that names the patch size
(``clip``) must agree with every file, since the hand-off's input scale is read from it. Label values come
from ``meta.json``'s ``label_values`` where the prepare tool recorded them, else from a sample of decoded
labels; every label is still checked when it is read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data.benchmarks import benchmark_of
from data.files import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    check_label_mode,
    check_label_values,
    list_split,
    pair_by_stem,
    read_label,
    read_meta,
    resolve_label_format,
)
from utils.errors import UserError

IMAGE_MODE = "RGB"  # Pillow's mode of an 8-bit three-band image
LABEL_SAMPLE = 16  # labels decoded per split when meta.json does not record the label values
_SIDE_STEP = 32  # the network's sides are multiples of this


@dataclass(frozen=True)
class SplitUse:
    """One split of a prepared domain folder as a run reads it."""

    root: Path
    split: str
    labels: bool = True  # its ann_dir is read (the target's train labels never are)
    cropped: bool = False  # training takes random crops of it (it is also read whole, for refresh or evaluation)


def header(path: Path) -> tuple[int, int, str]:
    """(height, width, mode) of an image file from its header; ``mode`` is Pillow's, with " 16-bit" added
    for 16-bit samples (which Pillow reports as 8-bit modes). OpenCV decodes what Pillow cannot open."""
    try:
        with Image.open(path) as im:
            raw = im.tile[0][3] if im.tile else None
            raw = raw[0] if isinstance(raw, tuple) else raw
            deep = isinstance(raw, str) and ";16" in raw
            return im.height, im.width, f"{im.mode} 16-bit" if deep else im.mode
    except OSError:
        pass
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise UserError(f"cannot decode image {path}; the file is damaged or not an image")
    bands = 1 if array.ndim == 2 else array.shape[2]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(bands, f"{bands} bands")
    return array.shape[0], array.shape[1], mode if array.dtype == np.uint8 else f"{mode} {array.dtype}"


def common_size(sizes: dict[Path, tuple[int, int]], folder: Path, hint: str) -> tuple[int, int]:
    """The (H, W) every file of ``sizes`` shares; else a UserError naming ``folder``, one file of each size
    (the most common first) and ``hint``, what to do about it."""
    counts = Counter(sizes.values())
    if len(counts) > 1:
        parts = [f"{w}x{h}: {n} file(s), e.g. {next(p.name for p, s in sizes.items() if s == (h, w))}"
                 for (h, w), n in counts.most_common()]
        raise UserError(f"{folder} holds patches of different sizes ({'; '.join(parts)}); {hint}")
    return next(iter(counts))


def _image_sizes(img_dir: Path, images: dict[str, Path]) -> dict[Path, tuple[int, int]]:
    sizes = {}
    for path in images.values():
        height, width, mode = header(path)
        if mode != IMAGE_MODE:
            found = f"{Image.getmodebands(mode)} band(s) (mode {mode})" if mode in Image.MODES else f"mode {mode}"
            raise UserError(f"{path}: expected an 8-bit 3-band image, found {found}; convert the images of "
                            f"{img_dir} to 8-bit RGB (the prepare tool writes such PNGs)")
        sizes[path] = (height, width)
    return sizes


def _check_labels(use: SplitUse, meta: dict, images: dict[str, Path], sizes: dict[Path, tuple[int, int]],
                  label_format: str | None) -> None:
    """Label headers (one band, the image's size) and the label values, from meta.json or a sample."""
    img_dir, ann_dir = use.root / "img_dir" / use.split, use.root / "ann_dir" / use.split
    labels = list_split(ann_dir, LABEL_SUFFIXES)
    pair_by_stem(images, labels, img_dir, ann_dir)
    for stem, path in labels.items():
        height, width, mode = header(path)
        check_label_mode(path, mode)
        image_h, image_w = sizes[images[stem]]
        if (height, width) != (image_h, image_w):
            raise UserError(f"{path} is {width}x{height} but its image is {image_w}x{image_h}")
    # The format is resolved only when it is declared: inferring it reads every label, which the dataset
    # does itself; an undeclared format still has to be one of the two.
    declared = meta.get("label_format") is not None or label_format is not None
    num_classes = benchmark_of(meta).num_classes
    fmt = resolve_label_format(use.root, meta, label_format, num_classes) if declared else None
    recorded = meta.get("label_values")
    values = recorded.get(use.split) if isinstance(recorded, dict) else None
    if values is not None:
        if not isinstance(values, list) or not all(type(v) is int for v in values):
            raise UserError(f"{use.root / 'meta.json'}: label_values of {use.split} must be a list of integers, "
                            f"found {str(values)[:80]}; fix or delete meta.json")
        check_label_values(np.asarray(values), fmt, use.root / "meta.json", num_classes)
        return
    paths = list(labels.values())
    step = max(1, len(paths) // LABEL_SAMPLE)
    for path in paths[::step][:LABEL_SAMPLE]:
        check_label_values(np.unique(read_label(path)), fmt, path, num_classes)


def _scan_split(use: SplitUse, label_format: str | None) -> dict[Path, tuple[int, int]]:
    """Check the files of one split (bands, label headers and values, meta.json's patch size); returns
    the (H, W) of every image."""
    meta = read_meta(use.root)
    img_dir = use.root / "img_dir" / use.split
    images = list_split(img_dir, IMAGE_SUFFIXES)
    sizes = _image_sizes(img_dir, images)
    clip = meta.get("clip")
    if isinstance(clip, int):
        odd = {p: s for p, s in sizes.items() if s != (clip, clip)}
        if odd:
            path, (height, width) = next(iter(odd.items()))
            raise UserError(f"{path} is {width}x{height} but {use.root / 'meta.json'} says the patches are "
                            f"{clip}x{clip} ({len(odd)} of {len(sizes)} files in {img_dir} differ): the folder "
                            f"changed after it was prepared; prepare it again, or remove meta.json (and pass "
                            f"--resize if the sizes differ)")
    if use.labels:
        _check_labels(use, meta, images, sizes, label_format)
    return sizes


def _suggested_side(size: tuple[int, int]) -> int:
    return max(_SIDE_STEP, _SIDE_STEP * round(max(size) / _SIDE_STEP))


def check_data(uses: Sequence[SplitUse], *, label_format: str | None, resize: int | None, batch_size: int,
               batch_flag: str, crop: int | None = None, window: int | None = None) -> None:
    """Check every split a run reads before it starts (see the module docstring); one UserError each.

    Without ``resize`` the splits read whole are batched ``batch_size`` patches at a time, so each needs
    one patch size (``batch_flag`` names the option that sets that batch size); the ``cropped`` splits
    must hold patches no smaller than ``crop`` (after ``resize``); a network with a ``window`` needs patch
    sides (after ``resize``) that are multiples of it.
    """
    wanted: dict[tuple[Path, str], SplitUse] = {}
    for use in uses:  # a split read for several roles is scanned once, with labels if any role reads them
        key = (use.root, use.split)
        if key in wanted:
            use = SplitUse(use.root, use.split, wanted[key].labels or use.labels, wanted[key].cropped or use.cropped)
        wanted[key] = use
    for use in wanted.values():
        sizes = _scan_split(use, label_format)
        folder = use.root / "img_dir" / use.split
        if not resize and batch_size > 1:
            most = Counter(sizes.values()).most_common(1)[0][0]
            common_size(sizes, folder, f"batches of {batch_size} need one size: pass --resize "
                                       f"{_suggested_side(most)} to resize every patch (or {batch_flag} 1)")
        if window is not None:
            odd = [(name, size) for name, size in sizes.items()
                   if (resize or size[0]) % window or (resize or size[1]) % window]
            if odd:
                path, (height, width) = odd[0]
                raise UserError(f"{folder} holds {len(odd)} patch(es) whose sides are no multiple of the network's "
                                f"--window {window} (e.g. {Path(path).name}: {resize or width}x{resize or height} "
                                f"px): pass "
                                f"--resize {max(window, round((resize or width) / window) * window)}")
        if use.cropped and crop is not None:
            smallest = min(sizes.items(), key=lambda kv: min(kv[1]))
            side = resize or min(smallest[1])
            if crop > side:
                what = f"--resize {resize}" if resize else f"the {smallest[1][1]}x{smallest[1][0]} patch {smallest[0]}"
                fits = side // _SIDE_STEP * _SIDE_STEP
                smaller = f"--img-size {fits} or less, or " if fits else ""
                raise UserError(f"training crops of --img-size {crop} are larger than {what} (the crops would be "
                                f"padded): pass {smaller}--resize {crop} or more")
