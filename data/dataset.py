"""A prepared domain split (mmseg layout) as a torch Dataset.

Layout: ``<root>/img_dir/<split>/*.png`` (uint8, 3 channels) and ``<root>/ann_dir/<split>/*.png``
(uint8, 1 channel), paired by file stem; optional ``<root>/meta.json`` with ``label_format``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data.benchmarks import benchmark_of
from data.cache import SplitCache, build_cache
from data.files import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    list_split,
    pair_by_stem,
    read_image,
    read_label,
    read_meta,
    resolve_label_format,
    to_train_ids,
)
from data.preprocess import NORMALIZATIONS, normalize_images, unit_float
from utils.errors import UserError


def finish_sample(sample: dict[str, Any], transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
                  normalize: str) -> dict[str, Any]:
    """The end of every dataset item: ``transform``, then each float image (``img*``) normalised; uint8
    images stay uint8 (:func:`to_model_input` normalises them on the device)."""
    if transform is not None:
        sample = transform(sample)
    for key, value in sample.items():
        if key.startswith("img") and torch.is_tensor(value) and value.is_floating_point():
            sample[key] = normalize_images(value, normalize)
    return sample


class SegmentationFolder(Dataset):
    """One split of a prepared domain folder.

    A sample is ``{"img": float32 [3, H, W], "label": int64 [H, W] (train ids 0..5, 255 ignore),
    "name": stem}`` plus whatever ``transform`` adds; ``with_labels=False`` drops ``label`` (and
    never touches ``ann_dir``). The transform sees images in [0, 1]; afterwards every ``img*`` tensor
    is normalised: ``unit`` leaves x/255, ``imagenet`` applies mmseg's mean/std in 0..255 units.
    ``cache=True`` reads decoded patches from a memory-mapped uint8 cache (``data/cache.py``, built on
    first use, in ``cache_dir`` when the folder is read-only) instead of the files; samples are identical.
    ``uint8=True`` keeps ``img`` uint8 [3, H, W] through the transform and leaves the scaling and
    normalisation to ``data.preprocess.to_model_input`` on the device; a transform that must resample (a patch smaller
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
        self.benchmark = benchmark_of(self.meta)
        img_dir = self.root / "img_dir" / split
        images = list_split(img_dir, IMAGE_SUFFIXES)
        self.label_format: str | None = None
        self.label_paths: list[Path] | None = None
        if with_labels:
            ann_dir = self.root / "ann_dir" / split
            labels = list_split(ann_dir, LABEL_SUFFIXES)
            pair_by_stem(images, labels, img_dir, ann_dir)
            self.label_format = resolve_label_format(self.root, self.meta, label_format, self.benchmark.num_classes)
            self.label_paths = [labels[s] for s in images]
        self.names = list(images)
        self.image_paths = list(images.values())
        self.cache = None
        if cache:
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
                ids = to_train_ids(raw, self.label_format, path, self.benchmark.num_classes)
        img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        sample: dict[str, Any] = {"img": img if self.uint8 else unit_float(img), "name": self.names[index]}
        if ids is not None:
            sample["label"] = torch.from_numpy(ids)
        return finish_sample(sample, self.transform, self.normalize)
