"""``--compile``: one training iteration of a compiled network gives the eager iteration's losses.

``aot_eager`` captures the graphs (TorchDynamo) and differentiates them (AOTAutograd) as the default
backend does, without generating code: seconds. ``inductor``, what ``--compile`` uses, also compiles C++
kernels with the system's compiler (``cc``), which takes about two minutes on two cores: a slow test.
"""

from __future__ import annotations

import functools

import pytest
import torch

from engine.benchmarking import random_data
from engine.build import build_method
from engine.config import resolve_config
from engine.refresh import RefreshResult
from engine.trainer import train_iteration
from utils.run import seed_everything


def _losses(compile_: bool) -> dict[str, float]:
    cfg = resolve_config("step1", overrides={"backbone": "resnet18", "img_size": 64, "batch_size": 2,
                                             "device": "cpu", "compile": compile_, "gnce_start_epoch": 1})
    seed_everything(0)
    napg = build_method(cfg, torch.device("cpu"))
    data = random_data(cfg, torch.device("cpu"), batches=1)
    generator = torch.Generator().manual_seed(0)
    protos = RefreshResult(torch.randn(cfg.num_classes * max(cfg.clusters), 128, generator=generator), None,
                           clusters=cfg.clusters)
    logs, _ = train_iteration(napg, data, protos, epoch=1)
    return {k: v.item() for k, v in logs.items()}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_iteration_matches_eager(backend, monkeypatch):
    eager = _losses(False)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    compiled = _losses(True)
    assert set(compiled) == set(eager)
    for name, value in eager.items():
        assert abs(compiled[name] - value) <= 1e-3 * max(1.0, abs(value)), (name, compiled[name], value)
