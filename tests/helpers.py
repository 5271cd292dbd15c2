"""Helpers shared by the tests: parity fixtures, their tolerances, and running the step scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from utils.stages import PIPELINE, STAGES

STAGE_SCRIPTS = {name: STAGES[name].script for name in PIPELINE}  # the pipeline's step scripts, in order

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # computed by the original code (tests/fixtures/README.md)
# Two real labelled ISPRS patches and three real LoveDA tiles (its README.md names their sources).
REAL_SAMPLES = REPO / "tests" / "data" / "real-samples"
RAW_VALUES = np.arange(7)  # mmseg_raw: 0 boundary, 1..6 classes


def fixture_path(name: str) -> Path:
    """Path of a parity fixture; a missing one fails the test (parity evidence must never skip)."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"parity fixture {path} is missing; it is part of the repository (git checkout tests/fixtures)")
    return path


def load_fixture(name: str) -> dict:
    """A parity fixture computed by the original code (see :func:`fixture_path`)."""
    return torch.load(fixture_path(name), weights_only=True)


def assert_close(actual: torch.Tensor, ref: torch.Tensor, name: str = "", rel: float = 1e-5) -> None:
    """rtol=rel and atol=rel * max|ref|, the comparison tests/fixtures/README.md recommends."""
    atol = rel * float(ref.detach().abs().max())
    torch.testing.assert_close(actual, ref, rtol=rel, atol=atol, msg=(lambda m: f"{name}: {m}") if name else None)


def random_checkpoint(path: Path, input_scale: float = 1.0, backbone: str = "resnet18", **meta: Any) -> Path:
    """A step-0 hand-off checkpoint of a randomly initialised network (seeded), written to ``path``; ``meta``
    adds optional meta fields (``resize``, ``bands``)."""
    from engine.handoff import handoff_meta, save_handoff
    from models import NAPGNet

    torch.manual_seed(0)
    fields = handoff_meta(stage="step0", source="potsdam_irrg", target="vaihingen_irrg", num_classes=6,
                        backbone=backbone, shared_similarity=True, clusters=None, bn_stats="shared",
                        normalize="unit", epoch=1, input_scale=input_scale, **meta)
    save_handoff(path, NAPGNet(num_classes=6, backbone=backbone), None, None, None, fields)
    return path


def tiny_args(data_root: Path, work_dir: Path, *extra: str) -> list[str]:
    """Step-script flags for a few CPU iterations on the small synthetic set."""
    return ["--data-root", str(data_root), "--source", "potsdam_irrg", "--target", "vaihingen_irrg",
            "--work-dir", str(work_dir), "--backbone", "resnet18", "--resize", "64", "--img-size", "64",
            "--batch-size", "2", "--eval-batch-size", "4", "--epochs", "2", "--iters-per-epoch", "2",
            "--refresh-max-batches", "2", "--eval-max-batches", "2", "--num-workers", "0", "--device", "cpu",
            "--log-every", "1", "--tgt-proto-start", "1", *extra]


def run_step(stage: str, args: list[str], launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run a stage's script (``Stage.command``; optionally under a launcher such as torchrun) from the
    repository root."""
    cmd = [sys.executable, *launcher, *STAGES[stage].command, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def write_domain(root: Path, split: str = "train", n: int = 3, size: tuple[int, int] = (12, 10),
                 values: np.ndarray = RAW_VALUES, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> None:
    """Random uint8 PNG pairs ``<root>/{img_dir,ann_dir}/<split>/q<i>.png`` (one size unless ``sizes``)."""
    rng = np.random.default_rng(seed)
    for sub in ("img_dir", "ann_dir"):
        (root / sub / split).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes or [size] * n):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img_dir" / split / f"q{i}.png")
        label = rng.choice(values, size=(h, w)).astype(np.uint8)
        Image.fromarray(label).save(root / "ann_dir" / split / f"q{i}.png")
