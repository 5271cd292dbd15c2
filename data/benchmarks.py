"""Benchmarks: a class list, a palette and how raw label files map to train ids, one declaration each.

Both benchmarks store labels the same way (``label_format: mmseg_raw``): raw 0 is ignored (ISPRS: the eroded
class border; LoveDA: no-data) and raw k is train id k - 1. A prepared folder's ``meta.json`` names its
benchmark; a folder without the field (older ones, mmseg's own converters) is ISPRS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data.isprs import CLASS_NAMES as ISPRS_CLASSES
from data.isprs import PALETTE as ISPRS_RAW_PALETTE
from utils.errors import UserError


@dataclass(frozen=True)
class Benchmark:
    name: str
    classes: tuple[str, ...]  # by train id
    palette: tuple[tuple[int, int, int], ...]  # RGB by train id (pictures, predictions, QGIS)
    raw_ignored: str  # what raw value 0 means

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def palette_array(self) -> np.ndarray:
        return np.asarray(self.palette, dtype=np.uint8)


BENCHMARKS: dict[str, Benchmark] = {
    "isprs": Benchmark("isprs", ISPRS_CLASSES, ISPRS_RAW_PALETTE[1:], "the eroded class border"),
    # LoveDA (Wang et al., NeurIPS 2021 Datasets and Benchmarks): 1024 px tiles at 0.3 m, Urban and Rural;
    # the colours of MMSegmentation's LoveDA data set.
    "loveda": Benchmark("loveda", ("background", "building", "road", "water", "barren", "forest", "agriculture"),
                        ((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183), (0, 255, 0),
                         (255, 195, 128)), "no-data"),
}


def benchmark_of(meta: dict[str, Any]) -> Benchmark:
    """The benchmark a prepared folder's ``meta.json`` (or a checkpoint's meta) names; ISPRS when it names none."""
    name = meta.get("benchmark") or "isprs"
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r} in meta.json; this version knows {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
