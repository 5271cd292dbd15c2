"""The methods' Adam: torch's fused kernel, checked against the per-parameter loop it replaces."""

from __future__ import annotations

import torch

from engine.benchmarking import stage_config
from engine.build import build_method
from engine.methods.base import adam


def test_fused_adam_makes_the_plain_loops_updates():
    torch.manual_seed(0)
    fused = [torch.randn(shape, requires_grad=True) for shape in ((8, 4, 3, 3), (8,), (5, 7))]
    plain = [p.detach().clone().requires_grad_() for p in fused]
    start = [p.detach().clone() for p in fused]
    opt_fused = adam(fused, lr=1e-2, betas=(0.9, 0.99), weight_decay=5e-4)
    opt_plain = torch.optim.Adam(plain, lr=1e-2, betas=(0.9, 0.99), weight_decay=5e-4, foreach=False, fused=False)
    for _ in range(5):
        for p, q in zip(fused, plain):
            grad = torch.randn_like(p)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt_fused.step()
        opt_plain.step()
    for p, q, p0 in zip(fused, plain, start):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
        assert (p != p0).all()  # every element moved


def test_every_optimiser_of_a_method_is_fused_also_after_an_old_checkpoint():
    cfg = stage_config("step2", size=64, batch=2, backbone="resnet18", device="cpu")
    method = build_method(cfg, torch.device("cpu"))
    optimisers = [method.opt_g, method.opt_d1, method.opt_d2]
    assert all(group["fused"] for opt in optimisers for group in opt.param_groups)
    state = method.state_dict()
    for key in ("opt_g", "opt_d1", "opt_d2"):  # as a last.pt of the per-parameter loop has them
        for group in state[key]["param_groups"]:
            group.update(fused=None, foreach=None)
    method.load_state_dict(state)
    assert all(group["fused"] for opt in optimisers for group in opt.param_groups)
    assert all(opt.state[p]["step"].device == p.device for opt in optimisers for group in opt.param_groups
               for p in group["params"] if p in opt.state)
