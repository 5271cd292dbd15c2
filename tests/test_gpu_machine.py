"""The training path and the GPU tools run with only the GPU machine's packages (utils/gpu_machine.py).

Each test runs a Python whose ``sitecustomize`` (tests/gpu_machine/) lets the project import nothing but the
standard library, its own packages and the listed ones, and nobody import matplotlib or rasterio: the
GPU machine's bare ``python3``, made from this venv without a download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, STAGE_SCRIPTS, tiny_args
from tools import gpu_report
from utils import plots
from utils.gpu_machine import GPU_MACHINE_PACKAGES

SITE = REPO / "tests" / "gpu_machine"
NOTE = "matplotlib is not installed: skipped"
# Modules of training, evaluation, the refresh and the GPU tools, and the step scripts.
MODULES = ("engine.trainer", "engine.evaluate", "engine.refresh", "engine.cli", "tools.gpu_check",
           "tools.benchmark", "tools.gpu_report", "tools.evaluate", "tools.run_pipeline")


def gpu_machine_python(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python args`` from the repository root as the GPU machine's python3 would run it."""
    env = {**os.environ, "PYTHONPATH": str(SITE)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_blocker_refuses_what_the_gpu_machine_lacks() -> None:
    proc = gpu_machine_python("-c", "import matplotlib")
    assert proc.returncode != 0 and "not on the GPU machine" in proc.stderr


def test_training_and_the_gpu_tools_import_only_listed_packages() -> None:
    scripts = "; ".join(f"runpy.run_path({script!r}, run_name='imported')" for script in STAGE_SCRIPTS.values())
    proc = gpu_machine_python("-c", f"import runpy, {', '.join(MODULES)}; {scripts}; print('imported')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported"


def test_gpu_check_starts_without_extra_packages() -> None:
    proc = gpu_machine_python("tools/gpu_check.py")  # on a machine without CUDA it stops at the device check
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no CUDA device visible; gpu-check needs a GPU"


def test_a_stage_without_matplotlib_writes_its_results_and_says_so_once(synthetic_root: Path,
                                                                         tmp_path: Path) -> None:
    proc = gpu_machine_python(STAGE_SCRIPTS["step0"], *tiny_args(synthetic_root, tmp_path, "--progress", "false"))
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "step0"
    assert (run / "eval.json").is_file() and (run / "manifest.json").is_file() and (run / "panels.png").is_file()
    assert not (run / "confusion.png").exists()
    output = proc.stdout + proc.stderr
    assert output.count(NOTE) == 1
    assert f"{NOTE} confusion.png; pip install matplotlib to draw them" in proc.stderr


def test_tiny_gpu_report_without_extra_packages_writes_every_field(tmp_path: Path) -> None:
    proc = gpu_machine_python("tools/gpu_report.py", "--device", "cpu", "--tiny", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    names = [p.name for p in gpu_report.PARTS]
    assert set(report) == {"complete", "parts", "not_measured", "device", "scale", "budget_s", "gpu_check",
                           "variants", "passes", "loader_vs_gpu", "loader", "projected_pipeline_s", "projection"}
    gpu_only = {p.name for p in gpu_report.PARTS if p.gpu_only}
    assert list(report["parts"]) == names and not report["complete"]
    for name, part in report["parts"].items():
        assert part["status"] == ("skipped" if name in gpu_only else "ok"), (name, part)
        assert (part["log"] is None) == (name in gpu_only)
        if part["log"]:
            assert (tmp_path / part["log"]).is_file() and (tmp_path / "parts").is_dir()
    # One line for every part that could not measure everything: on the CPU, each but the loaders'.
    assert set(report["not_measured"]) == set(names) - {"passes", "loader_vs_gpu", "loader"}
    assert all(isinstance(why, str) and "\n" not in why for why in report["not_measured"].values())

    device = report["device"]
    assert device["type"] == "cpu" and device["peak_key"] is None and device["sm_count"] is None
    assert device["matplotlib"] is False and device["missing_packages"] == []  # the blocker was in place
    assert set(device["packages"]) == set(GPU_MACHINE_PACKAGES)
    assert report["gpu_check"] == {"bf16": None, "fp32": None}

    expected = [tuple(n.split(":")[1:]) for n in names if n.startswith("variant:")]
    assert [(v["stage"], v["setting"]) for v in report["variants"]] == expected
    for v in report["variants"]:
        assert set(v) == {*gpu_report.VARIANT_KEYS, "error"}
        assert v["peak_mem_mib"] is None and v["peak_fraction"] is None  # GPU-only
        if gpu_report.SETTINGS[v["setting"]]["compile"]:
            assert "needs a GPU" in v["error"] and v["images_per_s"] is None
        else:
            assert v["error"] is None and v["images_per_s"] > 0 and v["gflop_per_image"] > 0 and v["warmup_s"] > 0
            assert v["compile_s"] is None
            assert v["images_per_s"] == pytest.approx(2 * gpu_report.SCALES["tiny"].batch / v["s_per_iter"])
            assert v["peak_kind"] == ("bf16" if v["setting"].startswith("bf16") else "tf32")
    passes = report["passes"]
    assert passes["refresh_s"] > 0 and passes["eval_s_per_patch"] == pytest.approx(
        passes["eval_s"] / passes["eval_patches"])
    fed = report["loader_vs_gpu"]
    assert fed["workers"] == gpu_report.SCALES["tiny"].workers and 0 <= fed["data_fraction"] <= 1
    assert {(r["impl"], r["workers"]) for r in report["loader"]["rows"]} == {
        (impl, w) for impl in ("png", "cache") for w in (0, gpu_report.SCALES["tiny"].workers)}
    stages = report["projection"]["stages"]
    assert set(stages) == {"step0", "step1", "step2", "step3"}
    assert report["projected_pipeline_s"] == pytest.approx(sum(s["seconds"] for s in stages.values()))

    table = (tmp_path / "gpu_report.md").read_text()
    assert table.splitlines()[0].startswith("**Not every part ran:** 7 of 10 measured")
    assert table.count("| step") == len(report["variants"]) and "Projected paper schedule" in table


def test_the_readme_shows_the_package_list() -> None:
    readme = (REPO / "README.md").read_text()
    gpu = readme[readme.index("**On a GPU: `make gpu-report`.**"):]
    gpu = gpu[:gpu.index("\n## ")]
    assert "utils/gpu_machine.py" in gpu
    assert all(package in gpu for package in GPU_MACHINE_PACKAGES.values())


def test_pictures_are_drawn_with_matplotlib_and_skipped_with_one_note_without(
        synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from data.dataset import SegmentationFolder
    from engine.pictures import write_stage_pictures
    from models import NAPGNet

    model = NAPGNet(6, backbone="resnet18").eval()
    dataset = SegmentationFolder(synthetic_root / "vaihingen_irrg", "val")
    confusion = np.eye(6, dtype=int).tolist()

    def draw(folder: Path) -> set[str]:
        folder.mkdir()
        drawn = write_stage_pictures(folder, model, dataset, None, torch.device("cpu"), "unit", confusion,
                                     "title")
        assert {f"{name}.png" for name in drawn} == {p.name for p in folder.iterdir()}
        return set(drawn)

    assert draw(tmp_path / "with") == {"confusion", "panels"}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it now fails
    monkeypatch.setattr(plots, "_noted", False)
    plots._pyplot.cache_clear()
    try:
        assert draw(tmp_path / "without") == {"panels"}
        assert draw(tmp_path / "again") == {"panels"}
    finally:
        plots._pyplot.cache_clear()
    assert capsys.readouterr().err.count(NOTE) == 1
