"""The README tells the truth: every command it shows parses, and the defaults and counts it states are the code's."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from data.isprs import DATASETS
from engine.cli import build_parser as stage_parser
from engine.config import resolve_config
from utils.config import OPTIONS, format_value, load_yaml
from utils.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPTS = {STAGES[name].command[0]: name for name in STAGES if STAGES[name].command[0].startswith("step")}
STAGE_FLAGS = {"--" + key.replace("_", "-") for key in OPTIONS} | {"--config", "--preset", "--print-config"}
PASS_THROUGH = {"tools/run_pipeline.py", "tools/validity.py", "tools/run_table.py"}  # other flags go on to the stages


def _commands(text: str) -> list[str]:
    """Every ``python ...`` command line of the README's bash blocks (continuations joined, comments cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if re.search(r"\bpython3? (?!-[cm] )", line):
                commands.append(line)
    return commands


def _flags_known_to(script: str, args: list[str]) -> set[str]:
    if script in SCRIPTS:
        parser = stage_parser(SCRIPTS[script])
    elif script == "tools/train.py":
        parser = stage_parser(args[0])
    else:
        parser = importlib.import_module(script.removesuffix(".py").replace("/", ".")).build_parser()
    known = {flag for action in parser._actions for flag in action.option_strings}
    return known | STAGE_FLAGS if script in PASS_THROUGH else known


COMMANDS = _commands(README)


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_uses_flags_its_script_has(command):
    tokens = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " | "))
    script = next(t for t in tokens if t.endswith(".py"))
    args = tokens[tokens.index(script) + 1:]
    if script.startswith("tools/") or script in SCRIPTS:
        assert (ROOT / script).is_file(), script
    known = _flags_known_to(script, args)
    for token in args:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag != "--" and " " not in flag:  # not a quoted value such as sbatch's options
            assert flag in known, f"{command}: {script} has no {flag}"


def test_stated_option_defaults_are_the_codes():
    """"`--flag` (value)" in the README: some stage runs that value when nothing sets the option."""
    stated = re.findall(r"`--([a-z0-9-]+)` \(([-\w.]+)\)", README)
    assert stated
    configs = [resolve_config(stage).to_dict() for stage in STAGES]
    for flag, value in stated:
        key = flag.replace("-", "_")
        assert key in OPTIONS, flag
        assert value in {format_value(cfg[key]) for cfg in configs}, (flag, value)


def test_the_iteration_table_is_the_pair_configs_schedule():
    rows = re.findall(r"^\| step (\d) \([^)]*\) \| (\d+) \| ([\d,]+) \| ([\d,]+) \|$", README, flags=re.M)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    for number, epochs, *iterations in rows:
        stage = f"step{number}"
        for pair, stated in zip(("pot_irrg2vai", "vai2pot_irrg"), iterations, strict=True):
            cfg = resolve_config(stage, load_yaml(ROOT / "configs" / f"{pair}.yaml"))
            domain = cfg.source if STAGES[stage].epoch_role == "source" else cfg.target
            patches = DATASETS[domain.split("_")[0]].mmseg_counts["train"]
            assert int(epochs) == cfg.epochs, (stage, pair)
            assert int(stated.replace(",", "")) == cfg.epochs * (patches // cfg.batch_size), (stage, pair)
