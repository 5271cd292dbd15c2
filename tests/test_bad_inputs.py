"""A catalogue of user mistakes and faults: each ends with one line, exit code 2, and nothing changed.

Every case runs the real command line in this process (no interpreter start-up per case) against a
work folder that already holds a finished step-0 and step-1 run and an unfinished step-1 run; the
bytes of every pre-existing file (runs and data) must be the same afterwards. Two classes are covered
systematically, across every tool that reads data or writes files (``FAULT_CASES``): faults of the data
that would show only when batches are built, and output paths that cannot be written; both are refused
before any work, so those cases also assert that not a single path was created.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import shutil
import types
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from engine.build import check_stage_data
from engine.cli import stage_main
from engine.config import resolve_config
from tests.helpers import REPO, tiny_args, write_domain
from tools import (
    benchmark,
    collect_results,
    gpu_check,
    gpu_report,
    kill_resume_study,
    make_synthetic,
    predict,
    prepare_isprs,
    run_pipeline,
    validity,
)
from tools import convert_original_checkpoint as convert
from tools import evaluate as evaluate_tool
from utils.config import OPTIONS
from utils.errors import UserError, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(synthetic_root, tmp_path_factory) -> dict[str, Path]:
    """Data (good and with one bad label), finished step0/step1 runs, an unfinished step1 run, bad files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    bad_data = root / "bad-data"
    shutil.copytree(synthetic_root, bad_data)
    label = sorted((bad_data / "potsdam_irrg" / "ann_dir" / "train").iterdir())[5]
    ids = np.array(Image.open(label))
    ids[0, 0] = 7  # not a class id in any label format
    Image.fromarray(ids).save(label)
    work, partial = root / "work", root / "partial"
    for stage, folder, extra in (("step0", work, ()), ("step1", work, ()), ("step1", partial, ("--stop-after", "1"))):
        assert run_cli(_stage(stage), tiny_args(synthetic_root, folder, "--progress", "false", *extra)) == 0
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"model": argparse.Namespace(evil=True), "meta": {}}, root / "pickled.pt")
    whole = (work / "step1" / "model.pt").read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (root / "a-file").write_text("in the way")
    (root / "bad.yaml").write_text("lr: [unclosed\n")
    (root / "unknown.yaml").write_text("learning_rate: 0.1\n")
    return {"root": root, "data": synthetic_root, "bad_data": bad_data, "work": work, "partial": partial}


def _stage(stage: str) -> Callable:
    return lambda argv: stage_main(stage, argv)


def _args(w: dict[str, Path], *extra: str, work: str = "work", data: str = "data") -> list[str]:
    return tiny_args(w[data], w[work] if work in w else w["root"] / work, "--progress", "false", *extra)


# (case id, entry point, argv from the fixture's paths); each must fail with one line and exit code 2.
CASES: list[tuple[str, Callable, Callable[[dict], list[str]]]] = [
    # --- options out of range, of the wrong length or type (7)
    ("batch-size-0", _stage("step0"), lambda w: _args(w, "--batch-size", "0", "--overwrite")),
    ("batch-size-negative", _stage("step0"), lambda w: _args(w, "--batch-size", "-3")),
    ("eval-batch-size-0", _stage("step0"), lambda w: _args(w, "--eval-batch-size", "0")),
    ("num-workers-negative", _stage("step0"), lambda w: _args(w, "--num-workers", "-1")),
    ("lr-negative", _stage("step1"), lambda w: _args(w, "--lr", "-1", "--overwrite")),
    ("lr-zero", _stage("step1"), lambda w: _args(w, "--lr", "0")),
    ("lr-d-nan", _stage("step1"), lambda w: _args(w, "--lr-d", "nan")),
    ("betas-one-value", _stage("step1"), lambda w: _args(w, "--betas", "0.5")),
    ("betas-d-three-values", _stage("step1"), lambda w: _args(w, "--betas-d", "0.9", "0.99", "0.5")),
    ("betas-above-one", _stage("step1"), lambda w: _args(w, "--betas", "1.5", "0.9")),
    ("weight-decay-negative", _stage("step0"), lambda w: _args(w, "--weight-decay", "-1")),
    ("epochs-0", _stage("step0"), lambda w: _args(w, "--epochs", "0", "--overwrite")),
    ("epochs-not-a-number", _stage("step0"), lambda w: _args(w, "--epochs", "many")),
    ("iters-per-epoch-negative", _stage("step0"), lambda w: _args(w, "--iters-per-epoch", "-1", "--overwrite")),
    ("stop-after-0", _stage("step1"), lambda w: _args(w, "--stop-after", "0", "--resume", work="partial")),
    ("checkpoint-every-negative", _stage("step0"), lambda w: _args(w, "--checkpoint-every", "-1")),
    ("log-every-0", _stage("step0"), lambda w: _args(w, "--log-every", "0", "--overwrite")),
    ("eval-every-negative", _stage("step0"), lambda w: _args(w, "--eval-every", "-2")),
    ("img-size-0", _stage("step0"), lambda w: _args(w, "--img-size", "0", "--resize", "0")),
    ("img-size-not-multiple-of-32", _stage("step0"), lambda w: _args(w, "--img-size", "50")),
    ("num-classes-against-data", _stage("step0"), lambda w: _args(w, "--num-classes", "7", "--clusters", *"1" * 7,
                                                                  "--gnce-windows", *"1" * 7)),
    ("num-classes-against-clusters", _stage("step0"), lambda w: _args(w, "--num-classes", "5")),
    ("clusters-wrong-length", _stage("step2"), lambda w: _args(w, "--clusters", "1", "1", "1")),
    ("clusters-zero", _stage("step2"), lambda w: _args(w, "--clusters", "0", "1", "1", "1", "1", "1")),
    ("clusters-not-dividing", _stage("step2"), lambda w: _args(w, "--clusters", "2", "2", "2", "2", "3", "3")),
    ("tau-start-above-one", _stage("step1"), lambda w: _args(w, "--tau-start", "1.5")),
    ("tau-min-above-start", _stage("step2"), lambda w: _args(w, "--tau-min", "0.95")),
    ("hflip-above-one", _stage("step3"), lambda w: _args(w, "--hflip", "2")),
    ("weak-scale-reversed", _stage("step3"), lambda w: _args(w, "--weak-scale", "2", "1")),
    ("randaug-m-1", _stage("step3"), lambda w: _args(w, "--randaug-m", "1")),
    ("kd-temperature-0", _stage("step3"), lambda w: _args(w, "--kd-temperature", "0")),
    ("ema-momentum-above-one", _stage("step3"), lambda w: _args(w, "--ema-momentum", "1.5")),
    ("seed-negative", _stage("step0"), lambda w: _args(w, "--seed", "-1")),
    ("device-unknown-type", _stage("step0"), lambda w: _args(w, "--device", "tpu", "--overwrite")),
    ("device-other-backend", _stage("step0"), lambda w: _args(w, "--device", "mps")),
    ("device-gpu-index-absent", _stage("step0"), lambda w: _args(w, "--device", "cuda:99")),
    ("amp-fp16-on-cpu", _stage("step1"), lambda w: _args(w, "--amp", "fp16", "--overwrite")),
    ("bool-not-a-bool", _stage("step0"), lambda w: _args(w, "--cache", "maybe")),
    # --- inputs that do not exist or are not what they claim
    ("data-root-missing", _stage("step0"), lambda w: _args(w, "--data-root", str(w["root"] / "nowhere"))),
    ("source-unknown", _stage("step0"), lambda w: _args(w, "--source", "atlantis", "--overwrite")),
    ("config-missing", _stage("step0"), lambda w: ["--config", str(w["root"] / "none.yaml"), *_args(w)]),
    ("config-not-yaml", _stage("step0"), lambda w: ["--config", str(w["root"] / "bad.yaml"), *_args(w)]),
    ("config-unknown-key", _stage("step0"), lambda w: ["--config", str(w["root"] / "unknown.yaml"), *_args(w)]),
    ("init-missing", _stage("step2"), lambda w: _args(w, "--init", str(w["root"] / "none.pt"), work="fresh")),
    ("init-garbage", _stage("step2"), lambda w: _args(w, "--init", str(w["root"] / "garbage.pt"), work="fresh")),
    ("init-pickled-objects", _stage("step2"), lambda w: _args(w, "--init", str(w["root"] / "pickled.pt"),
                                                              work="fresh")),
    ("init-truncated", _stage("step2"), lambda w: _args(w, "--init", str(w["root"] / "truncated.pt"), work="fresh")),
    ("init-wrong-stage", _stage("step2"), lambda w: _args(w, "--init", str(w["work"] / "step0"), work="fresh")),
    # --- run folders: finished work is never replaced by a failing run
    ("rerun-finished", _stage("step0"), lambda w: _args(w)),
    ("resume-finished", _stage("step1"), lambda w: _args(w, "--resume")),
    ("resume-nothing", _stage("step1"), lambda w: _args(w, "--resume", work="fresh")),
    ("resume-other-batch-size", _stage("step1"), lambda w: _args(w, "--resume", "--batch-size", "4",
                                                                 work="partial")),
    ("overwrite-bad-label", _stage("step0"), lambda w: _args(w, "--overwrite", "--iters-per-epoch", "9",
                                                             data="bad_data")),
    ("overwrite-bad-label-in-worker", _stage("step0"), lambda w: _args(w, "--overwrite", "--iters-per-epoch", "9",
                                                                       "--num-workers", "2", data="bad_data")),
    ("overwrite-diverging", _stage("step1"), lambda w: _args(w, "--overwrite", "--lr", "1e6")),
    ("work-dir-under-a-file", _stage("step0"), lambda w: _args(w, "--work-dir", str(w["root"] / "a-file" / "x"))),
    # --- the tools
    ("pipeline-bad-option", run_pipeline.main, lambda w: ["--config", str(w["root"] / "unknown.yaml"),
                                                          "--work-dir", str(w["work"]), "--stages", "step2"]),
    ("evaluate-batch-size-0", evaluate_tool.main, lambda w: _eval_args(w, "--batch-size", "0")),
    ("evaluate-garbage", evaluate_tool.main, lambda w: _eval_args(w, "--checkpoint", str(w["root"] / "garbage.pt"))),
    ("evaluate-pickled-objects", evaluate_tool.main,
     lambda w: _eval_args(w, "--checkpoint", str(w["root"] / "pickled.pt"))),
    ("evaluate-device-unknown", evaluate_tool.main, lambda w: _eval_args(w, "--device", "tpu")),
    ("evaluate-json-under-a-file", evaluate_tool.main,
     lambda w: _eval_args(w, "--json", str(w["root"] / "a-file" / "out.json"))),
]


def _eval_args(w: dict[str, Path], *extra: str) -> list[str]:
    args = {"--checkpoint": str(w["work"] / "step1"), "--data-root": str(w["data"]), "--domain": "vaihingen_irrg",
            "--resize": "64", "--num-workers": "0", "--device": "cpu", "--batch-size": "4"}
    args.update(dict(zip(extra[::2], extra[1::2])))
    return [x for kv in args.items() for x in kv]


_HASHES: dict[tuple, str] = {}


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file, except the staging folders (``<stage>.new``) that failed overwrites leave.

    Hashes are cached by (path, inode, size, mtime): a file is read again only when one of them changed.
    """
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(q.endswith(".new") for q in p.parts):
            st = p.stat()
            key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in _HASHES:
                _HASHES[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = _HASHES[key]
    return out


def _fail_once(main: Callable, argv: list[str], capsys) -> str:
    code = run_cli(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and 1 <= len(lines) <= 2, err[-2000:]
    assert lines[-1].startswith("error: ")
    # Hints name only flags that exist, and never invite an unsafe load.
    assert "weights_only" not in err and not re.search(r"--[a-z]+_", err), lines[-1]
    return lines[-1]


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40 and len({case for case, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line_and_changes_nothing(case, world, capsys):
    _, main, argv = case
    roots = (world["root"], world["data"])
    before = [_snapshot(r) for r in roots]
    _fail_once(main, argv(world), capsys)
    after = [_snapshot(r) for r in roots]
    for b, a in zip(before, after):
        changed = {k for k in b if a.get(k) != b[k]}
        assert not changed, f"pre-existing files changed: {sorted(changed)[:5]}"


def test_a_failed_overwrite_keeps_the_old_run_and_a_later_one_replaces_it(world, capsys):
    """The staging folder of a failed --overwrite never blocks the next attempt."""
    old = (world["work"] / "step0" / "model.pt").read_bytes()
    _fail_once(_stage("step0"), _args(world, "--overwrite", "--iters-per-epoch", "9", data="bad_data"), capsys)
    assert (world["work"] / "step0" / "model.pt").read_bytes() == old
    work = world["root"] / "replace"
    shutil.copytree(world["work"], work)
    assert run_cli(_stage("step0"), _args(world, "--overwrite", "--epochs", "1", work="replace")) == 0
    assert (work / "step0" / "model.pt").read_bytes() != old
    assert not (work / "step0.new").exists() and not (work / "step0.old").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failing_disk_is_one_line_and_keeps_the_previous_checkpoint(world, capsys, monkeypatch, code):
    import utils.checkpoint

    last = world["partial"] / "step1" / "last.pt"
    before = last.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    # The disk fails for the checkpoint writer only: the moment of writing (fsync) or of renaming.
    broken_os = types.SimpleNamespace(**vars(os))
    setattr(broken_os, "fsync" if code == errno.ENOSPC else "replace", fail)
    monkeypatch.setattr(utils.checkpoint, "os", broken_os)
    line = _fail_once(_stage("step1"), _args(world, "--resume", "--stop-after", "1", work="partial"), capsys)
    assert str(last) in line and os.strerror(code) in line
    assert last.read_bytes() == before
    assert [p.name for p in last.parent.glob(".last.pt.*")] == []


# Bad values the type check and the range table refuse; free-text options are covered by the catalogue.
BAD_VALUE = {bool: "maybe", int: "x", float: "x"}
FREE_TEXT = {"data_root", "source", "target", "pretrained", "work_dir", "init"}


@pytest.mark.parametrize("key", sorted(OPTIONS))
def test_every_option_refuses_a_bad_value(key):
    """Walks the option table: each option has a value that is refused with one line, before any work."""
    opt = OPTIONS[key]
    if key in FREE_TEXT:
        assert opt.type is str and opt.choices is None  # checked where they are used (see CASES)
        return
    if opt.choices is not None:
        bad = "no-such-choice"
    elif key == "device":
        bad = "tpu"
    elif opt.range is not None:
        low = opt.range[0]
        bad = str(low - 1 if opt.type is int else -1.0 if low >= 0 else float("nan"))
    else:
        bad = BAD_VALUE[opt.type]
    value = [bad] * (opt.length or 6) if opt.is_list else bad
    with pytest.raises(UserError) as err:
        resolve_config("step2", overrides={key: value})
    assert "\n" not in str(err.value) and key in str(err.value)


# ------------------------------------------------------------------------------------------------------------
# Faults of the data that show only when batches are built, and output paths that cannot be written: each is
# refused before any work, so these cases also assert that nothing at all was written.


def _write_png(path: Path, array: np.ndarray) -> None:
    cv2.imwrite(str(path), array)


def _resize_pair(domain: Path, split: str, stem: str, size: tuple[int, int] = (80, 96)) -> None:
    """One patch and its label resized to ``size`` (H, W), as another tool might have cut them."""
    for sub, interpolation in (("img_dir", cv2.INTER_LINEAR), ("ann_dir", cv2.INTER_NEAREST)):
        path = domain / sub / split / f"{stem}.png"
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), cv2.resize(array, size[::-1], interpolation=interpolation))


def _scale_labels(folder: Path, factor: int) -> None:
    """Labels saved for viewing (ids times ``factor``) instead of as ids."""
    for path in folder.iterdir():
        _write_png(path, cv2.imread(str(path), cv2.IMREAD_UNCHANGED) * factor)


def _write_meta(domain: Path, **meta: object) -> None:
    (domain / "meta.json").write_text(json.dumps(meta))


def _remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# Data roots with one fault each, made from a tiny good set (64-px patches, no meta.json): name -> edit.
P, V = "potsdam_irrg", "vaihingen_irrg"
FAULTY_DATA: dict[str, Callable[[Path], None]] = {
    "mixed": lambda d: _resize_pair(d / P, "train", "q2"),
    "mixed-meta": lambda d: (_write_meta(d / P, clip=64, label_format="mmseg_raw"), _resize_pair(d / P, "train", "q2")),
    "mixed-target-val": lambda d: _resize_pair(d / V, "val", "q1"),
    "rgba": lambda d: _write_png(d / P / "img_dir" / "train" / "q1.png", np.zeros((64, 64, 4), np.uint8)),
    "grey-target": lambda d: _write_png(d / V / "img_dir" / "train" / "q0.png", np.zeros((64, 64), np.uint8)),
    "deep": lambda d: _write_png(d / P / "img_dir" / "val" / "q0.png", np.zeros((64, 64, 3), np.uint16)),
    "junk-image": lambda d: (d / P / "img_dir" / "train" / "q0.png").write_bytes(b"not a png"),
    "colour-label": lambda d: _write_png(d / P / "ann_dir" / "train" / "q3.png", np.zeros((64, 64, 3), np.uint8)),
    "label-size": lambda d: _write_png(d / P / "ann_dir" / "val" / "q1.png", np.zeros((64, 48), np.uint8)),
    "scaled-labels": lambda d: _scale_labels(d / P / "ann_dir" / "train", 40),
    "meta-format": lambda d: _write_meta(d / P, label_format="train_ids",
                                         label_values={"train": list(range(7)), "val": list(range(7))}),
    "unpaired": lambda d: _remove(d / P / "ann_dir" / "train" / "q3.png"),
    "no-val": lambda d: _remove(d / P / "img_dir" / "val", d / P / "ann_dir" / "val"),
    "empty-target-val": lambda d: _remove(*(d / V / "img_dir" / "val").iterdir()),
    "one-target-patch": lambda d: _remove(*sorted((d / V / "img_dir" / "train").iterdir())[1:]),
    "cache-in-the-way": lambda d: (d / P / ".cache").write_text("a file where the cache folder goes"),
}


@pytest.fixture(scope="module")
def faults(world, synthetic_raw) -> dict[str, Path]:
    """The world's paths plus faulty data roots (``FAULTY_DATA``) and folders that outputs collide with."""
    base = world["root"] / "faults"
    good = base / "good"
    for i, domain in enumerate((P, V)):
        write_domain(good / domain, "train", n=4, size=(64, 64), seed=2 * i)
        write_domain(good / domain, "val", n=2, size=(64, 64), seed=2 * i + 1)
    paths = {**world, "faults": base, "good": good, "raw": synthetic_raw["potsdam"]}
    for name, edit in FAULTY_DATA.items():
        shutil.copytree(good, base / name)
        edit(base / name)
        paths[name] = base / name
    for folder, name in (("stages", "step1"), ("pred-out", "tile_classes.tif"), ("results-old", "results.md"),
                         ("prepared-old", "old.txt"), ("synthetic-old/potsdam_rgb", "old.txt")):
        (base / folder).mkdir(parents=True)
        (base / folder / name).write_text("earlier output")
    for folder in ("a-folder", "empty", "results-dir/results.png", "study/validity.json", "pipe/results.json"):
        (base / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(base / "tile.png")
    return paths


def _data(w: dict[str, Path], data: str, *extra: str, work: str = "fresh") -> list[str]:
    """Step-script flags reading the data root ``data`` (a faulty one of the fixture, or the good one)."""
    return _args(w, "--data-root", str(w[data]), *extra, work=work)


def _file(w: dict[str, Path], *below: str) -> str:
    """The world's a-file, or a path below it."""
    return str(Path(w["root"], "a-file", *below))


def _in(w: dict[str, Path], *parts: str) -> str:
    """A path in the fixture's folder of faults."""
    return str(Path(w["faults"], *parts))


def _eval_on(w: dict[str, Path], data: str, *extra: str) -> list[str]:
    return _eval_args(w, "--data-root", str(w[data]), "--domain", P, "--split", "train", *extra)


def _predict_args(w: dict[str, Path], out: str) -> list[str]:
    return ["--checkpoint", str(w["work"] / "step1"), "--input", _in(w, "tile.png"), "--out", out, "--device", "cpu"]


def _prepare_args(w: dict[str, Path], out: str, *extra: str) -> list[str]:
    return ["--dataset", "potsdam", "--bands", "rgb", "--raw", str(w["raw"]), "--out", out, *extra]


def _convert_args(w: dict[str, Path], out: str, *extra: str) -> list[str]:
    return ["--checkpoint", str(w["root"] / "garbage.pt"), "--out", out, *extra]


DEMO = str(REPO / "configs" / "demo.yaml")
STUDY = ("--data-seed", "0", "--seeds", "0")

# (case id, entry point, argv from the fixture's paths, a phrase the one line must hold)
DATA_FAULTS: list[tuple[str, Callable, Callable[[dict], list[str]], str]] = [
    # --- the step scripts (17)
    ("step0-mixed-sizes", _stage("step0"), lambda w: _data(w, "mixed", "--resize", "none"),
     "img_dir/train holds patches of different sizes (64x64: 3 file(s), e.g. q0.png; 96x80: 1 file(s), e.g. q2.png)"
     "; batches of 4 need one size: pass --resize 64"),
    ("step0-mixed-sizes-against-meta-json", _stage("step0"), lambda w: _data(w, "mixed-meta"),
     "q2.png is 96x80 but"),
    ("step1-mixed-sizes-in-target-val", _stage("step1"), lambda w: _data(w, "mixed-target-val", "--resize", "none"),
     "vaihingen_irrg/img_dir/val holds patches of different sizes"),
    ("step0-crop-larger-than-a-patch", _stage("step0"), lambda w: _data(w, "good", "--resize", "none",
                                                                       "--img-size", "96"),
     "training crops of --img-size 96 are larger than the 64x64 patch"),
    ("step2-crop-larger-than-resize", _stage("step2"), lambda w: _data(w, "good", "--img-size", "128", work="work"),
     "larger than --resize 64"),
    ("step0-image-four-bands", _stage("step0"), lambda w: _data(w, "rgba"), "found 4 band(s) (mode RGBA)"),
    ("step1-target-image-one-band", _stage("step1"), lambda w: _data(w, "grey-target"), "found 1 band(s) (mode L)"),
    ("step0-image-16-bit", _stage("step0"), lambda w: _data(w, "deep"), "found mode RGB 16-bit"),
    ("step0-image-not-an-image", _stage("step0"), lambda w: _data(w, "junk-image"), "cannot decode image"),
    ("step0-label-colour-coded", _stage("step0"), lambda w: _data(w, "colour-label"),
     "expected a single-channel 8-bit label image, found mode RGB"),
    ("step0-label-other-size", _stage("step0"), lambda w: _data(w, "label-size"),
     "q1.png is 48x64 but its image is 64x64"),
    ("step0-label-values-scaled", _stage("step0"), lambda w: _data(w, "scaled-labels"), "no label id of any format"),
    ("step2-label-values-against-meta-json", _stage("step2"), lambda w: _data(w, "meta-format", work="work"),
     "not allowed in label_format 'train_ids'"),
    ("step0-image-without-label", _stage("step0"), lambda w: _data(w, "unpaired"), "without a label: q3"),
    ("step0-split-missing", _stage("step0"), lambda w: _data(w, "no-val"), "splits present: train"),
    ("step1-target-val-empty", _stage("step1"), lambda w: _data(w, "empty-target-val"), "holds no"),
    ("step1-target-smaller-than-a-batch", _stage("step1"), lambda w: _data(w, "one-target-patch"),
     "1 samples cannot fill one batch of 2"),
    # --- the tools that read data (10; patches of mixed sizes are resized as the checkpoint's run did)
    ("evaluate-mixed-sizes-against-meta-json", evaluate_tool.main, lambda w: _eval_on(w, "mixed-meta"),
     "says the patches are 64x64"),
    ("evaluate-image-four-bands", evaluate_tool.main, lambda w: _eval_on(w, "rgba"), "mode RGBA"),
    ("evaluate-slide-label-colour-coded", evaluate_tool.main, lambda w: _eval_on(w, "colour-label", "--mode", "slide"),
     "found mode RGB"),
    ("evaluate-recalibrate-on-one-band-images", evaluate_tool.main,
     lambda w: [*_eval_args(w, "--data-root", str(w["grey-target"])), "--recalibrate-bn"], "mode L"),
    ("pipeline-mixed-sizes", run_pipeline.main,
     lambda w: ["--config", DEMO, "--stages", "step0", *_data(w, "mixed", "--resize", "none", "--window", "none")],
     "holds patches of different sizes"),
    ("benchmark-stage-mixed-sizes", benchmark.main,
     lambda w: ["--what", "stage", "--stages", "step0", "--data-root", str(w["mixed"]), "--source", P, "--target", V,
                "--size", "64", "--backbone", "resnet18"], "batches of 2 need one size: pass --resize 64"),
    ("prepare-tiles-smaller-than-the-clip", prepare_isprs.main,
     lambda w: _prepare_args(w, _in(w, "prepared"), "--clip", "20000"), "choose a smaller --clip"),
    ("prepare-raw-folder-empty", prepare_isprs.main,
     lambda w: [*_prepare_args(w, _in(w, "prepared")), "--raw", _in(w, "empty")], "no potsdam RGB images"),
    ("predict-input-folder-empty", predict.main,
     lambda w: ["--checkpoint", str(w["work"] / "step1"), "--input", _in(w, "empty"), "--out", _in(w, "predicted")],
     "holds no"),
    ("collect-results-no-finished-stage", collect_results.main,
     lambda w: [_in(w, "empty"), "--out", _in(w, "collected")], "holds no finished stage"),
]
OUTPUT_FAULTS: list[tuple[str, Callable, Callable[[dict], list[str]], str]] = [
    # --- the step scripts and the cache they write (4)
    ("step0-work-dir-is-a-file", _stage("step0"), lambda w: _args(w, "--work-dir", _file(w)),
     "is a file; choose a folder"),
    ("step1-stage-folder-is-a-file", _stage("step1"), lambda w: _args(w, "--work-dir", _in(w, "stages")),
     "stages/step1 is a file"),
    ("step3-work-dir-under-a-file", _stage("step3"), lambda w: _args(w, "--work-dir", _file(w, "x")),
     "a-file is a file, not a folder"),
    ("step0-cache-folder-is-a-file", _stage("step0"), lambda w: _data(w, "cache-in-the-way", "--cache", "true"),
     "potsdam_irrg/.cache is a file"),
    # --- the tools (26)
    ("evaluate-json-is-a-folder", evaluate_tool.main, lambda w: _eval_args(w, "--json", _in(w, "a-folder")),
     "a-folder is a folder, not a file"),
    ("evaluate-json-deep-under-a-file", evaluate_tool.main,
     lambda w: _eval_args(w, "--json", _file(w, "x", "y", "out.json")), "a-file is a file"),
    ("predict-out-is-a-file", predict.main, lambda w: _predict_args(w, _file(w)), "a-file is a file"),
    ("predict-out-under-a-file", predict.main, lambda w: _predict_args(w, _file(w, "x")), "a-file is a file"),
    ("predict-existing-output", predict.main, lambda w: _predict_args(w, _in(w, "pred-out")),
     "tile_classes.tif exists; pass --overwrite"),
    ("collect-results-out-is-a-file", collect_results.main, lambda w: [str(w["work"]), "--out", _file(w)],
     "a-file is a file; choose a folder"),
    ("collect-results-existing-results", collect_results.main,
     lambda w: [str(w["work"]), "--out", _in(w, "results-old")], "results.md exists; pass --overwrite"),
    ("collect-results-picture-is-a-folder", collect_results.main,
     lambda w: [str(w["work"]), "--out", _in(w, "results-dir"), "--overwrite"], "results.png is a folder"),
    ("validity-out-under-a-file", validity.main, lambda w: [*STUDY, "--out", _file(w, "x")], "a-file is a file"),
    ("validity-results-is-a-folder", validity.main, lambda w: [*STUDY, "--out", _in(w, "study")],
     "validity.json is a folder"),
    ("pipeline-work-dir-is-a-file", run_pipeline.main, lambda w: ["--config", DEMO, "--work-dir", _file(w)],
     "a-file is a file; choose a folder"),
    ("pipeline-results-is-a-folder", run_pipeline.main, lambda w: ["--config", DEMO, "--work-dir", _in(w, "pipe")],
     "results.json is a folder"),
    ("prepare-out-is-a-file", prepare_isprs.main, lambda w: _prepare_args(w, _file(w)), "a-file is a file"),
    ("prepare-out-under-a-file", prepare_isprs.main, lambda w: _prepare_args(w, _file(w, "x")), "a-file is a file"),
    ("prepare-out-holds-files", prepare_isprs.main, lambda w: _prepare_args(w, _in(w, "prepared-old")),
     "already holds files; pass --overwrite"),
    ("synthetic-out-is-a-file", make_synthetic.main, lambda w: ["--out", _file(w)], "a-file is a file"),
    ("synthetic-out-under-a-file", make_synthetic.main, lambda w: ["--out", _file(w, "x")], "a-file is a file"),
    ("synthetic-domain-holds-files", make_synthetic.main, lambda w: ["--out", _in(w, "synthetic-old")],
     "potsdam_rgb already holds files; pass --overwrite"),
    ("convert-out-exists", convert.main, lambda w: _convert_args(w, str(w["root"] / "truncated.pt")),
     "truncated.pt exists; pass --overwrite"),
    ("convert-out-is-a-folder", convert.main, lambda w: _convert_args(w, _in(w, "a-folder"), "--overwrite"),
     "is a folder, not a file"),
    ("convert-out-under-a-file", convert.main, lambda w: _convert_args(w, _file(w, "x", "c.pt")), "a-file is a file"),
    ("benchmark-json-under-a-file", benchmark.main, lambda w: ["--json", _file(w, "x", "b.json")], "a-file is a file"),
    ("benchmark-json-is-a-folder", benchmark.main, lambda w: ["--json", _in(w, "a-folder")], "is a folder"),
    ("gpu-report-out-is-a-file", gpu_report.main, lambda w: ["--device", "cpu", "--tiny", "--out", _file(w)],
     "a-file is a file; choose a folder"),
    ("gpu-check-work-dir-under-a-file", gpu_check.main, lambda w: ["--work-dir", _file(w, "x")], "a-file is a file"),
    ("kill-study-work-dir-is-a-file", kill_resume_study.main, lambda w: ["--work-dir", _file(w)],
     "a-file is a file; choose a folder"),
]
FAULT_CASES = DATA_FAULTS + OUTPUT_FAULTS


def _tree(root: Path) -> list[str]:
    """Every path under ``root``, folders included: what a case must leave exactly as it found it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _visible_lines(err: str) -> list[str]:
    """The lines a terminal shows of ``err``: a progress bar that erases itself (``\\r``) leaves none."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def test_the_fault_catalogue_covers_both_classes():
    ids = [case for case, *_ in FAULT_CASES]
    assert len(ids) == len(set(ids)) and not set(ids) & {case for case, *_ in CASES}
    assert len(DATA_FAULTS) >= 15 and len(OUTPUT_FAULTS) >= 15


def test_the_faulty_data_differ_from_good_data_only_in_their_fault(faults):
    """The good set the faulty ones are made from passes every check of a stage that reads both domains."""
    cfg = resolve_config("step1", overrides={"data_root": str(faults["good"]), "source": P, "target": V,
                                             "resize": None, "img_size": 64, "batch_size": 2, "eval_batch_size": 4})
    check_stage_data(cfg, faults["good"] / P, faults["good"] / V)


@pytest.mark.parametrize("case", FAULT_CASES, ids=[c[0] for c in FAULT_CASES])
def test_a_fault_is_one_line_before_any_work(case, faults, capsys):
    name, main, argv, phrase = case
    roots = (faults["root"], faults["data"], faults["raw"])
    before = [(_snapshot(r), _tree(r)) for r in roots]
    code = run_cli(main, argv(faults))
    out, err = capsys.readouterr()
    lines = _visible_lines(err)
    assert code == 2 and err.count("\n") == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("error: ") and phrase in lines[0], lines[0]
    if (name, main, argv, phrase) in OUTPUT_FAULTS:  # refused before any work: nothing of a result printed
        assert out == "", out[-2000:]
    for (hashes, tree), root in zip(before, roots):
        assert _tree(root) == tree, f"{name} wrote under {root}: {sorted(set(_tree(root)) ^ set(tree))[:5]}"
        assert _snapshot(root) == hashes, f"{name} changed files under {root}"
