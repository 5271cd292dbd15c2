"""A catalogue of user mistakes and faults: each ends with one line, exit code 2, and nothing changed.

Every case runs the real command line in this process (no interpreter start-up per case) against a
work folder that already holds a finished step-0 and step-1 run and an unfinished step-1 run; the
bytes of every pre-existing file (runs and data) must be the same afterwards.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import shutil
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import stage_main
from tests.helpers import tiny_args
from tools import evaluate as evaluate_tool
from tools import run_pipeline
from utils.config import OPTIONS, resolve_config
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
