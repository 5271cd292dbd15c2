"""tools/collect_results.py: the table's means and standard deviations are those of the input runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.domains import CLASS_NAMES
from tools.collect_results import main
from utils.errors import run_cli


def _fake_run(folder: Path, rng: np.random.Generator) -> dict[str, dict]:
    """A pipeline folder with finished step0 and step2 stages holding random metrics; returns them."""
    written = {}
    for stage in ("step0", "step2"):
        metrics = {k: float(rng.uniform(0.2, 0.9)) for k in ("miou", "miou_5", "mf1", "mf1_5", "oa")}
        metrics["iou"] = [float(v) for v in rng.uniform(0, 1, len(CLASS_NAMES))]
        (folder / stage).mkdir(parents=True)
        (folder / stage / "manifest.json").write_text(json.dumps(
            {"stage": stage, "source": "potsdam_irrg", "target": "vaihingen_irrg"}))
        (folder / stage / "eval.json").write_text(json.dumps({"split": "target-val", "classifier": metrics}))
        written[stage] = metrics
    return written


def test_mean_and_std_over_seeds(tmp_path, capsys):
    rng = np.random.default_rng(0)
    runs = [tmp_path / f"seed{s}" for s in range(3)]
    inputs = [_fake_run(r, rng) for r in runs]
    out = tmp_path / "results"
    assert run_cli(main, [*map(str, runs), "--out", str(out)]) == 0
    assert "±" in capsys.readouterr().out
    rows = {r["stage"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"step0", "step2"}
    for stage, row in rows.items():
        assert row["pair"] == "potsdam_irrg -> vaihingen_irrg (mmseg)" and row["runs"] == "3"
        for key in ("miou", "miou_5", "mf1", "mf1_5"):
            values = [run[stage][key] for run in inputs]
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-6)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-6)
        for i, name in enumerate(CLASS_NAMES):
            assert float(row[f"iou_{name}_mean"]) == pytest.approx(np.mean([r[stage]["iou"][i] for r in inputs]),
                                                                  abs=1e-6)
    step2 = [run["step2"]["miou"] for run in inputs]
    want = f"{100 * np.mean(step2):.2f} ± {100 * np.std(step2, ddof=1):.2f}"
    assert want in (out / "results.md").read_text()
    with Image.open(out / "results.png") as chart:
        assert chart.size[0] > 100 and chart.size[1] > 100


def test_an_eval_json_written_before_the_metric_rename_is_read(tmp_path, capsys):
    run = tmp_path / "old"
    metrics = _fake_run(run, np.random.default_rng(2))
    for stage in ("step0", "step2"):  # "miou5" is what runs wrote before it became "miou_5"
        path = run / stage / "eval.json"
        evaluation = json.loads(path.read_text())
        evaluation["classifier"]["miou5"] = evaluation["classifier"].pop("miou_5")
        path.write_text(json.dumps(evaluation))
    out = tmp_path / "results"
    assert run_cli(main, [str(run), "--out", str(out)]) == 0
    rows = {r["stage"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert float(rows["step2"]["miou_5_mean"]) == pytest.approx(metrics["step2"]["miou_5"], abs=1e-6)


def test_existing_results_are_kept_without_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run, np.random.default_rng(1))
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.md").write_text("earlier")
    assert run_cli(main, [str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "results.md").read_text() == "earlier"
    assert run_cli(main, [str(run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "results.md").read_text() != "earlier"


def test_a_folder_without_runs_ends_with_one_line(tmp_path, capsys):
    assert run_cli(main, [str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished stage" in err[0]


def test_runs_of_different_settings_are_not_averaged_together(tmp_path, capsys):
    rng = np.random.default_rng(2)
    runs = [tmp_path / name for name in ("plain_a", "plain_b", "from_init")]
    for run, seed in zip(runs, (0, 1, 0), strict=True):
        _fake_run(run, rng)
        for stage in ("step0", "step2"):
            (run / stage / "config.yaml").write_text(f"stage: {stage}\nlr: 0.0001\nseed: {seed}\nwork_dir: {run}\n")
            init = {"path": "elsewhere/model.pt", "stage": "step0"} if run.name == "from_init" else None
            (run / stage / "env.json").write_text(json.dumps({"seed": seed, "init": init}))
    out = tmp_path / "results"
    assert run_cli(main, [*map(str, runs), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    step0 = sorted((r["runs"], r["label"]) for r in rows if r["stage"] == "step0")
    assert [n for n, _ in step0] == ["1", "2"]  # the two plain seeds together, the one started from a checkpoint alone
    assert step0[0][1].endswith("init step0") and "init" not in step0[1][1]
    table = (out / "results.md").read_text()
    assert str(runs[0] / "step0") in table and str(runs[2] / "step0") in table  # the grouping is shown
    assert run_cli(main, [*map(str, runs), "--out", str(out), "--overwrite", "--label", "all"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["stage"], r["runs"], r["label"]) for r in rows} == {("step0", "3", "all"), ("step2", "3", "all")}
