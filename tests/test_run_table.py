"""tools/run_table.py: every (task, seed) through run_pipeline, the table, and the Slurm array script."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tools import run_table
from utils.errors import run_cli

TINY = ["--backbone", "resnet18", "--pretrained", "null", "--resize", "64", "--img-size", "64", "--batch-size", "2",
        "--eval-batch-size", "4", "--epochs", "1", "--iters-per-epoch", "2", "--refresh-max-batches", "2",
        "--eval-max-batches", "2", "--num-workers", "0", "--device", "cpu", "--progress", "false"]


def test_the_slurm_script_runs_one_pipeline_per_array_element(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_cli(run_table.main, ["--tasks", "all", "--seeds", "0", "1", "2", "--runs", str(runs), "--slurm",
                                    "--slurm-options", "--partition gpu --time 24:00:00", "--amp", "bf16"]) == 0
    out = capsys.readouterr().out
    script = (runs / "run_table.sbatch").read_text()
    assert f"sbatch {runs / 'run_table.sbatch'}" in out and "collect_results.py" in out
    assert "#SBATCH --array=0-11" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --signal=B:TERM@120" in script and "#SBATCH --partition" in script
    commands = [shlex.split(shlex.split(line)[0]) for line in script.split("COMMANDS=(\n")[1].split("\n)")[0]
                .splitlines()]
    expected = [(task, seed) for task in run_table.TASKS for seed in (0, 1, 2)]
    assert len(commands) == len(expected)
    for command, (task, seed) in zip(commands, expected, strict=True):
        assert command[1].endswith("tools/run_pipeline.py")
        assert command[command.index("--config") + 1].endswith(f"configs/{task}.yaml")
        assert command[command.index("--work-dir") + 1] == str(runs / f"{task}_seed{seed}")
        assert command[command.index("--seed") + 1] == str(seed) and command[-2:] == ["--amp", "bf16"]
    # The array element's line is what bash runs: the script itself is valid bash.
    assert subprocess.run(["bash", "-n", str(runs / "run_table.sbatch")]).returncode == 0


@pytest.mark.slow
def test_the_table_is_trained_and_collected_and_a_rerun_continues(synthetic_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["--tasks", "pot_irrg2vai,pot_rgb2vai", "--seeds", "0", "1", "--runs", str(runs), "--stages", "step0",
            "--data-root", str(synthetic_root), "--protocol", "mmseg", *TINY]
    assert run_cli(run_table.main, args) == 0
    rows = list(csv.DictReader((runs / "table" / "results.csv").open()))
    assert {(r["pair"].split(" (")[0], r["stage"], r["runs"]) for r in rows} == {
        ("potsdam_irrg -> vaihingen_irrg", "step0", "2"), ("potsdam_rgb -> vaihingen_irrg", "step0", "2")}
    table = (runs / "table" / "results.md").read_text()
    assert "| stage | label | potsdam_irrg -> vaihingen_irrg (mmseg) | potsdam_rgb -> vaihingen_irrg (mmseg) |" in table
    capsys.readouterr()
    assert run_cli(run_table.main, args) == 0  # everything finished: kept, the table written again
    assert capsys.readouterr().out.count("finished run found") == 4


def test_a_protocol_mismatch_and_an_unknown_task_are_one_line(synthetic_root, tmp_path, capsys):
    base = ["--runs", str(tmp_path), "--data-root", str(synthetic_root)]
    assert run_cli(run_table.main, ["--tasks", "pot_irrg2vai", "--protocol", "st-dasegnet", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prepared with protocol mmseg, not st-dasegnet" in err
    assert run_cli(run_table.main, ["--tasks", "pot2nowhere", *base]) == 2
    assert "no config for pot2nowhere" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_run_table_runs_as_a_script():
    done = subprocess.run([sys.executable, "tools/run_table.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "passed on to every stage" in done.stdout
