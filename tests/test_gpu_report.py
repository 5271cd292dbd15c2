"""tools/gpu_report.py on the CPU at CI size (no timing assertions: speed is the tool's output).

The whole ``--tiny`` report, run as the GPU machine's python3 would run it, is tests/test_gpu_machine.py's.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tools.gpu_report as gpu_report
from engine.benchmarking import stage_config
from tests.helpers import REPO

CPU = torch.device("cpu")


def _report(out: Path, isolated: bool = False) -> gpu_report.Report:
    return gpu_report.Report(device=CPU, isolated=isolated, tiny=True, out=out, work=out / "work",
                             deadline=time.monotonic() + 600, budget_s=600)


def test_flops_are_counted_per_image() -> None:
    tiny = gpu_report.SCALES["tiny"]
    cfg = stage_config("step1", size=tiny.size, batch=tiny.batch, backbone=tiny.backbone, device="cpu")
    small = gpu_report.gflop_per_image(cfg, CPU)
    larger = gpu_report.gflop_per_image(dataclasses.replace(cfg, img_size=2 * cfg.img_size), CPU)
    assert larger == pytest.approx(4 * small, rel=0.05)  # convolutions scale with the pixel count


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A10", "A10"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"), ("NVIDIA RTX A6000", "RTX A6000"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("NVIDIA A10G", None), ("a device nobody listed", None),
])
def test_the_peak_table_matches_the_whole_most_specific_name(name: str, key: str | None) -> None:
    matched = gpu_report.peak_tflops(name)
    if key is None:
        assert matched is None
    else:
        bf16, tf32 = gpu_report.PEAK_TFLOPS[key]
        assert matched == (key, {"bf16": bf16, "tf32": tf32}) and tf32 < bf16


def test_the_caps_fit_the_budget_and_the_budget_a_ten_minute_command() -> None:
    caps = [p.cap_s for p in gpu_report.PARTS]
    assert sum(caps) <= gpu_report.DEFAULT_BUDGET_S <= 600 - 30
    names = list(gpu_report.PART_NAMES)
    assert names.index("gpu_check:bf16") < names.index("variant:step2:bf16-cl") < names.index("gpu_check:fp32")
    assert max(caps) == next(p.cap_s for p in gpu_report.PARTS if p.name.endswith("-compile"))


def test_the_projection_evaluates_both_validation_splits_every_epoch() -> None:
    paper = gpu_report.SCALES["paper"]
    assert (paper.source_train, paper.target_train, paper.source_val, paper.target_val) == (3456, 344, 2016, 398)
    rows = [{"stage": "step1", "setting": "fp32", "s_per_iter": 0.5}, {"stage": "step2", "setting": "bf16-cl",
                                                                       "s_per_iter": 0.25}]
    passes = {"refresh_s": 30.0, "eval_s_per_patch": 0.01}
    projection = gpu_report.project_pipeline(rows, passes, paper)
    step2 = projection["stages"]["step2"]
    assert step2["eval_s_per_epoch"] == pytest.approx(0.01 * (398 + 2016))
    assert step2["seconds"] == pytest.approx(31 * (345 * 0.25 + 30 + 24.14) + 24.14)
    assert gpu_report.project_pipeline(rows[:1], passes, paper) is None


def test_a_failing_part_is_one_line_and_the_rest_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(scale, device):
        raise RuntimeError("first line\nthe line that says what went wrong")

    monkeypatch.setattr(gpu_report, "part_passes", broken)
    parts = [p for p in gpu_report.PARTS if p.name in ("device", "passes", "loader")]
    (tmp_path / "work").mkdir()
    report = gpu_report.run_report(_report(tmp_path), parts)
    assert report["not_measured"]["passes"] == "failed: RuntimeError: the line that says what went wrong"
    assert report["parts"]["passes"]["status"] == "failed" and report["passes"] is None
    assert report["parts"]["loader"]["status"] == "ok" and report["loader"]["rows"]
    assert "RuntimeError" in (tmp_path / "logs" / "passes.log").read_text()
    assert report["projection"] is None and not (tmp_path / "work").exists()


def test_a_part_in_a_process_of_its_own_is_recorded_the_same_way(tmp_path: Path) -> None:
    report = _report(tmp_path, isolated=True)
    ran = gpu_report.measure(gpu_report.Part("device", 120), report)
    assert ran["status"] == "ok" and ran["value"]["type"] == "cpu"
    assert (tmp_path / "parts" / "device.json").is_file() and (tmp_path / "logs" / "device.log").is_file()
    overran = gpu_report.measure(gpu_report.Part("loader", 1), report)
    assert overran["status"] == "failed" and overran["reason"] == "stopped at its cap of 1 s"
    assert overran["value"] is None
    crashed = gpu_report.measure(gpu_report.Part("no-such-part", 120), report)
    assert crashed["status"] == "failed" and "invalid choice" in crashed["reason"]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_report_killed_midway_keeps_the_parts_done_so_far(tmp_path: Path, signum: int) -> None:
    cmd = [sys.executable, "tools/gpu_report.py", "--device", "cpu", "--tiny", "--out", str(tmp_path),
           "--parts", "device", "variant:step2:fp32", "loader"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / "parts" / "device.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # until the variant has started
            report = json.loads((tmp_path / "gpu_report.json").read_text()) if done.exists() else None
            if report and report["parts"]["variant:step2:fp32"]["status"] == "running":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the report ended before it could be killed"
        proc.send_signal(signum)
        returncode = proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["parts"]["device"]["status"] == "ok" and report["device"]["type"] == "cpu"
    stopped = report["parts"]["variant:step2:fp32"]["status"]
    if signum == signal.SIGTERM:  # the report unwinds, says which part it stopped, and exits with 128 + 15
        assert returncode == 143 and stopped == "failed"
        assert report["not_measured"]["variant:step2:fp32"] == "failed: the report was stopped while it ran"
    else:
        assert returncode == -signal.SIGKILL and stopped == "running"
    assert report["parts"]["loader"]["status"] == "pending" and not report["complete"]
    assert set(report["not_measured"]) >= {"variant:step2:fp32", "loader"}
    first = (tmp_path / "gpu_report.md").read_text().splitlines()[0]
    assert first.startswith("**Not every part ran:** 1 of 3 measured")


def test_gpu_check_data_set_is_published_whole_and_made_once(tmp_path: Path) -> None:
    from tools.gpu_check import shared_data

    data = shared_data(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folder left beside it
    assert {p.name for p in data.iterdir()} == {"potsdam_irrg", "potsdam_rgb", "vaihingen_irrg"}
    made = data.stat().st_mtime_ns
    assert shared_data(tmp_path) == data and data.stat().st_mtime_ns == made  # the second check reuses it
