"""tools/run_table.py: every (task, seed) through run_pipeline, the table, and the Slurm array script."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

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


def _loveda_folders(root: Path, protocol: str) -> Path:
    """Both LoveDA domains under ``root``, as prepare_loveda.py names them in meta.json (no images needed here)."""
    for domain in ("loveda_urban", "loveda_rural"):
        (root / domain / "img_dir").mkdir(parents=True)
        (root / domain / "meta.json").write_text(json.dumps({"benchmark": "loveda", "protocol": protocol}))
    return root


def test_the_loveda_tasks_run_official_uda_on_the_target_root(tmp_path, capsys):
    data = _loveda_folders(tmp_path / "data", "standard")
    uda = _loveda_folders(tmp_path / "uda", "official-uda (transductive)")
    runs = tmp_path / "runs"
    assert run_cli(run_table.main, ["--tasks", "loveda", "--seeds", "0", "1", "--runs", str(runs), "--slurm",
                                    "--data-root", str(data), "--protocol", "official-uda",
                                    "--target-root", str(uda)]) == 0
    script = (runs / "run_table.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script
    commands = [shlex.split(shlex.split(line)[0]) for line in script.split("COMMANDS=(\n")[1].split("\n)")[0]
                .splitlines()]
    expected = [(task, target, seed) for task, target in (("loveda_rural2urban", "loveda_urban"),
                                                          ("loveda_urban2rural", "loveda_rural")) for seed in (0, 1)]
    for command, (task, target, seed) in zip(commands, expected, strict=True):
        assert command[command.index("--config") + 1].endswith(f"configs/{task}.yaml")
        assert command[command.index("--target") + 1] == str(uda / target)  # the transductive target folder
        assert command[command.index("--data-root") + 1] == str(data)  # the sources: standard
        assert command[command.index("--seed") + 1] == str(seed)
    capsys.readouterr()
    # A protocol of the other benchmark, tasks of two benchmarks, official-uda targets that are standard.
    for args, said in ((["--tasks", "loveda", "--protocol", "st-dasegnet"],
                        "--protocol st-dasegnet is not a protocol of the tasks' benchmark loveda; use standard or "
                        "official-uda"),
                       (["--tasks", "pot_irrg2vai,loveda_rural2urban"], "the tasks belong to different benchmarks"),
                       (["--tasks", "loveda_rural2urban", "--protocol", "official-uda"],
                        "was prepared with protocol standard, not official-uda (transductive); prepare it with "
                        "tools/prepare_loveda.py --protocol official-uda")):
        assert run_cli(run_table.main, [*args, "--slurm", "--runs", str(tmp_path / "refused"),
                                        "--data-root", str(data)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
    assert not (tmp_path / "refused").exists()


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
