"""Resume from every checkpoint the trainer writes, signals, and run folders that never get stuck."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.loaders import BatchStream
from engine.cli import stage_main
from tests.helpers import REPO, STAGE_SCRIPTS, tiny_args
from tools import run_pipeline
from utils.checkpoint import save_checkpoint
from utils.errors import run_cli


class _Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> int:
        return i


def test_a_stream_saved_at_the_end_of_a_pass_resumes_with_the_next_pass():
    straight = BatchStream(_Numbers(), 2, seed=3)
    first = [next(straight).tolist() for _ in range(3)]  # exactly one pass
    resumed = BatchStream(_Numbers(), 2, seed=3)
    resumed.load_state_dict(straight.state_dict())
    assert [next(resumed).tolist() for _ in range(3)] == [next(straight).tolist() for _ in range(3)]
    assert sorted(sum(first, [])) == list(range(6))


def test_a_save_removes_the_temporary_files_of_killed_saves(tmp_path):
    stale = tmp_path / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".model.pt.x.tmp"  # another file's temporary is not ours to remove
    other.write_bytes(b"")
    save_checkpoint({"w": torch.ones(1)}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt.x.tmp", "last.pt"]


# Uncapped epochs (no --iters-per-epoch): the source has 18 training patches, the target 8, batch 2.
UNCAPPED = ["--deterministic", "--epochs", "2", "--iters-per-epoch", "null", "--progress", "false"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    state = torch.load(folder / "model.pt", weights_only=True)
    out = {f"{k}.{n}": t for k in ("model", "d1", "d2") for n, t in state.get(k, {}).items()}
    out.update({f"prototypes.{k}": t for k, t in state["prototypes"].items() if isinstance(t, torch.Tensor)})
    return out


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        assert torch.equal(tensor, wb[name]), f"{name} differs after resume"


def _interrupt(stage: str, args: list[str], metrics: Path, after_lines: int, sig: int) -> subprocess.CompletedProcess:
    """Run a stage and send ``sig`` once ``metrics`` has grown by ``after_lines`` records."""
    start = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    proc = subprocess.Popen([sys.executable, STAGE_SCRIPTS[stage], *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= start + after_lines:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def in_process():
    """Runs a stage in this process (no start-up cost); undoes the global switch of --deterministic."""
    yield lambda stage, args: run_cli(lambda a: stage_main(stage, a), args)
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_step1_resumes_at_a_pass_end_and_after_sigterm_with_the_uninterrupted_weights(synthetic_root, tmp_path,
                                                                                       in_process):
    assert in_process("step1", tiny_args(synthetic_root, tmp_path / "straight", *UNCAPPED)) == 0
    args = tiny_args(synthetic_root, tmp_path / "split", *UNCAPPED)
    run_dir = tmp_path / "split" / "step1"
    assert in_process("step1", [*args, "--stop-after", "9"]) == 0  # 9 = one uncapped pass: saved at its end
    # SIGTERM mid-epoch: the iteration finishes, last.pt is written, one line names --resume, exit 143.
    term = _interrupt("step1", [*args, "--resume"], run_dir / "metrics.jsonl", 3, signal.SIGTERM)
    assert term.returncode == 143, term.stderr[-2000:]
    assert term.stderr.strip().count("\n") == 0 and "--resume" in term.stderr and "SIGTERM" in term.stderr
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "manifest.json").exists()
    assert in_process("step1", [*args, "--resume"]) == 0
    _assert_same(tmp_path / "straight" / "step1", run_dir)


@pytest.mark.slow
def test_step3_resumes_at_a_pass_end_and_after_ctrl_c_with_the_uninterrupted_weights(synthetic_root, tmp_path,
                                                                                      in_process):
    work = tmp_path / "chain"
    for stage in ("step1", "step2"):
        assert in_process(stage, tiny_args(synthetic_root, work, "--epochs", "1", "--iters-per-epoch", "1",
                                           "--progress", "false")) == 0
    init = ["--init", str(work / "step2")]
    assert in_process("step3", tiny_args(synthetic_root, tmp_path / "straight", *UNCAPPED, *init)) == 0
    args = tiny_args(synthetic_root, tmp_path / "split", *UNCAPPED, *init)
    run_dir = tmp_path / "split" / "step3"
    assert in_process("step3", [*args, "--stop-after", "4"]) == 0  # step 3 passes over the 8 target patches
    ctrl_c = _interrupt("step3", [*args, "--resume"], run_dir / "metrics.jsonl", 2, signal.SIGINT)
    assert ctrl_c.returncode == 130 and "--resume" in ctrl_c.stderr, ctrl_c.stderr[-2000:]
    assert in_process("step3", [*args, "--resume"]) == 0
    _assert_same(tmp_path / "straight" / "step3", run_dir)


@pytest.mark.slow
def test_a_stage_stopped_before_its_first_checkpoint_starts_again(synthetic_root, tmp_path, capsys):
    """A kill or a data error before the first checkpoint leaves config.yaml and env.json only: --resume and
    a plain rerun, also through the pipeline, train the stage from the start."""
    work = tmp_path / "work"
    args = tiny_args(synthetic_root, work, "--progress", "false", "--epochs", "1")
    (work / "step0").mkdir(parents=True)
    (work / "step0" / "config.yaml").write_text("stage: step0\n")
    assert run_cli(lambda a: stage_main("step0", a), [*args, "--resume"]) == 0
    assert (work / "step0" / "manifest.json").exists()
    (work / "step1").mkdir()
    (work / "step1" / "env.json").write_text("{}")
    (work / "step1" / "config.yaml").write_text("stage: step1\n")
    config = tmp_path / "pair.yaml"
    config.write_text("seed: 1\n")
    code = run_cli(run_pipeline.main, ["--config", str(config), "--work-dir", str(work), "--stages", "step0",
                                       "step1", *args[:-2]])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (work / "step1" / "manifest.json").exists()
    assert "step0: finished run found" in capsys.readouterr().out
