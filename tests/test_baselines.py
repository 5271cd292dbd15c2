"""The baselines MinEnt, AdvEnt and DACS: their losses against plain re-statements, one iteration of each
method, and short stage runs from a step-0 run (resume included)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data.domains import domain_bands
from engine.build import build_method
from engine.cli import stage_main
from engine.config import resolve_config
from engine.methods.base import ema_update
from engine.refresh import RefreshResult
from losses import class_mix_masks, entropy_loss, mix, pseudo_labels_with_weight, weighted_pseudo_label_ce
from tests.helpers import REPO, tiny_args
from utils.checkpoint import load_checkpoint
from utils.errors import run_cli
from utils.stages import PIPELINE, STAGES

BASELINES = ("minent", "advent", "dacs")


# ------------------------------------------------------------------------------------------- losses
def test_entropy_loss_is_adverts_normalised_entropy():
    prob = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).softmax(1)
    p = prob.numpy()
    expected = np.mean(-np.sum(p * np.log(p), axis=1) / np.log(6))  # -1/log C Σ_c p log p, mean over pixels
    assert entropy_loss(prob).item() == pytest.approx(expected, rel=1e-9)
    uniform = torch.full((1, 6, 2, 2), 1 / 6)
    assert entropy_loss(uniform).item() == pytest.approx(1.0, rel=1e-6)  # normalised: the maximum is 1


def test_pseudo_labels_and_their_confidence_weight():
    prob = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(1)).mul(3).softmax(1)
    labels, weight = pseudo_labels_with_weight(prob, 0.7)
    p = prob.numpy()
    assert np.array_equal(labels.numpy(), p.argmax(1))
    assert weight.item() == pytest.approx(np.mean(p.max(1) >= 0.7))


def test_class_mix_masks_pick_exactly_half_of_the_present_classes():
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 6, (8, 9, 7), generator=gen)
    labels[0] = 3  # one class: it is chosen (ceil(1/2) = 1)
    labels[1, :4] = 255  # ignored pixels are never pasted
    labels[2] = torch.where(labels[2] < 3, labels[2], 255)  # three classes present
    labels[3] = 255  # nothing to paste
    masks = class_mix_masks(labels, 6, generator=gen)
    assert masks.shape == labels.shape and masks.dtype == torch.bool
    for label, mask in zip(labels, masks):
        present = set(label.unique().tolist()) - {255}
        chosen = set(label[mask].unique().tolist())
        assert chosen <= present and len(chosen) == math.ceil(len(present) / 2)
        # Every pixel of a chosen class and no other pixel.
        expected = np.isin(label.numpy(), sorted(chosen))
        assert np.array_equal(mask.numpy(), expected)
    # Different draws pick different halves.
    draws = {tuple(sorted(set(labels[4][m].tolist()))) for m in (class_mix_masks(labels, 6)[4] for _ in range(20))}
    assert len(draws) > 1


def test_mix_pastes_the_source_where_the_mask_is_set():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 4, 5, generator=gen) > 0.5
    a, b = torch.rand(2, 3, 4, 5, generator=gen), torch.rand(2, 3, 4, 5, generator=gen)
    ya, yb = torch.randint(0, 6, (2, 4, 5), generator=gen), torch.randint(0, 6, (2, 4, 5), generator=gen)
    out, y = mix(mask, a, b), mix(mask, ya, yb)
    for i in range(2):
        for r in range(4):
            for c in range(5):
                src = bool(mask[i, r, c])
                assert torch.equal(out[i, :, r, c], (a if src else b)[i, :, r, c])
                assert y[i, r, c] == (ya if src else yb)[i, r, c]


def test_weighted_pseudo_label_ce_against_a_loop():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 3, 4), generator=gen)
    labels[0, 0] = 255
    weight = torch.rand(2, 3, 4, generator=gen, dtype=torch.float64)
    total, count = 0.0, 0
    for i in range(2):
        for r in range(3):
            for c in range(4):
                y = int(labels[i, r, c])
                if y == 255:
                    continue
                z = logits[i, :, r, c]
                total += float(weight[i, r, c]) * (float(torch.logsumexp(z, 0)) - float(z[y]))
                count += 1
    assert weighted_pseudo_label_ce(logits, labels, weight).item() == pytest.approx(total / count, rel=1e-9)
    assert weighted_pseudo_label_ce(logits, torch.full_like(labels, 255), weight).item() == 0.0


def test_ema_update_follows_the_formula():
    torch.manual_seed(5)
    student, teacher = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (student, teacher):
        torch.nn.init.normal_(module.weight)
        torch.nn.init.normal_(module.bias)
    student.running_mean.normal_()
    before = copy.deepcopy(teacher)
    ema_update(teacher, student, 0.9)
    for p_t, p_0, p_s in zip(teacher.parameters(), before.parameters(), student.parameters()):
        torch.testing.assert_close(p_t, 0.9 * p_0 + 0.1 * p_s)
    assert torch.equal(teacher.running_mean, student.running_mean)  # buffers are copied


# ------------------------------------------------------------------------------------------- methods
def _batches(seed: int) -> tuple[dict, dict, RefreshResult]:
    gen = torch.Generator().manual_seed(seed)
    src = {"img": torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8),
           "label": torch.randint(0, 6, (2, 64, 64), generator=gen)}
    tgt = {"img": torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8)}
    return src, tgt, RefreshResult(torch.rand(6, 128, generator=gen), None)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("stage", BASELINES)
def test_each_baseline_step_trains_the_student(stage):
    torch.manual_seed(0)
    # A threshold every pixel passes, so that DACS's pseudo-labels carry weight on a random network.
    method = build_method(resolve_config(stage, {"backbone": "resnet18", "pseudo_threshold": 0.0}),
                          torch.device("cpu"))
    assert not method.refreshes_prototypes and method.uses_target
    before = _params(method.model)
    d1_before = _params(method.d1) if method.d1 is not None else None
    src, tgt, protos = _batches(1)
    logs = method.train_step(src, tgt, protos, epoch=1)
    assert all(torch.isfinite(v) for v in logs.values()), logs
    assert {"loss_total", "loss_ce"} <= set(logs)
    changed = [not torch.equal(a, b) for a, b in zip(before, _params(method.model))]
    # Every parameter the classifier reaches moves; the prototype head (the similarity conv) gets no gradient.
    assert sum(changed) > 0.9 * len(changed)
    assert method.d2 is None and method.opt_d2 is None  # no baseline has D2
    if stage == "advent":
        assert {"loss_adv_d1", "loss_d1", "d1_source", "d1_target"} <= set(logs)
        assert method.opt_d1 is not None
        assert all(not torch.equal(a, b) for a, b in zip(d1_before, _params(method.d1)))
        assert set(method.state_dict()) >= {"d1", "opt_d1"} and "d2" not in method.state_dict()
    else:
        assert method.d1 is None
    if stage == "minent":
        assert "loss_ent" in logs
    if stage == "dacs":
        assert {"loss_mix", "pseudo_weight", "mix_fraction"} <= set(logs) and logs["pseudo_weight"] == 1.0
        # The teacher moved 1 % of the way to the student (momentum 0.99).
        for p_t, p_0, p_s in zip(method.teacher.parameters(), before, method.model.parameters()):
            torch.testing.assert_close(p_t, 0.99 * p_0 + 0.01 * p_s.detach())


def test_baseline_options_and_stage_entries():
    assert PIPELINE == ("step0", "step1", "step2", "step3")
    for name in BASELINES:
        stage = STAGES[name]
        assert stage.command == ("tools/train.py", name) and (REPO / stage.command[0]).is_file()
        assert not stage.pipeline and stage.accepts_init == {"step0"} and stage.warm_start == "step0"
        assert (stage.epoch_role, stage.target_view, stage.bn_stats) == ("source", "plain", None)
    assert resolve_config("minent", {}).w_ent == 0.001
    assert resolve_config("advent", {}).w_adv_d1 == 0.001
    dacs = resolve_config("dacs", {})
    assert (dacs.ema_momentum, dacs.pseudo_threshold) == (0.99, 0.968)
    assert resolve_config("step3", {}).ema_momentum is None  # step 3 keeps its frozen teacher


# ------------------------------------------------------------------------------------------- stage runs
@pytest.fixture
def in_process():
    """Runs a stage in this process; undoes the global switch of --deterministic."""
    yield lambda stage, args: run_cli(lambda a: stage_main(stage, a), args)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def step0_run(synthetic_root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("step0")
    assert run_cli(lambda a: stage_main("step0", a),
                   tiny_args(synthetic_root, work, "--epochs", "1", "--progress", "false")) == 0
    return work / "step0"


@pytest.mark.slow
@pytest.mark.parametrize("stage", BASELINES)
def test_each_baseline_trains_from_a_step0_run(stage, synthetic_root, step0_run, tmp_path, in_process):
    args = tiny_args(synthetic_root, tmp_path, "--init", str(step0_run), "--progress", "false")
    assert in_process(stage, args) == 0
    run = tmp_path / stage
    evaluation = json.loads((run / "eval.json").read_text())
    assert 0 <= evaluation["classifier"]["miou"] <= 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("kind") == "refresh"]  # no refresh pass: the hand-off's prototypes
    handed, ours = (load_checkpoint(path / "model.pt") for path in (step0_run, run))
    assert torch.equal(handed["prototypes"]["source_target"], ours["prototypes"]["source_target"])
    assert ours["meta"]["stage"] == stage and ("d1" in ours) == (stage == "advent") and "d2" not in ours
    # The hand-off records what evaluate.py and predict.py check: the bands and the input size.
    assert ours["meta"]["bands"] == {"source": domain_bands(synthetic_root / "potsdam_irrg"),
                                     "target": domain_bands(synthetic_root / "vaihingen_irrg")}
    assert ours["meta"]["resize"] == int(args[args.index("--resize") + 1])


@pytest.mark.slow
def test_dacs_resume_restores_the_teacher(synthetic_root, step0_run, tmp_path, in_process):
    flags = ["--init", str(step0_run), "--deterministic", "--progress", "false", "--pseudo-threshold", "0.5"]
    assert in_process("dacs", tiny_args(synthetic_root, tmp_path / "straight", *flags)) == 0
    split = tiny_args(synthetic_root, tmp_path / "split", *flags)
    assert in_process("dacs", [*split, "--stop-after", "3"]) == 0
    last = load_checkpoint(tmp_path / "split" / "dacs" / "last.pt")
    method = build_method(resolve_config("dacs", {"backbone": "resnet18"}), torch.device("cpu"))
    method.load_state_dict(last)
    for name, tensor in method.teacher.state_dict().items():
        assert torch.equal(tensor, last["teacher"][name]), name
    assert not all(torch.equal(last["teacher"][k], v) for k, v in last["model"].items())  # an EMA, not a copy
    assert in_process("dacs", [*split, "--resume"]) == 0
    # The pseudo-labels come from the teacher: the resumed run ends with the uninterrupted run's weights.
    a, b = (load_checkpoint(tmp_path / run / "dacs" / "model.pt") for run in ("straight", "split"))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_the_generic_runner_names_the_stage(capsys):
    from tools.train import main

    assert run_cli(main, ["nowhere"]) == 2
    err = capsys.readouterr().err
    assert "dacs" in err and err.strip().count("\n") == 0
