"""Prototype head: parity with the original (fixtures), fast path == reference loop, benchmark smoke run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import tools.benchmark as benchmark
from models import NAPGNet, PrototypeHead, group_max, group_prob
from models.head import check_prototypes
from tests.helpers import assert_close, load_fixture


@pytest.fixture(scope="module")
def nets() -> dict[bool, NAPGNet]:
    torch.manual_seed(0)
    return {shared: NAPGNet(backbone="resnet18", shared_similarity=shared) for shared in (True, False)}


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_class"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_head_matches_original_fixture(nets: dict[bool, NAPGNet], k: int, impl: str, shared: bool) -> None:
    fx = load_fixture(f"head_k{k}.pt")
    net = nets[shared]
    net.head.impl = impl
    with torch.no_grad():
        # per-class convs all set to the original's one shared conv must reproduce it exactly
        for conv in net.head.sim:
            conv.weight.copy_(fx["sim_weight"])
            conv.bias.copy_(fx["sim_bias"])
        net.classifier.weight.copy_(fx["classifier_weight"])
        net.classifier.bias.copy_(fx["classifier_bias"])
    net.zero_grad(set_to_none=True)
    f = fx["f"].clone().requires_grad_(True)
    p = fx["P"].clone().requires_grad_(True)
    out = net.decode(f, tuple(fx["outUp"].shape[-2:]), p)
    loss = ((out["proto_logits"] * fx["R1"]).sum() + (out["proto_max"] * fx["R2"]).sum()
            + (out["logits_up"] * fx["R3"]).sum())
    loss.backward()

    for ours, theirs in [("logits", "out"), ("logits_up", "outUp"), ("proto_logits", "cat"),
                         ("proto_max", "catmax"), ("proto_prob", "q")]:
        assert_close(out[ours], fx[theirs], ours)
    assert_close(loss, fx["L"], "L")
    assert_close(f.grad, fx["grad_f"], "grad_f")
    assert_close(p.grad, fx["grad_P"], "grad_P")
    # the original's shared conv receives the sum of what per-class convs receive
    assert_close(sum(c.weight.grad for c in net.head.sim), fx["grad_sim_weight"], "grad_sim_weight")
    assert_close(sum(c.bias.grad for c in net.head.sim), fx["grad_sim_bias"], "grad_sim_bias")
    assert_close(net.classifier.weight.grad, fx["grad_classifier_weight"], "grad_classifier_weight")
    assert_close(net.classifier.bias.grad, fx["grad_classifier_bias"], "grad_classifier_bias")


def _run(head: PrototypeHead, f: torch.Tensor, p: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """cat and the gradients of (cat * r).sum() w.r.t. f, p and every sim parameter."""
    f = f.clone().requires_grad_(True)
    p = p.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    cat = head(f, p)
    (cat * r).sum().backward()
    grads = {f"grad_{name}": param.grad for name, param in head.named_parameters()}
    return {"cat": cat.detach(), "grad_f": f.grad, "grad_p": p.grad, **grads}


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_class"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(8, 8), (12, 20)], ids=["8x8", "12x20"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_fast_head_matches_reference_loop(k: int, size: tuple[int, int], batch: int, shared: bool) -> None:
    torch.manual_seed(100 * k + batch)
    fast = PrototypeHead(6, 128, shared=shared, impl="fast")
    ref = copy.deepcopy(fast)
    ref.impl = "reference"
    f = torch.randn(batch, 128, *size).relu()
    p = torch.randn(6 * k, 128)
    r = torch.randn(batch, 6 * k, *size)
    got, want = _run(fast, f, p, r), _run(ref, f, p, r)
    assert set(got) == set(want)
    assert len([n for n in got if n.startswith("grad_sim")]) == (2 if shared else 12)
    for name in want:
        assert_close(got[name], want[name], name)


def test_fast_head_is_exact_in_float64() -> None:
    torch.manual_seed(1)
    fast = PrototypeHead(6, 128, shared=False, impl="fast").double()
    ref = copy.deepcopy(fast)
    ref.impl = "reference"
    f = torch.randn(2, 128, 6, 10, dtype=torch.float64).relu()
    p = torch.randn(12, 128, dtype=torch.float64)
    r = torch.randn(2, 12, 6, 10, dtype=torch.float64)
    got, want = _run(fast, f, p, r), _run(ref, f, p, r)
    for name in want:
        assert_close(got[name], want[name], name, rel=1e-11)


def test_per_class_head_uses_the_conv_of_each_prototypes_class() -> None:
    torch.manual_seed(2)
    k = 3
    per_class = PrototypeHead(6, 128, shared=False)
    f = torch.randn(2, 128, 7, 9).relu()
    p = torch.randn(6 * k, 128)
    cat = per_class(f, p)
    for c in range(6):
        shared = PrototypeHead(6, 128, shared=True)
        shared.sim[0].load_state_dict(per_class.sim[c].state_dict())
        assert_close(cat[:, c * k:(c + 1) * k], shared(f, p)[:, c * k:(c + 1) * k], f"class {c}")


def test_group_outputs() -> None:
    torch.manual_seed(3)
    cat = torch.randn(2, 6 * 3, 5, 5)
    q = group_prob(cat, 6)
    assert q.shape == group_max(cat, 6).shape == (2, 6, 5, 5)
    # the most probable class is that of the single most similar prototype
    assert torch.equal(q.argmax(1), cat.argmax(1) // 3)
    assert torch.equal(group_max(cat, 6).argmax(1), cat.argmax(1) // 3)
    # with K = 1 the joint softmax is an ordinary softmax over classes
    single = torch.randn(2, 6, 5, 5)
    assert_close(group_prob(single, 6).sum(1), torch.ones(2, 5, 5), "sum of q")


@pytest.mark.parametrize("shape", [(12, 64), (7, 128), (0, 128), (2, 6, 128)])
def test_bad_prototype_shapes_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="prototypes"):
        check_prototypes(torch.zeros(shape), 6, 128)


def test_unknown_head_impl_is_rejected() -> None:
    with pytest.raises(ValueError, match="impl"):
        PrototypeHead(impl="turbo")


def test_benchmark_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--what", "head", "network", "--backbone", "resnet18", "--img-size", "64", "--k", "2",
            "--repeats", "1", "--warmup", "0", "--json", str(out)]
    assert benchmark.main(argv) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "network" in table
    result = json.loads(out.read_text())
    rows = {(r["what"], r["impl"]) for r in result["results"]}
    assert rows == {(w, i) for w in ("head", "network") for i in ("fast", "reference")}
    assert all(r["median_ms"] > 0 and len(r["times_ms"]) == 1 for r in result["results"])
    assert result["config"]["k"] == 2
