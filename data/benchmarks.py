"""Benchmarks, one declaration each (MMSegmentation's dataset-file idea): classes, palette, raw decoding, domains,
protocols and the per-class defaults of the method.

Both benchmarks store labels the same way (``label_format: mmseg_raw``): raw 0 is ignored (ISPRS: the eroded
class border; LoveDA: no-data) and raw k is train id k - 1. A prepared folder's ``meta.json`` names its
benchmark; a folder without the field (older ones, mmseg's own converters) is ISPRS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.isprs import CLASS_NAMES as ISPRS_CLASSES
from data.isprs import PALETTE as ISPRS_RAW_PALETTE
from data.isprs import PROTOCOLS as ISPRS_PROTOCOLS
from utils.errors import UserError


@dataclass(frozen=True)
class Domain:
    """A registered domain: folder name, the bands held in the PNG's R,G,B slots, ground sampling distance."""

    name: str
    dataset: str
    bands: tuple[str, str, str]
    gsd_m: float
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Benchmark:
    name: str
    classes: tuple[str, ...]  # by train id
    palette: tuple[tuple[int, int, int], ...]  # RGB by train id (pictures, predictions, QGIS)
    raw_ignored: str  # what raw value 0 means
    domains: tuple[Domain, ...]
    # Protocol name (prepare tool's --protocol) -> how meta.json and every output name it.
    protocols: Mapping[str, str]
    default_protocol: str  # also that of a prepared folder whose meta.json names none
    prepare: str  # the tool that prepares its domains (with --protocol)
    # K per class (``clusters``) and GNCE window per class (``gnce_windows``) of every stage, then of the stages
    # that differ; a config's or a flag's values replace them.
    clusters: tuple[int, ...]
    gnce_windows: tuple[int, ...]
    stage_defaults: Mapping[str, Mapping[str, tuple[int, ...]]] = field(default_factory=dict)
    # Protocols whose folders serve only as a target (no labelled train split); their source is prepared with
    # the default protocol.
    target_only: frozenset[str] = frozenset()
    # The class that the "-N" means (mIoU-5, mF1-5 for ISPRS) leave out; always the last one. None: no such means.
    mean_without: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def palette_array(self) -> np.ndarray:
        return np.asarray(self.palette, dtype=np.uint8)

    def defaults(self, stage: str) -> dict[str, Any]:
        """The options this benchmark sets for ``stage`` under the config's and the flags' values."""
        return {"num_classes": self.num_classes, "clusters": self.clusters, "gnce_windows": self.gnce_windows,
                **self.stage_defaults.get(stage, {})}

    @property
    def summary_columns(self) -> dict[str, str]:
        """Summary metric (eval.json's key) -> column name; the "-N" means only where ``mean_without`` is declared."""
        columns = {"miou": "mIoU", "mf1": "mF1", "oa": "OA"}
        if self.mean_without:
            n = self.num_classes - 1
            columns |= {"miou_5": f"mIoU-{n}", "mf1_5": f"mF1-{n}"}
        return columns

    @property
    def classes_note(self) -> str:
        """What a results table's footnote says of the classes, e.g. "6 classes incl. clutter; -5 = ..."."""
        if self.mean_without is None:
            return f"{self.num_classes} {self.name} classes"
        return (f"{self.num_classes} classes incl. {self.mean_without}; -{self.num_classes - 1} = "
                f"{self.mean_without} excluded from the mean")


# The aliases are the folder names of the original NAPG code ("vailhingen6" is its spelling).
ISPRS = Benchmark(
    "isprs", ISPRS_CLASSES, ISPRS_RAW_PALETTE[1:], "the eroded class border",
    domains=(Domain("potsdam_rgb", "potsdam", ("R", "G", "B"), 0.05, ("potsdamRGB6",)),
             Domain("potsdam_irrg", "potsdam", ("NIR", "R", "G"), 0.05, ("potsdamIRRG6",)),
             Domain("vaihingen_irrg", "vaihingen", ("NIR", "R", "G"), 0.09, ("vailhingen6",)),
             # Potsdam resampled to Vaihingen's 9 cm before cropping (prepare tool, --target-gsd 0.09).
             Domain("potsdam_rgb_9cm", "potsdam", ("R", "G", "B"), 0.09),
             Domain("potsdam_irrg_9cm", "potsdam", ("NIR", "R", "G"), 0.09)),
    protocols={name: name for name in ISPRS_PROTOCOLS}, default_protocol="mmseg",
    prepare="tools/prepare_isprs.py",
    # The released code's K per class and GNCE windows (docs/method.md).
    clusters=(1, 1, 1, 1, 1, 1), gnce_windows=(1, 1, 1, 1, 1, 1),
    stage_defaults={"step2": {"clusters": (2, 2, 2, 2, 4, 4), "gnce_windows": (2, 2, 2, 2, 1, 0)},
                    "step3": {"clusters": (1, 1, 1, 2, 2, 2)}},
    mean_without="clutter")

# LoveDA (Wang et al., NeurIPS 2021 Datasets and Benchmarks): 1024 px tiles at 0.3 m, Urban and Rural; the colours
# of MMSegmentation's LoveDA data set. official-uda adapts and evaluates on Val/<target> (LoveDA's UDA code).
LOVEDA = Benchmark(
    "loveda", ("background", "building", "road", "water", "barren", "forest", "agriculture"),
    ((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183), (0, 255, 0), (255, 195, 128)),
    "no-data",
    domains=(Domain("loveda_urban", "loveda", ("R", "G", "B"), 0.3),
             Domain("loveda_rural", "loveda", ("R", "G", "B"), 0.3)),
    protocols={"standard": "standard", "official-uda": "official-uda (transductive)"}, default_protocol="standard",
    prepare="tools/prepare_loveda.py", target_only=frozenset({"official-uda"}),
    # This project's choice (the paper gives none), not tuned: two prototypes and a 2-px window for every class
    # in step 2, one prototype elsewhere.
    clusters=(1,) * 7, gnce_windows=(1,) * 7,
    stage_defaults={"step2": {"clusters": (2,) * 7, "gnce_windows": (2,) * 7}})

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (ISPRS, LOVEDA)}


def benchmark_of(meta: dict[str, Any]) -> Benchmark:
    """The benchmark a prepared folder's ``meta.json`` (or a checkpoint's meta) names; ISPRS when it names none."""
    name = meta.get("benchmark") or "isprs"
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r} in meta.json; this version knows {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def data_protocol_of(meta: dict[str, Any]) -> str:
    """The protocol a prepared folder's ``meta.json`` names (as outputs name it); its benchmark's default when
    it names none (a folder of mmseg's own converters)."""
    return meta.get("protocol") or benchmark_of(meta).default_protocol
