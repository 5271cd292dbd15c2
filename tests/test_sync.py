"""Training iterations never wait for the device: no value is read back between two log points.

A read-back (``Tensor.item``, ``bool(tensor)``, ``float(tensor)``, ``.tolist()``, ...) blocks the host until
the device has finished all queued work, so one per iteration keeps a GPU idle while the host prepares the
next. The probes below count such calls made from our device-side code in engine/, losses/, models/ and
utils/. The data pipeline works on the host, and PyTorch's own calls (its optimisers' bookkeeping) are not
ours to change, so neither is counted.
"""

from __future__ import annotations

import sys

import pytest
import torch

import engine.trainer as trainer
from engine.benchmarking import random_data
from engine.build import build_method
from engine.config import resolve_config
from engine.refresh import RefreshSpec, refresh_prototypes
from engine.safety import read_back
from utils.run import seed_everything

OURS = ("engine.", "losses.", "models.", "utils.")
READ_BACKS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__")


@pytest.fixture
def read_backs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records ``module:line method`` of every read-back that our code makes while the test runs."""
    calls: list[str] = []

    def probe(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith(OURS):
                calls.append(f"{module}:{caller.f_lineno} {name}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in READ_BACKS:
        monkeypatch.setattr(torch.Tensor, name, probe(name))
    return calls


def _config(stage: str, **overrides) -> dict:
    args = {"backbone": "resnet18", "img_size": 64, "batch_size": 2, "eval_batch_size": 2, "device": "cpu",
            "log_every": 4, "tgt_proto_start": 1, "gnce_start_epoch": 1}
    return resolve_config(stage, overrides={**args, **overrides})


@pytest.mark.parametrize("stage,preset", [("step1", "legacy"), ("step2", "paper"), ("step3", "paper")])
def test_iterations_between_log_points_read_nothing_back(stage, preset, read_backs):
    cfg = _config(stage, preset=preset)
    seed_everything(0)
    napg = build_method(cfg, torch.device("cpu"))
    data = random_data(cfg, torch.device("cpu"), batches=1)
    protos = refresh_prototypes(napg.model, data["source_refresh"], data["target_refresh"], 0.5,
                                RefreshSpec(cfg.clusters), torch.device("cpu"))
    read_backs.clear()  # the refresh reads its k-means results back: it runs once per epoch, not per iteration
    for _ in range(cfg.log_every - 1):
        logs, _ = trainer.train_iteration(napg, data, protos, epoch=1)
    assert read_backs == []
    assert "loss_d1" in logs and "d1_target" in logs  # the discriminator step ran, monitoring included
    values = read_back(napg, logs)  # the log point: one transfer, which the probes see
    assert len(read_backs) == 1 and set(values) == set(logs)


def test_the_training_loop_reads_back_only_at_its_checks(synthetic_root, tmp_path, monkeypatch, read_backs):
    """A whole step-0 stage: every read-back after an iteration follows a check (log point, pass end)."""
    events: list[str] = []

    def marking(name: str, function):
        def wrapper(*args, **kwargs):
            events.extend(read_backs)  # what was read since the previous mark, in order
            read_backs.clear()
            events.append(name)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(trainer, "train_iteration", marking("iteration", trainer.train_iteration))
    monkeypatch.setattr(trainer, "read_back", marking("check", trainer.read_back))
    cfg = _config("step0", data_root=str(synthetic_root), source="potsdam_irrg", target="vaihingen_irrg",
                  resize=64, epochs=1, iters_per_epoch=9, num_workers=0, refresh_max_batches=1,
                  eval_max_batches=1, work_dir=str(tmp_path / "run"), progress=False)
    trainer.run_stage(cfg)
    events.extend(read_backs)
    marks = [e for e in events if e in ("iteration", "check")]
    # Checks after iterations 4 and 8 (log points) and 9 (the end of the pass).
    assert marks == ["iteration"] * 4 + ["check"] + ["iteration"] * 4 + ["check", "iteration", "check"]
    last_mark = None
    for event in events:
        if event in ("iteration", "check"):
            last_mark = event
        else:
            assert last_mark != "iteration", f"{event} between two iterations"
    assert last_mark == "check" and len(events) > len(marks)  # the checks and the final evaluation read back
