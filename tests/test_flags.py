"""Command lines: truthful grouped help for the stages, one-line errors with suggestions everywhere."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

import pytest
import torch
import yaml

from engine.cli import build_parser, stage_main
from engine.config import resolve_config
from engine.methods import method_class, stage_options
from utils.config import HELP_GROUPS, OPTIONS, format_value
from utils.flags import FlagParser
from utils.stages import STAGE_NAMES, STAGES

TOOLS = ("benchmark", "collect_results", "convert_original_checkpoint", "evaluate", "gpu_check", "gpu_report",
         "kill_resume_study", "make_synthetic", "predict", "prepare_isprs", "prepare_loveda", "run_pipeline",
         "run_table", "validity")


def _tool_parser(name: str) -> FlagParser:
    return importlib.import_module(f"tools.{name}").build_parser()


def _option_actions(parser: FlagParser) -> dict[str, object]:
    return {a.dest: a for a in parser._actions if a.dest in OPTIONS}


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_stage_help_shows_what_print_config_prints(stage, capsys):
    assert stage_main(stage, ["--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    actions = _option_actions(build_parser(stage))
    assert set(actions) == set(OPTIONS)  # every flag parses, listed or not
    listed = {key: action for key, action in actions.items() if action.help != argparse.SUPPRESS}
    assert set(listed) == stage_options(stage)
    for key, action in listed.items():
        assert action.help.endswith(f"(default: {format_value(printed[key])})"), (stage, key, action.help)
        assert action.help.count("(default") == 1, (stage, key, action.help)


@pytest.mark.parametrize(("stage", "listed", "not_listed"), [
    ("step0", {"--w-proto", "--lr", "--clusters"}, {"--w-kd", "--ema-momentum", "--w-adv-d1", "--lr-d", "--bn-stats",
                                                    "--weak-scale", "--w-ent"}),
    ("step1", {"--w-adv-d1", "--w-adv-d2", "--legacy-d2-step1", "--w-gnce", "--bn-stats"}, {"--w-kd", "--hflip"}),
    ("step3", {"--w-kd", "--kd-temperature", "--weak-scale", "--ema-momentum", "--w-adv-d2"},
     {"--w-ce", "--w-proto", "--w-gnce", "--legacy-d2-step1"}),
    ("minent", {"--w-ent", "--w-ce"}, {"--w-proto", "--w-adv-d1", "--lr-d", "--w-kd"}),
    ("advent", {"--w-adv-d1", "--lr-d"}, {"--w-adv-d2", "--legacy-d2-gen", "--w-ent"}),
    ("dacs", {"--ema-momentum", "--pseudo-threshold"}, {"--w-kd", "--w-adv-d1"}),
])
def test_stage_help_lists_only_the_options_the_stage_reads(stage, listed, not_listed):
    text = build_parser(stage).format_help()
    shown = set(re.findall(r"^\s+(--[a-z0-9-]+)", text, flags=re.M))
    assert listed <= shown, listed - shown
    assert not not_listed & shown, not_listed & shown
    assert stage_main(stage, ["--w-kd", "2", "--print-config"]) == 0  # another stage's flag still parses


def test_every_option_is_read_by_some_stage():
    assert set().union(*(stage_options(stage) for stage in STAGE_NAMES)) == set(OPTIONS)


class _Recorder:
    """A config that notes which attributes are read."""

    def __init__(self, cfg: object) -> None:
        self.cfg, self.read = cfg, set()

    def __getattr__(self, name: str) -> object:
        self.read.add(name)
        return getattr(self.cfg, name)


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_a_method_reads_no_option_that_its_stage_does_not_list(stage):
    """``Method.options`` is the truth: building the stage's method reads only options the stage lists."""
    cls = method_class(STAGES[stage].method)
    model = torch.nn.Conv2d(3, 2, 1)
    d1, d2 = (torch.nn.Conv2d(2, 1, 1) if name in cls.discriminators else None for name in ("d1", "d2"))
    cfg = _Recorder(resolve_config(stage))
    cls(model, d1, d2, cfg)
    assert cfg.read & set(OPTIONS), stage
    assert cfg.read & set(OPTIONS) <= stage_options(stage), cfg.read & set(OPTIONS) - stage_options(stage)


def test_format_value_is_readable():
    assert format_value(1 / 3) == "0.333333"
    assert format_value((2, 2, 4)) == "2 2 4"
    assert format_value(None) == "none" and format_value(True) == "true" and format_value(1e-4) == "0.0001"


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_stage_option_sits_in_exactly_one_group(stage):
    parser = build_parser(stage)
    titles = [g.title for g in parser._action_groups if g.title in HELP_GROUPS]
    assert titles == list(HELP_GROUPS)
    seen: dict[str, list[str]] = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            seen.setdefault(action.dest, []).append(group.title)
    for key in OPTIONS:
        assert len(seen[key]) == 1 and seen[key][0] in HELP_GROUPS, (key, seen[key])
    help_text = parser.format_help()
    assert len(parser.format_usage().strip().splitlines()) <= 3
    for key in stage_options(stage):
        if OPTIONS[key].choices:  # fixed choices are listed, not shown as STR
            assert "{" + ",".join(map(str, OPTIONS[key].choices)) + "}" in help_text, key


def _expect_one_line_error(capsys, run, *expected: str) -> str:
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def _typo(flag: str) -> str:
    """A flag with one inner letter dropped: ``--batch-size`` -> ``--batc-size``."""
    body = flag[2:]
    cut = max(1, len(body) // 2)
    return "--" + body[:cut - 1] + body[cut:] if len(body) > 3 else flag + "x"


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_a_stage_flag_typo_is_one_line_naming_the_flag(stage, capsys):
    _expect_one_line_error(capsys, lambda: stage_main(stage, ["--batchsize", "4"]),
                           "unknown option --batchsize", "--batch-size")
    # No prefix matching: --epoch is not --epochs.
    _expect_one_line_error(capsys, lambda: stage_main(stage, ["--epoch", "1"]), "--epoch", "--epochs")


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_refuses_a_typo_in_one_line_with_a_suggestion(name, capsys):
    parser = _tool_parser(name)
    assert isinstance(parser, FlagParser) and parser.allow_abbrev is False
    flags = [f for a in parser._actions for f in a.option_strings if f.startswith("--") and f != "--help"]
    assert flags, name
    for flag in flags:
        wrong = _typo(flag)
        if wrong in flags:
            continue
        err = _expect_one_line_error(capsys, lambda w=wrong: parser.parse_args([w]),
                                     f"unknown option {wrong}")
        assert flag in err, (name, wrong, err)


def _flat(text: str) -> str:
    """Help text on one line, as it reads before argparse wraps it (at spaces and after hyphens)."""
    return " ".join(text.split()).replace("- ", "-")


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_option_has_help_text_and_shows_its_default(name):
    parser = _tool_parser(name)
    text = _flat(parser.format_help())
    for action in parser._actions:
        assert action.help, (name, action.option_strings or action.dest)
        takes_value = action.option_strings and action.nargs != 0
        if takes_value and action.default not in (None, "") and "default" not in action.help:
            assert f"{_flat(action.help)} (default: {format_value(action.default)})" in text, (
                name, action.option_strings)


@pytest.mark.parametrize(("name", "shown"), [
    ("predict", ["window side in network px (default: 512)", "window step in network px (default: 341)"]),
    ("evaluate", ["--split {train,val} split of --domain to score", "--target-eval-split) (default: val)",
                  "see the README) (default: standard)"]),
    ("run_table", ["training seeds (default: 0 1 2)"]),
])
def test_tool_help_shows_readable_defaults(name, shown):
    text = _flat(_tool_parser(name).format_help())
    for fragment in shown:
        assert fragment in text, fragment


def test_other_parse_errors_are_one_line_too(capsys):
    module = importlib.import_module("tools.predict")
    _expect_one_line_error(capsys, lambda: module.build_parser().parse_args(["--input", "x"]), "required")
    _expect_one_line_error(capsys, lambda: module.build_parser().parse_args(
        ["--checkpoint", "c", "--input", "i", "--out", "o", "--amp", "fp8"]), "invalid choice")
    _expect_one_line_error(capsys, lambda: module.build_parser().parse_args(
        ["--checkpoint", "c", "--input", "i", "--out", "o", "4"]), "unexpected argument")


def test_pass_through_flags_are_checked_against_the_stage_options(capsys, monkeypatch, tmp_path):
    run_pipeline = importlib.import_module("tools.run_pipeline")
    monkeypatch.setattr(sys, "argv", ["run_pipeline.py"])
    _expect_one_line_error(capsys, lambda: run_pipeline.main(
        ["--config", "configs/demo.yaml", "--work-dir", str(tmp_path), "--lrr", "0.1"]), "--lrr", "--lr")


def test_run_pipeline_takes_the_work_dir_from_the_config(tmp_path):
    from utils.errors import UserError

    run_pipeline = importlib.import_module("tools.run_pipeline")
    config = tmp_path / "pair.yaml"
    config.write_text("source: potsdam_irrg\n")
    with pytest.raises(UserError, match="sets no work_dir; pass --work-dir"):
        run_pipeline.main(["--config", str(config)])
    assert "passed on to every stage" in run_pipeline.build_parser().format_help()


@pytest.mark.parametrize("name", ["benchmark", "convert_original_checkpoint"])
def test_shared_similarity_is_spelt_as_the_stage_option_and_the_old_flag_still_works(name, capsys):
    parser = _tool_parser(name)
    base = ["--checkpoint", "a", "--out", "b"] if name == "convert_original_checkpoint" else []
    spellings = {(): True, ("--shared-similarity",): True, ("--shared-similarity", "false"): False,
                 ("--shared-similarity", "no"): False, ("--per-class-sim",): False}
    for flags, shared in spellings.items():
        assert parser.parse_args([*base, *flags]).shared_similarity is shared, flags
    _expect_one_line_error(capsys, lambda: parser.parse_args([*base, "--shared-similarity", "maybe"]),
                           "expected true or false")
