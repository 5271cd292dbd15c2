"""tools/evaluate.py --mode slide: whole images and raw ISPRS tiles."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.isprs import VAIHINGEN, decode_label
from tests.helpers import random_checkpoint
from tools.evaluate import main
from utils.errors import run_cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _evaluate(*args: str) -> int:
    return run_cli(main, ["--num-workers", "0", "--device", "cpu", *args])


def test_one_window_per_patch_equals_patch_evaluation(checkpoint, synthetic_root, tmp_path):
    common = ["--checkpoint", str(checkpoint), "--data-root", str(synthetic_root), "--domain", "vaihingen_irrg",
              "--prototypes", "none"]
    assert _evaluate(*common, "--json", str(tmp_path / "patch.json")) == 0
    assert _evaluate(*common, "--mode", "slide", "--crop", "512", "--stride", "512",
                     "--json", str(tmp_path / "slide.json")) == 0
    patch, slide = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("patch", "slide"))
    assert slide["mode"].startswith("slide") and patch["mode"] == "patch"
    assert slide["classifier"]["pixels"] == patch["classifier"]["pixels"]
    for key in ("miou", "mf1", "oa"):  # argmax ties may flip a few pixels between batch compositions
        assert slide["classifier"][key] == pytest.approx(patch["classifier"][key], abs=1e-4)


def test_raw_tiles_of_the_split_are_scored_at_full_resolution(checkpoint, synthetic_raw, tmp_path):
    raw = synthetic_raw["vaihingen"]
    out = tmp_path / "slide.json"
    assert _evaluate("--checkpoint", str(checkpoint), "--mode", "slide", "--raw", str(raw), "--dataset", "vaihingen",
                     "--bands", "irrg", "--crop", "128", "--stride", "96", "--scale", "0.25", "--json", str(out)) == 0
    with zipfile.ZipFile(raw / VAIHINGEN.image_zips["irrg"]) as archive:
        imaged = {VAIHINGEN.image_tile("irrg", member) for member in archive.namelist()}
    labelled = 0
    with zipfile.ZipFile(raw / VAIHINGEN.label_zip) as archive:
        for member in archive.namelist():
            tile = VAIHINGEN.label_tile(member)
            if tile in imaged and VAIHINGEN.split_of(tile) == "val":
                bgr = cv2.imdecode(np.frombuffer(archive.read(member), np.uint8), cv2.IMREAD_COLOR)
                labelled += int((decode_label(bgr)[0] != 0).sum())  # raw 0 = eroded boundary, ignored
    result = json.loads(out.read_text())
    assert labelled > 0 and result["classifier"]["pixels"] == labelled
    assert result["domain"] == "vaihingen_irrg" and "scale 0.25" in result["mode"]


def test_raw_tiles_need_slide_mode(checkpoint, synthetic_raw, capsys):
    code = _evaluate("--checkpoint", str(checkpoint), "--raw", str(synthetic_raw["vaihingen"]),
                     "--dataset", "vaihingen", "--bands", "irrg")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--mode slide" in err[0]


IRRG = ["NIR", "R", "G"]


def test_patch_mode_resizes_as_the_checkpoints_run_did(synthetic_root, tmp_path):
    ckpt = random_checkpoint(tmp_path / "resized.pt", resize=64)
    common = ["--checkpoint", str(ckpt), "--data-root", str(synthetic_root), "--domain", "vaihingen_irrg",
              "--prototypes", "none"]
    assert _evaluate(*common, "--json", str(tmp_path / "default.json")) == 0
    assert _evaluate(*common, "--resize", "64", "--json", str(tmp_path / "explicit.json")) == 0
    default, explicit = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("default", "explicit"))
    assert default["mode"] == explicit["mode"] == "patch (resized to 64)"
    assert default["classifier"] == explicit["classifier"]


def test_images_of_bands_the_run_never_saw_are_refused(synthetic_root, tmp_path, capsys):
    ckpt = random_checkpoint(tmp_path / "irrg.pt", bands={"source": IRRG, "target": IRRG})
    common = ["--checkpoint", str(ckpt), "--data-root", str(synthetic_root), "--domain", "potsdam_rgb",
              "--prototypes", "none"]
    assert _evaluate(*common) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NIR,R,G" in err and "R,G,B" in err and "--allow-band-mismatch" in err
    assert _evaluate(*common, "--allow-band-mismatch") == 0
    # A cross-band pair (RGB source, IRRG target) is scored on both without a word.
    cross = random_checkpoint(tmp_path / "cross.pt", bands={"source": ["R", "G", "B"], "target": IRRG})
    for domain in ("potsdam_rgb", "vaihingen_irrg"):
        assert _evaluate("--checkpoint", str(cross), "--data-root", str(synthetic_root), "--domain", domain,
                         "--prototypes", "none") == 0


def test_a_training_state_is_named_as_such(synthetic_root, tmp_path, capsys):
    from utils.checkpoint import save_checkpoint

    save_checkpoint({"rng": {}, "streams": {}, "epoch": 1}, tmp_path / "last.pt")
    assert _evaluate("--checkpoint", str(tmp_path / "last.pt"), "--data-root", str(synthetic_root),
                     "--domain", "vaihingen_irrg") == 2
    assert "training state for --resume" in capsys.readouterr().err
