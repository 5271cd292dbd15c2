"""tools/validity.py end to end on a tiny setting: every run, the JSON interface, the table and the chart."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tools import validity

pytestmark = pytest.mark.slow

TINY = """\
backbone: resnet18
pretrained: null
resize: 64
img_size: 64
batch_size: 2
eval_batch_size: 4
num_workers: 0
device: cpu
iters_per_epoch: 2
refresh_max_batches: 2
eval_max_batches: 2
progress: false
step1:
  epochs: 1
  tgt_proto_start: 1
step2:
  epochs: 1
step3:
  epochs: 1
"""


def _study(tmp_path, *flags):
    cmd = [sys.executable, "tools/validity.py", "--data-seed", "3", "--size", "small", "--out", str(tmp_path / "study"),
           "--config", str(tmp_path / "tiny.yaml"), "--warm-epochs", "1", *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_validity_study_end_to_end(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    first = _study(tmp_path, "--seeds", "0", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "study"
    result = json.loads((out / "validity.json").read_text())
    assert result["data_seed"] == 3 and set(result["runs"]) == {"0", "1"}
    budget = result["budget"]
    assert budget["source_epochs"] == 2 and budget["iterations"] == 4  # steps 1 + 2: 2 epochs of 2 iterations
    assert set(result["warm_start"]) == {"0", "1"}
    assert 0 <= result["warm_start"]["0"]["source_val"]["miou"] <= 1
    ceiling = result["resolution_ceiling"]  # the study's data at its size and the network's output stride
    assert {ceiling[split]["stride"] for split in ("source_val", "target_val")} == {16}
    assert all(0 < ceiling[split]["miou"] <= 100 for split in ("source_val", "target_val"))
    assert f"resolution ceiling: source val {ceiling['source_val']['miou']:.1f}" in first.stdout
    for run in result["runs"].values():
        assert tuple(run) == validity.METHODS
        for method, scores in run.items():
            for split in ("target_val", "target_val_recalibrated", "source_val"):
                assert set(scores[split]) == {"miou", "mf1", "iou"} and len(scores[split]["iou"]) == 6
                assert 0 <= scores[split]["miou"] <= 1
            if method != "source_only_bn":  # every trained method ends its curve at its last iterate
                assert scores["curve"][-1]["target_val_miou"] is not None
                steps = [p["iteration"] for p in scores["curve"]]
                assert steps == sorted(set(steps))
        # Equal budgets: each method's curve ends where steps 1 + 2 end (step 1 halfway, step 3 after).
        ends = {m: run[m]["curve"][-1]["iteration"] for m in run if run[m]["curve"]}
        assert {ends[m] for m in ("source_only", "minent", "advent", "dacs", "napg", "oracle")} == {4}
        assert ends["napg_step1"] == 2 and ends["napg_step3"] > 4
        # AdaBN is source only's model with the recalibrated statistics; its source-val number is source only's
        assert run["source_only_bn"]["target_val"] == run["source_only"]["target_val_recalibrated"]
        assert run["source_only_bn"]["source_val"] == run["source_only"]["source_val"]
    # the paired differences printed for NAPG are the means of the per-seed differences in the JSON
    napg_line = next(line for line in first.stdout.splitlines() if line.startswith("NAPG step 2"))
    for ref in ("source_only", "source_only_bn"):
        diffs = [100 * (r["napg"]["target_val"]["miou"] - r[ref]["target_val"]["miou"])
                 for r in result["runs"].values()]
        assert f"{sum(diffs) / 2:+.2f}" in napg_line
    assert (out / "validity.md").read_text().count("\n| ") == 1 + len(validity.METHODS)  # header and a row each
    for picture in ("validity.png", "curves.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("warm_start/seed0/step0", "seed0/source_only/step0", "seed0/napg/step2", "seed1/napg/step3",
                 "seed1/oracle/step0", "seed1/dacs/dacs"):
        assert (out / name / "manifest.json").is_file(), name

    # Rerunning continues: finished runs (the warm start included) are kept, the ablations are added, and
    # validity.json keeps what the earlier invocation ran (seed 1, the other methods) beside them.
    again = _study(tmp_path, "--seeds", "0", "--methods", "source_only,napg", "--ablate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{out / 'warm_start' / 'seed0' / 'step0'}: finished, kept" in again.stdout
    gathered = json.loads((out / "validity.json").read_text())
    run = gathered["runs"]["0"]
    ablations = {"napg_no_d1", "napg_no_d2", "napg_no_proto", "napg_no_gnce"}
    assert set(run) == set(validity.METHODS) | ablations and gathered["methods"] == list(validity.REPORT_ORDER)
    assert run["minent"] == result["runs"]["0"]["minent"]
    assert gathered["runs"]["1"] == result["runs"]["1"]
    assert gathered["seconds"]["1"] == result["seconds"]["1"] and set(gathered["seconds"]["0"]) == set(run)
    config = (out / "seed0" / "napg_no_d1" / "step2" / "config.yaml").read_text()
    assert "w_adv_d1: 0.0" in config

    other = subprocess.run([sys.executable, "tools/validity.py", "--data-seed", "4", "--size", "small", "--seeds", "0",
                            "--out", str(out), "--config", str(tmp_path / "tiny.yaml")],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "choose another --out" in other.stderr
    assert other.stderr.strip().count("\n") == 0


def test_an_unknown_method_is_one_line_and_exit_2(tmp_path):
    bad = _study(tmp_path, "--seeds", "0", "--methods", "napg,fancy")
    assert bad.returncode == 2 and "unknown method(s) fancy" in bad.stderr and not (tmp_path / "study").exists()
