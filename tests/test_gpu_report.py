"""tools/gpu_report.py end to end on the CPU at CI size (no timing assertions: speed is the tool's output)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import tools.gpu_report as gpu_report

VARIANT_KEYS = {"stage", "setting", "images_per_s", "s_per_iter", "data_fraction", "peak_mem_mib",
                "gflop_per_image", "peak_fraction", "error"}


def test_cpu_tiny_report_has_every_field(tmp_path: Path) -> None:
    assert gpu_report.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert {"device", "gpu_check", "variants", "refresh_s", "eval_s", "loader", "projected_pipeline_s"} <= set(report)
    assert report["device"]["type"] == "cpu" and report["device"]["peak_bf16_tflops"] is None
    assert report["gpu_check"] is None  # GPU-only
    expected = [tuple(name.split(":")[1:]) for name, _ in gpu_report.PARTS if name.startswith("variant:")]
    assert [(v["stage"], v["setting"]) for v in report["variants"]] == expected
    for v in report["variants"]:
        assert set(v) == VARIANT_KEYS
        assert v["peak_mem_mib"] is None and v["peak_fraction"] is None  # GPU-only
        if gpu_report.SETTINGS[v["setting"]]["compile"]:
            assert "GPU only" in v["error"] and v["images_per_s"] is None
        else:
            assert v["error"] is None and v["images_per_s"] > 0 and v["gflop_per_image"] > 0
            assert v["images_per_s"] == pytest.approx((2 * gpu_report.SCALES["tiny"]["batch"]) / v["s_per_iter"])
    assert report["refresh_s"] > 0 and report["eval_s"] > 0
    assert {(r["impl"], r["workers"]) for r in report["loader"]["rows"]} == {
        (impl, w) for impl in ("png", "cache") for w in (0, gpu_report.SCALES["tiny"]["workers"])}
    stages = report["projection"]["stages"]
    assert set(stages) == {"step0", "step1", "step2", "step3"}
    assert report["projected_pipeline_s"] == pytest.approx(sum(s["seconds"] for s in stages.values()))
    table = (tmp_path / "gpu_report.md").read_text()
    assert table.count("| step") == len(report["variants"]) and "Projected paper schedule" in table


def test_flops_are_counted_per_image() -> None:
    cfg = gpu_report.stage_config("step1", gpu_report._bench_args(gpu_report.SCALES["tiny"], torch.device("cpu")),
                                  None)
    small = gpu_report.gflop_per_image(cfg, torch.device("cpu"))
    larger = gpu_report.gflop_per_image(dataclasses.replace(cfg, img_size=2 * cfg.img_size), torch.device("cpu"))
    assert larger == pytest.approx(4 * small, rel=0.05)  # convolutions scale with the pixel count


def test_peak_table_matches_the_most_specific_name() -> None:
    table = dict(gpu_report.PEAK_BF16_TFLOPS)
    assert gpu_report.peak_tflops("NVIDIA A100-SXM4-80GB") == table["A100"]
    assert gpu_report.peak_tflops("NVIDIA A10") == table["A10"]
    assert gpu_report.peak_tflops("NVIDIA H100 PCIe") == table["H100 PCIe"]
    assert gpu_report.peak_tflops("NVIDIA H100 80GB HBM3") == table["H100"]
    assert gpu_report.peak_tflops("NVIDIA L40S") == table["L40S"]
    assert gpu_report.peak_tflops("a device nobody listed") is None


def test_a_failing_part_is_one_line_and_the_rest_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(scale, device):
        raise RuntimeError("first line\nthe line that says what went wrong")

    monkeypatch.setattr(gpu_report, "part_passes", broken)
    failed = gpu_report._here("passes", gpu_report.SCALES["tiny"], torch.device("cpu"))
    assert failed["error"] == "RuntimeError: the line that says what went wrong"
    assert gpu_report.project_pipeline([], None, gpu_report.SCALES["tiny"]) is None
    # In a process of its own (as on a GPU), a part that crashes or overruns its cap is recorded the same way.
    args = argparse.Namespace(device="cpu", tiny=True)
    crashed = gpu_report._child("no-such-part", args, 120, tmp_path)
    assert "KeyError" in crashed["error"] and "value" not in crashed
    assert "time cap" in gpu_report._child("loader", args, 0.01, tmp_path)["error"]
