"""Smoke runs of tools/benchmark.py's stage and loader benchmarks (tiny configs, no timing assertions)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tools.benchmark as benchmark

STAGE_KEYS = {"what", "stage", "impl", "amp", "epoch", "images_per_iter", "images_per_s", "s_per_iter",
              "s_per_iter_median", "data_fraction", "refresh_s", "eval_s", "peak_mem_mb", "peak_mem_kind",
              "iter_times_s", "data", "cache_active"}
TINY = ["--device", "cpu", "--backbone", "resnet18", "--img-size", "64", "--batch-size", "2", "--repeats", "1",
        "--warmup", "0"]


def check_stage_rows(rows: list[dict], stages: list[str], batch: int) -> None:
    assert [r["stage"] for r in rows] == stages
    for r in rows:
        assert set(r) == STAGE_KEYS
        assert r["images_per_iter"] == (batch if r["stage"] == "step0" else 2 * batch)
        assert r["images_per_s"] == pytest.approx(r["images_per_iter"] / r["s_per_iter"])
        assert 0 <= r["data_fraction"] <= 1 and len(r["iter_times_s"]) == 1
        assert r["refresh_s"] > 0 and r["eval_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["peak_mem_kind"] == "cpu_max_rss" and r["epoch"] >= 1


def test_stage_benchmark_on_random_batches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stage.json"
    argv = [*TINY, "--what", "stage", "--stages", "step0", "step3", "--synthetic-random", "--head-impl",
            "reference", "--json", str(out)]
    assert benchmark.main(argv) == 0
    assert "img/s" in capsys.readouterr().out
    result = json.loads(out.read_text())
    check_stage_rows(result["results"], ["step0", "step3"], batch=2)
    assert all(r["impl"] == "reference" and r["data"] == "synthetic-random" for r in result["results"])
    assert not any(r["cache_active"] for r in result["results"])
    assert result["env"]["data_dir"] is None and result["config"]["stages"] == ["step0", "step3"]


def test_stage_and_loader_benchmarks_on_prepared_data(synthetic_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # A private copy: the cache is written into the domain folders.
    for name in ("potsdam_irrg", "vaihingen_irrg"):
        shutil.copytree(synthetic_root / name, tmp_path / "data" / name)
    out = tmp_path / "bench.json"
    argv = [*TINY, "--what", "stage", "loader", "--stages", "step1", "--resize", "64", "--cache",
            "--num-workers", "1", "--data-root", str(tmp_path / "data"), "--json", str(out)]
    assert benchmark.main(argv) == 0
    table = capsys.readouterr().out
    assert "img/s" in table and "samples/s" in table
    result = json.loads(out.read_text())
    stage_rows = [r for r in result["results"] if r["what"] == "stage"]
    loader_rows = [r for r in result["results"] if r["what"] == "loader"]
    check_stage_rows(stage_rows, ["step1"], batch=2)
    assert stage_rows[0]["data"] == str(tmp_path / "data")
    assert {(r["impl"], r["workers"]) for r in loader_rows} == {(i, w) for i in ("png", "cache") for w in (0, 1)}
    source_train = len(list((tmp_path / "data" / "potsdam_irrg" / "img_dir" / "train").iterdir()))
    for r in loader_rows:
        assert r["samples"] == source_train and r["samples_per_s"] > 0 and len(r["pass_times_s"]) == 1
        assert (r["cache_build_s"] is None) == (r["impl"] == "png")
    assert (tmp_path / "data" / "potsdam_irrg" / ".cache" / "train" / "images.u8").is_file()
