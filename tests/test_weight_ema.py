"""--weight-ema: an EMA of the segmenter's weights that evaluation and the hand-off use (a stabiliser)."""

from __future__ import annotations

import json

import torch

from engine.cli import stage_main
from tests.helpers import tiny_args


def test_the_hand_off_holds_the_average_of_the_trained_weights(synthetic_root, tmp_path):
    # Two epochs of two iterations with and without the option, from the same seed.
    args = tiny_args(synthetic_root, tmp_path, "--weight-ema", "0.5", "--seed", "3")
    plain = tiny_args(synthetic_root, tmp_path / "plain", "--seed", "3")
    assert stage_main("step0", args) == 0 and stage_main("step0", plain) == 0
    handoff = torch.load(tmp_path / "step0" / "model.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "step0" / "last.pt", weights_only=True)
    raw, averaged = last["model"], last["averaged"]
    name = "classifier.weight"
    torch.testing.assert_close(handoff[name], averaged[name], rtol=0, atol=0)
    assert not torch.equal(handoff[name], raw[name])
    # Training itself is undisturbed: the raw weights are those of the same run without the option.
    plain_raw = torch.load(tmp_path / "plain" / "step0" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(raw[name], plain_raw[name], rtol=0, atol=0)
    # The scores written are the averaged network's (they differ from the plain run's).
    scores = [json.loads((folder / "step0" / "eval.json").read_text()) for folder in (tmp_path, tmp_path / "plain")]
    assert scores[0] != scores[1]
