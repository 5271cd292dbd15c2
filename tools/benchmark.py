"""Speed of the NAPG building blocks (forward + backward), fast vs reference implementations.

    python tools/benchmark.py --device cpu --k 4 --size 256 --batch 2 [--what head network] [--json out.json]

Each benchmark in ``BENCHMARKS`` returns rows ``{"what", "impl", "median_ms", "times_ms"}``; the
table shows the median over ``--repeats`` timed iterations after ``--warmup`` untimed ones (the
implementations take turns) and the speed-up of each over the reference one. Timings are for this
machine only.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from models import NAPGNet, PrototypeHead
from models.napg import BACKBONES, FEATURE_CHANNELS
from utils.errors import UserError, run_cli

IMPLS = ("reference", "fast")


def time_steps(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int,
               warmup: int) -> dict[str, list[float]]:
    """Milliseconds of ``repeats`` calls of each step after ``warmup`` untimed ones.

    The steps take turns within each repeat, so a change in machine load affects them alike.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def _rows(what: str, times: dict[str, list[float]]) -> list[dict]:
    return [{"what": what, "impl": impl, "median_ms": statistics.median(t), "times_ms": t}
            for impl, t in times.items()]


def bench_head(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Prototype head alone on features [B, 128, size/16, size/16] with C*K prototypes."""
    gen = torch.Generator().manual_seed(0)
    side = args.size // 16
    features = torch.randn(args.batch, FEATURE_CHANNELS, side, side, generator=gen).relu().to(device)
    features.requires_grad_(True)
    prototypes = torch.randn(args.num_classes * args.k, FEATURE_CHANNELS, generator=gen).to(device)
    weights = torch.randn(args.batch, args.num_classes * args.k, side, side, generator=gen).to(device)
    head = PrototypeHead(args.num_classes, FEATURE_CHANNELS, shared=not args.per_class_sim).to(device)

    def step(impl: str) -> None:
        head.impl = impl
        head.zero_grad(set_to_none=True)
        features.grad = None
        (head(features, prototypes) * weights).sum().backward()

    steps = {impl: functools.partial(step, impl) for impl in IMPLS}
    return _rows("head", time_steps(steps, device, args.repeats, args.warmup))


def bench_network(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Whole network in training mode on images [B, 3, size, size], same weights for both heads."""
    if args.batch < 2:
        raise UserError("the network benchmark runs in training mode, whose BatchNorm needs --batch >= 2")
    torch.manual_seed(0)
    model = NAPGNet(args.num_classes, backbone=args.backbone, shared_similarity=not args.per_class_sim)
    model.to(device).train()
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    prototypes = torch.randn(args.num_classes * args.k, FEATURE_CHANNELS, device=device)

    def step(impl: str) -> None:
        # one model, so both implementations see the same weights and BatchNorm state
        model.head.impl = impl
        model.zero_grad(set_to_none=True)
        out = model(images, prototypes)
        (out["logits_up"].mean() + out["proto_logits"].mean()).backward()

    steps = {impl: functools.partial(step, impl) for impl in IMPLS}
    return _rows("network", time_steps(steps, device, args.repeats, args.warmup))


BENCHMARKS: dict[str, Callable[[argparse.Namespace, torch.device], list[dict]]] = {
    "head": bench_head,
    "network": bench_network,
}


def format_table(rows: list[dict]) -> str:
    """Rows -> a text table with the speed-up over the reference row of the same benchmark."""
    reference = {r["what"]: r["median_ms"] for r in rows if r["impl"] == "reference"}
    lines = [f"{'what':<10} {'impl':<10} {'median ms':>10} {'speed-up':>9}"]
    for r in rows:
        ref = reference.get(r["what"])
        speedup = f"{ref / r['median_ms']:.1f}x" if ref else "-"
        lines.append(f"{r['what']:<10} {r['impl']:<10} {r['median_ms']:>10.2f} {speedup:>9}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time forward+backward of NAPG parts (fast vs reference).")
    parser.add_argument("--what", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="input side in pixels (multiple of 32)")
    parser.add_argument("--k", type=int, default=4, help="prototypes per class")
    parser.add_argument("--num-classes", type=int, default=6)
    parser.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES))
    parser.add_argument("--per-class-sim", action="store_true", help="one similarity conv per class")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.size % 32 or args.size <= 0:
        raise UserError(f"--size must be a positive multiple of 32, got {args.size}")
    for name in ("batch", "k", "num_classes", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    rows = [row for what in args.what for row in BENCHMARKS[what](args, device)]
    print(format_table(rows))
    if args.json is not None:
        env = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config, "env": env, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
