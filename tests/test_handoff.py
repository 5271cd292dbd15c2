"""The hand-off checkpoint: accepted --init per stage, meta defaults, prototype fallback, and an original
checkpoint (the fixtures' key names) converted, started as steps 1, 2 and 3, and evaluated."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import tools.convert_original_checkpoint as convert
import tools.evaluate as evaluate_tool
from engine.config import resolve_config
from engine.handoff import (
    META_DEFAULTS,
    handoff_meta,
    handoff_prototypes,
    load_handoff,
    resolve_init,
    save_handoff,
)
from engine.refresh import RefreshResult, RefreshSpec, refresh_prototypes
from models import NAPGNet
from tests.helpers import fixture_path, run_step, tiny_args
from utils.errors import UserError, run_cli
from utils.stages import ORIGINAL, STAGES

ACCEPTED_INIT = {name: stage.accepts_init for name, stage in STAGES.items()}

KINDS = ("step0", "step1", "step2", "step3", ORIGINAL)


def _write(path: Path, stage: str | None, **meta) -> Path:
    net = torch.nn.Linear(2, 2)
    save_handoff(path, net, None, None, None, {"stage": stage, **meta} if stage else meta)
    return path


def test_accepted_init_table() -> None:
    assert ACCEPTED_INIT == {"step0": {"step0"}, "step1": {"step0", ORIGINAL}, "step2": {"step1", ORIGINAL},
                             "step3": {"step2", ORIGINAL}, "minent": {"step0"}, "advent": {"step0"},
                             "dacs": {"step0"}}


@pytest.mark.parametrize("stage", list(ACCEPTED_INIT))
def test_each_stage_accepts_exactly_its_table_row(tmp_path: Path, stage: str) -> None:
    for kind in KINDS:
        path = _write(tmp_path / f"{kind}.pt", kind)
        if kind in ACCEPTED_INIT[stage]:
            assert load_handoff(path, stage)["meta"]["stage"] == kind
        else:
            wording = f"is a (converted )?{kind} checkpoint, but {stage} starts from"
            with pytest.raises(UserError, match=wording) as err:
                load_handoff(path, stage)
            assert "\n" not in str(err.value)
    assert load_handoff(tmp_path / "step3.pt")["meta"]["stage"] == "step3"  # evaluation takes any stage


def test_old_checkpoints_get_meta_defaults_and_stageless_ones_are_refused(tmp_path: Path) -> None:
    old = load_handoff(_write(tmp_path / "old.pt", "step1", num_classes=6))
    assert {k: old["meta"][k] for k in META_DEFAULTS} == {"shared_similarity": True, "bn_stats": "shared",
                                                          "normalize": "unit", "input_scale": 1.0,
                                                          "resize": None, "bands": None, "window": None}
    with pytest.raises(UserError, match="names no stage.*convert_original_checkpoint"):
        load_handoff(_write(tmp_path / "stageless.pt", None, num_classes=6), "step2")
    torch.save({"network": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="convert_original_checkpoint"):
        load_handoff(tmp_path / "foreign.pt", "step2")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        load_handoff(tmp_path / "unfinished", "step2")


def test_resolve_init_checks_the_network_against_the_config(tmp_path: Path) -> None:
    meta = handoff_meta(stage="step1", source="a", target="b", num_classes=6, backbone="resnet50",
                        shared_similarity=True, clusters=[1] * 6, bn_stats="shared", normalize="unit", epoch=3)
    save_handoff(tmp_path / "step1.pt", torch.nn.Linear(2, 2), None, None, None, meta)
    cfg = resolve_config("step2", overrides={"init": str(tmp_path / "step1.pt"), "backbone": "resnet18"})
    with pytest.raises(UserError, match="backbone=resnet50.*--backbone resnet50"):
        resolve_init(cfg)
    state, source = resolve_init(dataclasses.replace(cfg, backbone="resnet50"))
    assert source["stage"] == "step1" and len(source["sha256"]) == 64 and state["meta"]["epoch"] == 3
    # steps 0 and 1 start afresh without --init; steps 2 and 3 look for their predecessor
    assert resolve_init(resolve_config("step1", overrides={"work_dir": str(tmp_path)})) == (None, None)
    with pytest.raises(UserError, match="pass --init <step2 run folder"):
        resolve_init(resolve_config("step3", overrides={"work_dir": str(tmp_path)}))


def test_previous_stage_prototypes_fill_classes_without_samples() -> None:
    """A class absent from the first refresh of a stage keeps the hand-off's prototypes (K=1 -> K=4)."""
    torch.manual_seed(0)
    model = NAPGNet(backbone="resnet18")
    labels = torch.randint(0, 5, (2, 64, 64))  # class 5 (clutter) never occurs
    batches = [{"img": torch.rand(2, 3, 64, 64), "label": labels}]
    previous = torch.randn(6, 128)
    state = {"prototypes": {"source_target": previous, "target": None, "counts_source_target": [1] * 6,
                            "counts_target": [], "kept_previous": [], "clusters": [1] * 6}}
    handed = handoff_prototypes(state, torch.device("cpu"))
    assert isinstance(handed, RefreshResult) and handoff_prototypes({"prototypes": None}, torch.device("cpu")) is None
    result = refresh_prototypes(model, batches, None, None, RefreshSpec((2, 2, 2, 2, 4, 4)), torch.device("cpu"),
                                previous=handed)
    assert result.kept_previous == [5]
    torch.testing.assert_close(result.source_target[20:], previous[5].expand(4, -1))
    fresh = refresh_prototypes(model, batches, None, None, RefreshSpec((2, 2, 2, 2, 4, 4)), torch.device("cpu"))
    assert torch.equal(fresh.source_target[20:], torch.zeros(4, 128))  # without a hand-off: zeros
    torch.testing.assert_close(fresh.source_target[:20], result.source_target[:20])


def original_checkpoint_from_fixture_keys() -> dict[str, dict[str, torch.Tensor]]:
    """An original-format checkpoint (``network``, ``GAN``, ``GAN2``) with the fixture's key names, shapes
    and dtypes, filled with random values (positive BatchNorm variances; ``sim_0..sim_5`` one shared conv,
    as in the original)."""
    gen = torch.Generator().manual_seed(0)
    ckpt: dict[str, dict[str, torch.Tensor]] = {"network": {}, "GAN": {}}
    for line in fixture_path("state_dict_keys.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        size = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
        if dtype == "int64":
            value = torch.zeros(size, dtype=torch.int64)
        elif key.endswith("running_var"):
            value = torch.rand(size, generator=gen) + 0.5
        else:
            value = torch.randn(size, generator=gen) * 0.02
        if key.startswith("sim_") and not key.startswith("sim_0."):
            value = ckpt["network"]["sim_0." + key.split(".", 1)[1]]
        part, name = ("GAN", key[2:]) if key.startswith("D.") else ("network", key)
        ckpt[part][name] = value
    ckpt["GAN2"] = {k: v + 1 for k, v in ckpt["GAN"].items()}
    return ckpt


@pytest.mark.slow
def test_converted_original_checkpoint_starts_steps_1_to_3_and_evaluates(synthetic_root: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(original_checkpoint_from_fixture_keys(), tmp_path / "orig.pth")
    converted = tmp_path / "converted.pt"
    assert convert.main(["--checkpoint", str(tmp_path / "orig.pth"), "--out", str(converted)]) == 0
    meta = torch.load(converted, weights_only=True)["meta"]
    assert meta["stage"] == ORIGINAL and meta["backbone"] == "resnet50" and meta["bn_stats"] == "shared"
    assert meta["normalize"] == "unit" and meta["clusters"] is None

    short = ("--backbone", "resnet50", "--epochs", "1", "--iters-per-epoch", "1", "--refresh-max-batches", "1",
             "--eval-max-batches", "1", "--init", str(converted))
    for stage in ("step1", "step2", "step3"):
        proc = run_step(stage, tiny_args(synthetic_root, tmp_path / "runs", *short))
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest = json.loads((tmp_path / "runs" / stage / "manifest.json").read_text())
        assert manifest["init"]["stage"] == ORIGINAL and manifest["init"]["path"] == str(converted)

    capsys.readouterr()
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(converted), "--data-root", str(synthetic_root), "--domain", "vaihingen_irrg",
            "--resize", "64", "--num-workers", "0", "--device", "cpu", "--batch-size", "2", "--json", str(out)]
    assert run_cli(evaluate_tool.main, argv) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"classifier"} and "prototype" not in result  # the original saved no prototypes
    assert 0 <= result["classifier"]["miou"] <= 1
