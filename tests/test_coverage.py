"""Every weight that acts at evaluation has been trained: engine/coverage.py and the configs that use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.cli import stage_main
from engine.config import resolve_config
from engine.coverage import GradientCoverage, cancelled_by_batchnorm, untrained_at_evaluation
from models import NAPGNet
from models.napg import ASPP_RATES, FEATURE_CHANNELS
from tests.helpers import REPO, tiny_args
from utils.config import load_yaml
from utils.stages import STAGE_NAMES

OUTPUT_STRIDE = 32  # layer 4 of the ResNet in models/napg.py


def _train_once(model: NAPGNet, coverage: GradientCoverage, side: int) -> None:
    x = torch.randn(2, 3, side, side)
    out = model(x, torch.randn(6, FEATURE_CHANNELS))
    F.cross_entropy(out["logits"], torch.randint(0, 6, out["logits"].shape[:1] + out["logits"].shape[2:])).backward()
    coverage.record()
    model.zero_grad()


def test_the_rate_6_branch_is_untrained_at_twice_the_training_size_and_only_there():
    torch.manual_seed(0)
    model = NAPGNet(num_classes=6, backbone="resnet18")
    coverage = GradientCoverage(model)
    _train_once(model, coverage, 128)  # layer 4: 4 x 4, every dilated tap off the map but the centre
    # The bias before up.1's BatchNorm has a zero gradient up to rounding; some CPUs round a few channels to
    # exactly zero. The batch mean and the running mean both remove it, so it never counts as untrained.
    assert cancelled_by_batchnorm(model) == {"up.0.bias"}
    coverage.seen["up.0.bias"][:3] = False
    prototypes = torch.randn(6, FEATURE_CHANNELS)
    same = untrained_at_evaluation(coverage, torch.randn(1, 3, 128, 128), prototypes, "target")
    larger = untrained_at_evaluation(coverage, torch.randn(1, 3, 256, 256), prototypes, "target")
    assert same == {}
    # At 256 px (8 x 8) the rate-6 branch's 8 off-centre taps act, untrained (those whose input channel is
    # not zero after layer 4's ReLU on this image); its centre tap and everything else were trained.
    off_centre = model.aspp.convs[0][0].weight.numel() * 8 // 9
    assert set(larger) == {"aspp.convs.0.0.weight"}
    assert off_centre / 2 < larger["aspp.convs.0.0.weight"] <= off_centre


def test_a_network_with_the_training_window_has_nothing_untrained_on_larger_patches():
    torch.manual_seed(0)
    model = NAPGNet(num_classes=6, backbone="resnet18", window=128)
    coverage = GradientCoverage(model)
    _train_once(model, coverage, 128)
    coverage.seen["up.0.bias"][:] = True  # see the test above
    assert untrained_at_evaluation(coverage, torch.randn(1, 3, 256, 256), torch.randn(6, FEATURE_CHANNELS),
                                   "target") == {}


def test_record_takes_every_nonzero_gradient_element_and_survives_a_state_round_trip():
    layer = nn.Linear(3, 2)
    coverage = GradientCoverage(layer)
    layer.weight.grad = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -2.0]])
    coverage.record()  # bias has no gradient: skipped
    expected = torch.tensor([[False, True, False], [False, False, True]])
    assert torch.equal(coverage.seen["weight"], expected) and not coverage.seen["bias"].any()
    restored = GradientCoverage(nn.Linear(3, 2))
    restored.load_state_dict(coverage.state_dict())
    assert torch.equal(restored.seen["weight"], expected)


def _layer4_side(side: int) -> int:
    return -(-side // OUTPUT_STRIDE)


def _active_taps(rate: int, side: int) -> int:
    """Distinct tap offsets of a 3 x 3 conv at ``rate`` that land on a ``side`` x ``side`` map somewhere."""
    per_axis = sum(1 for d in (-rate, 0, rate) if abs(d) < side)
    return per_axis * per_axis


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_training_crops_and_evaluation_patches_switch_on_the_same_aspp_taps(config):
    """The training crop and the evaluated patch give layer 4 maps on which each ASPP rate uses the same taps."""
    for stage in STAGE_NAMES:
        cfg = resolve_config(stage, load_yaml(REPO / "configs" / config))
        # The patches as prepared (512 px) unless --resize sets them; a network with a window sees windows.
        evaluated = cfg.window or cfg.resize or 512
        for rate in ASPP_RATES:
            train_taps = _active_taps(rate, _layer4_side(cfg.img_size))
            eval_taps = _active_taps(rate, _layer4_side(evaluated))
            assert eval_taps <= train_taps, (config, stage, rate, cfg.img_size, evaluated)


def test_a_stage_writes_the_untrained_weights_it_finds_into_eval_json(synthetic_root, tmp_path, capsys):
    # Trained on 64-px crops (layer 4: 2 x 2), evaluated on 256-px patches (8 x 8): the rate-6 taps act untrained.
    # (A few iterations also leave elements of channels that no training batch switched on: not asserted.)
    args = tiny_args(synthetic_root, tmp_path, "--epochs", "1", "--iters-per-epoch", "6", "--eval-max-batches", "1")
    args[args.index("--resize") + 1] = "256"
    assert stage_main("step0", args) == 0
    untrained = json.loads(Path(tmp_path / "step0" / "eval.json").read_text())["untrained_at_evaluation"]
    off_centre = 512 * 256 * 8  # resnet18's layer 4 has 512 channels, each ASPP branch 256
    assert untrained["aspp.convs.0.0.weight"] > off_centre / 2
    assert "act at evaluation that had no gradient" in capsys.readouterr().out


def test_a_stage_with_a_window_of_its_crop_size_leaves_nothing_untrained(synthetic_root, tmp_path):
    # The same 64-px crops and 256-px patches, evaluated in 64-px windows: the taps evaluation uses are trained.
    args = tiny_args(synthetic_root, tmp_path, "--epochs", "1", "--iters-per-epoch", "6", "--eval-max-batches", "1",
                     "--window", "64")
    args[args.index("--resize") + 1] = "256"
    assert stage_main("step0", args) == 0
    untrained = json.loads(Path(tmp_path / "step0" / "eval.json").read_text())["untrained_at_evaluation"]
    assert not any(name.startswith("aspp.convs.") for name in untrained), untrained
