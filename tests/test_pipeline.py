"""End-to-end runs of the step scripts on the small synthetic data set (CPU, tiny images)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, STAGE_SCRIPTS, run_step, tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(synthetic_root, tmp_path_factory):
    """step0 -> step1 -> step2 -> step3 once; returns the pipeline folder and each stage's process."""
    work = tmp_path_factory.mktemp("chain")
    procs = {}
    for stage in STAGE_SCRIPTS:
        procs[stage] = run_step(stage, tiny_args(synthetic_root, work))
        assert procs[stage].returncode == 0, procs[stage].stderr[-3000:]
    return work, procs


def test_every_stage_writes_its_run_folder(chain):
    work, _ = chain
    for stage in STAGE_SCRIPTS:
        folder = work / stage
        for name in ("config.yaml", "env.json", "last.pt", "model.pt", "metrics.jsonl", "eval.json",
                     "manifest.json"):
            assert (folder / name).is_file(), f"{stage}/{name} missing"
        manifest = (folder / "manifest.json").read_text()
        assert f'"stage": "{stage}"' in manifest and "checkpoint_sha256" in manifest
        assert '"pretrained": null' in (folder / "env.json").read_text()  # random init: no weights file
    state = torch.load(work / "step2" / "model.pt", weights_only=True)
    assert state["prototypes"]["source_target"].shape == (6 * 4, 128)  # clusters 2,2,2,2,4,4 -> K = 4
    assert state["meta"]["stage"] == "step2"


def test_progress_bar_and_tensorboard_contents(chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work, procs = chain
    assert "it/s" in procs["step2"].stderr or "s/it" in procs["step2"].stderr
    assert "<" in procs["step2"].stderr  # tqdm's elapsed<remaining (ETA)
    events = EventAccumulator(str(work / "step2" / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss_ce", "train/loss_proto", "train/loss_adv_d1", "train/loss_adv_d2", "train/loss_d1",
                "train/loss_d2", "train/loss_gnce_src", "train/loss_gnce_tgt", "train/lr", "train/lr_d",
                "train/tau", "train/d1_target", "prototypes/count_car", "eval/classifier/miou",
                "eval/prototype/miou", "eval/classifier/iou_clutter", "eval/classifier/miou_5"):
        assert tag in scalars, tag
    assert {"panels/source", "panels/target"} <= set(events.Tags()["images"])


def test_chaining_refuses_a_wrong_stage_or_class_count(chain, synthetic_root, tmp_path):
    work, _ = chain
    wrong_stage = run_step("step2", tiny_args(synthetic_root, tmp_path / "a", "--init", str(work / "step0")))
    assert wrong_stage.returncode == 2
    assert wrong_stage.stderr.strip().count("\n") == 0 and "step1" in wrong_stage.stderr
    wrong_classes = run_step("step3", tiny_args(synthetic_root, tmp_path / "b", "--init", str(work / "step2"),
                                           "--num-classes", "5", "--clusters", "1", "1", "1", "2", "2",
                                           "--gnce-windows", "1", "1", "1", "1", "1"))
    assert wrong_classes.returncode == 2 and "num_classes" in wrong_classes.stderr
    assert wrong_classes.stderr.strip().count("\n") == 0
    assert not (tmp_path / "b" / "step3").exists()  # nothing written


def test_finished_stage_is_not_overwritten(chain, synthetic_root):
    work, _ = chain
    before = (work / "step0" / "model.pt").stat().st_mtime_ns
    again = run_step("step0", tiny_args(synthetic_root, work))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # --overwrite with a mistake elsewhere still keeps the old run: inputs are checked before it goes.
    bad = run_step("step0", tiny_args(synthetic_root, work, "--overwrite", "--source", "nowhere"))
    assert bad.returncode == 2 and "nowhere" in bad.stderr and bad.stderr.strip().count("\n") == 0
    assert (work / "step0" / "model.pt").stat().st_mtime_ns == before


def test_resume_gives_the_uninterrupted_weights(synthetic_root, tmp_path):
    args = ["--deterministic", "--epochs", "2", "--iters-per-epoch", "3", "--checkpoint-every", "1"]
    straight = run_step("step1", tiny_args(synthetic_root, tmp_path / "straight", *args))
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_step("step1", tiny_args(synthetic_root, tmp_path / "split", *args, "--stop-after", "2"))
    assert first.returncode == 0 and "--resume" in first.stdout
    assert not (tmp_path / "split" / "step1" / "manifest.json").exists()
    second = run_step("step1", tiny_args(synthetic_root, tmp_path / "split", *args, "--resume"))
    assert second.returncode == 0, second.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "step1" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "step1" / "model.pt", weights_only=True)
    for key in ("model", "d1", "d2"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(a["prototypes"]["source_target"], b["prototypes"]["source_target"])


def test_evaluate_tool_and_results_table(chain, synthetic_root, tmp_path):
    import json

    from tools.run_pipeline import collect_results, results_table

    work, _ = chain
    out = tmp_path / "eval.json"
    for protocol in ("standard", "napg_legacy"):
        proc = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(work / "step2"), "--data-root",
                               str(synthetic_root), "--domain", "vailhingen6", "--split", "val", "--resize", "64",
                               "--num-workers", "0", "--device", "cpu", "--metric-protocol", protocol, "--json",
                               str(out), "--batch-size", "2"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(out.read_text())
        assert result["protocol"] == protocol
        for branch in ("classifier", "prototype"):
            assert set(result[branch]) >= {"oa", "miou", "mf1", "miou_5", "mf1_5", "iou", "f1", "precision", "recall"}
            assert 0 <= result[branch]["miou"] <= 1
    results = collect_results(work)
    assert list(results) == list(STAGE_SCRIPTS)
    assert all(set(r) >= {"miou", "mf1", "oa", "miou_5", "mf1_5", "iou"} for r in results.values())
    table = results_table(results)
    assert "step3 teacher-student" in table and "target-val" in table


def test_source_val_is_evaluated_beside_target_val(chain):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tools.run_pipeline import collect_results, results_table

    work, procs = chain
    for stage in STAGE_SCRIPTS:
        ev = json.loads((work / stage / "eval.json").read_text())
        manifest = json.loads((work / stage / "manifest.json").read_text())
        assert 0 <= ev["source_val"]["classifier"]["miou"] <= 1
        assert manifest["source_val"]["classifier"]["miou"] == ev["source_val"]["classifier"]["miou"]
        assert manifest["target_val"]["classifier"]["miou"] == ev["classifier"]["miou"]
        assert ev["protocol"] == manifest["protocol"] == "mmseg"  # the data's meta.json, printed in every table
        assert "source-val mIoU" in procs[stage].stdout
    assert json.loads((work / "step0" / "manifest.json").read_text())["bn_stats"] == "shared"  # never sees a target
    assert json.loads((work / "step2" / "manifest.json").read_text())["bn_stats"] == "domain"  # the paper default
    events = EventAccumulator(str(work / "step2" / "tb"), size_guidance={"scalars": 0}).Reload()
    assert {"eval_source/classifier/miou", "prototypes/pool_source_car", "prototypes/pool_target_car"} <= set(
        events.Tags()["scalars"])
    table = results_table(collect_results(work))
    assert "src mIoU" in table and "source-val" in table


def test_evaluate_tool_recalibrates_batchnorm(chain, synthetic_root, tmp_path):
    import json

    work, _ = chain
    common = ["--data-root", str(synthetic_root), "--domain", "vaihingen_irrg", "--resize", "64", "--num-workers",
              "0", "--device", "cpu", "--batch-size", "2"]
    runs = {}
    for name, checkpoint, extra in (("plain", "step2", []), ("recal", "step0", ["--recalibrate-bn"])):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint", str(work / checkpoint), *common,
                               "--json", str(out), *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = (proc.stdout, json.loads(out.read_text()))
    assert "target BatchNorm statistics" in runs["plain"][0] and runs["plain"][1]["recalibrated_bn"] is None
    stdout, result = runs["recal"]
    train_images = len(list((synthetic_root / "vaihingen_irrg" / "img_dir" / "train").glob("*.png")))
    assert "re-estimated on" in stdout and result["recalibrated_bn"] == {"split": "train", "images": train_images}


def test_warm_start_only_from_a_finished_source_only_run(chain, synthetic_root, tmp_path):
    work, _ = chain
    for stage in ("step0", "step1"):  # a finished source-only run starts step 0 (training on) and step 1
        proc = run_step(stage, tiny_args(synthetic_root, tmp_path / f"warm_{stage}", "--init", str(work / "step0"),
                                         "--epochs", "1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert '"stage": "step0"' in (tmp_path / f"warm_{stage}" / stage / "env.json").read_text()
    for stage, init in (("step0", "step1"), ("step1", "step2"), ("step1", "step3")):
        proc = run_step(stage, tiny_args(synthetic_root, tmp_path / "refused", "--init", str(work / init)))
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert f"is a {init} checkpoint" in proc.stderr
    unfinished = tmp_path / "unfinished" / "step0"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("{}\n")
    proc = run_step("step1", tiny_args(synthetic_root, tmp_path / "refused", "--init", str(unfinished)))
    assert proc.returncode == 2 and "manifest.json" in proc.stderr


def test_stage_pictures_and_the_pipeline_panels_agree(chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.pictures import pipeline_panels

    work, _ = chain
    own = {}
    for stage in STAGE_SCRIPTS:
        with Image.open(work / stage / "confusion.png") as confusion:
            assert confusion.size[0] > 100
        with Image.open(work / stage / "panels.png") as panels:
            own[stage] = np.asarray(panels.convert("RGB"))
        assert own[stage].shape[1] == 4 * 64  # input, ground truth, prediction, entropy of 64 px patches
    events = EventAccumulator(str(work / "step2" / "tb"), size_guidance={"images": 0}).Reload()
    assert {"final/confusion", "final/panels"} <= set(events.Tags()["images"])
    grid = pipeline_panels([work / s for s in STAGE_SCRIPTS], torch.device("cpu"))
    assert grid.shape == (own["step0"].shape[0], 6 * 64, 3)
    assert np.array_equal(grid[:, :128], own["step0"][:, :128])  # input and ground truth
    for k, stage in enumerate(STAGE_SCRIPTS):  # each stage's model.pt predicts what the stage drew at its end
        assert np.array_equal(grid[:, (2 + k) * 64:(3 + k) * 64], own[stage][:, 128:192]), stage


def test_tensorboard_has_one_event_file_per_stage_on_one_pipeline_axis(chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    work, _ = chain
    spans = []
    for stage in STAGE_SCRIPTS:
        tb = work / stage / "tb"
        assert len(list(tb.glob("events.out.tfevents.*"))) == 1, stage
        events = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
        steps = [e.step for tag in events.Tags()["scalars"] for e in events.Scalars(tag)]
        records = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
        offset = {r["pipeline_step"] - r["step"] for r in records}
        assert len(offset) == 1, stage  # one shift per stage: the iterations of the stages before it
        spans.append((min(steps), max(steps), offset.pop()))
        (event_file,) = tb.glob("events.out.tfevents.*")
        written = {value.tag for event in EventFileLoader(str(event_file)).Load() for value in event.summary.value}
        assert {"config/text_summary", "_hparams_/experiment", "_hparams_/session_start_info"} <= written  # config
        final = [e.step for tag in events.Tags()["images"] if tag.startswith("final/") for e in events.Images(tag)]
        assert final and set(final) == {max(steps)}, stage  # the final pictures at the stage's last step
    # A stage started from the previous one continues its axis; one started afresh (step 1 here) begins at 0.
    ends = {}
    for stage, (start, end, offset) in zip(STAGE_SCRIPTS, spans, strict=True):
        init = json.loads((work / stage / "env.json").read_text())["init"]
        assert offset == (ends[init["stage"]] if init else 0) and start >= offset, stage
        ends[stage] = end
    assert [bool(json.loads((work / s / "env.json").read_text())["init"]) for s in STAGE_SCRIPTS] == [
        False, False, True, True]
