"""torchrun with two CPU processes (gloo): synchronised prototypes and parameters, single-process resume."""

import json
from pathlib import Path

import pytest

from tests.helpers import run_step, tiny_args

pytestmark = pytest.mark.slow


def torchrun(stage: str, args: list[str]):
    return run_step(stage, args, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))


def test_two_ranks_stay_identical_and_resume_in_one_process(synthetic_root, tmp_path):
    work = tmp_path / "ddp"
    step1 = torchrun("step1", tiny_args(synthetic_root, work))
    assert step1.returncode == 0, step1.stderr[-3000:]
    ranks = json.loads((work / "step1" / "manifest.json").read_text())["ranks"]
    assert ranks == {"world_size": 2, "identical_parameters": True, "identical_prototypes": True}

    step2 = torchrun("step2", tiny_args(synthetic_root, work, "--stop-after", "3"))
    assert step2.returncode == 0, step2.stderr[-3000:]
    assert (work / "step2" / "last.pt").exists() and not (work / "step2" / "manifest.json").exists()
    resumed = run_step("step2", tiny_args(synthetic_root, work, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((work / "step2" / "manifest.json").read_text())["ranks"] == {"world_size": 1}


def test_two_ranks_finish_step2_in_sync(synthetic_root, tmp_path):
    work = tmp_path / "ddp2"
    assert torchrun("step1", tiny_args(synthetic_root, work, "--epochs", "1")).returncode == 0
    step2 = torchrun("step2", tiny_args(synthetic_root, work))
    assert step2.returncode == 0, step2.stderr[-3000:]
    ranks = json.loads((work / "step2" / "manifest.json").read_text())["ranks"]
    assert ranks == {"world_size": 2, "identical_parameters": True, "identical_prototypes": True}
    assert Path(work / "step2" / "model.pt").exists()
