"""Speed of NAPG: building blocks (fast vs reference), whole training stages, and the data loader.

    python tools/benchmark.py --device cpu --k 4 --img-size 256 --batch-size 2 [--what head network] [--json out.json]
    python tools/benchmark.py --what stage --device cpu --img-size 256 --batch-size 2 --backbone resnet18
        --stages step1 step2
    python tools/benchmark.py --what loader --num-workers 2

``head`` / ``network``: forward + backward of the prototype head or the whole network; the table shows the
median over ``--repeats`` timed iterations after ``--warmup`` untimed ones (the implementations take turns)
and the speed-up of each over the reference one.

``stage``: the real engine pieces of each stage in ``--stages`` (config from ``utils.config``, data and
loaders as the trainer builds them, ``NAPG`` steps, ``refresh_prototypes``, ``evaluate``) on prepared
domain folders under ``--data-root`` (default: the small synthetic set, generated into a temporary
folder) or, with ``--synthetic-random``, on random batches held in memory (no data loading: compute
only). Per stage: images/s (source + target images of training per second), s/iteration, the fraction of
each iteration spent waiting for the next batch, the time of one refresh pass and one evaluation pass
over the data, and peak memory (CUDA max allocated, or the process's max RSS on CPU, which covers the
whole run so far and not the loader workers). Iterations run at the first epoch in which every term of
the stage is on (``--epoch`` overrides), after ``--warmup`` untimed ones.

``loader``: samples/s of one split read from the PNG files and from the uint8 cache, with 0 and
``--num-workers`` loader processes, over ``--repeats`` passes after ``--warmup`` untimed ones.

Timings are for this machine only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.domains import resolve_domain
from engine import benchmarking
from engine.benchmarking import (
    peak_memory_mb,
    random_data,
    refresh_once,
    set_up_device,
    stage_config,
    sync,
    time_steps,
)
from engine.build import build_data, build_method
from engine.config import resolve_config
from engine.evaluate import evaluate
from engine.handoff import check_fits, handoff_file, load_handoff
from engine.trainer import train_iteration
from models import NAPGNet, PrototypeHead
from models.napg import BACKBONES, FEATURE_CHANNELS
from utils.config import OPTIONS
from utils.errors import UserError, run_cli
from utils.flags import FlagParser, add_shared_similarity
from utils.paths import check_output_files
from utils.run import seed_everything
from utils.stages import STAGE_NAMES

IMPLS = ("reference", "fast")
DATA_ROLES = ("source", "target", "source_refresh", "target_refresh", "target_val")


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
    head = PrototypeHead(args.num_classes, FEATURE_CHANNELS, shared=args.shared_similarity).to(device)

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
        raise UserError("the network benchmark runs in training mode, whose BatchNorm needs --batch-size >= 2")
    torch.manual_seed(0)
    model = NAPGNet(args.num_classes, backbone=args.backbone, shared_similarity=args.shared_similarity)
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


def bench_one_stage(stage: str, args: argparse.Namespace, device: torch.device, data_root: Path | None) -> dict:
    """Train iterations, one refresh pass and one evaluation pass of ``stage``; one result row."""
    cfg = stage_config(stage, size=args.size, resize=args.resize, batch=args.batch, workers=args.workers,
                       backbone=args.backbone, head_impl=args.head_impl, amp=args.amp, cache=args.cache,
                       device=args.device, source=args.source, target=args.target, data_root=data_root)
    seed_everything(cfg.seed)
    set_up_device(cfg, device)
    data = random_data(cfg, device, args.random_batches) if data_root is None else build_data(cfg, device)
    init_state = None  # random initialisation unless --init: no weights are downloaded
    if args.init is not None:
        init_state = load_handoff(handoff_file(args.init))
        check_fits(init_state, cfg, args.init)
    napg = build_method(cfg, device, init_state)
    model = napg.model
    epoch = args.epoch or cfg.steady_epoch()
    tau = cfg.tau_at(epoch)
    uses_target = napg.uses_target and data["target"] is not None

    # A one-batch refresh gives the starting prototypes and warms up the refresh path.
    protos = refresh_once(napg, data, cfg, tau, device, max_batches=1)

    def iteration() -> tuple[float, float]:
        sync(device)
        start = time.perf_counter()
        _, data_seconds = train_iteration(napg, data, protos, epoch)
        sync(device)
        return data_seconds, time.perf_counter() - start

    for _ in range(args.warmup):
        iteration()
    data_times, iter_times = zip(*(iteration() for _ in range(args.repeats)))

    sync(device)
    start = time.perf_counter()
    protos = refresh_once(napg, data, cfg, tau, device, previous=protos)
    sync(device)
    refresh_s = time.perf_counter() - start
    eval_s = float("nan")
    if data["target_val"] is not None:
        prototypes = protos.for_target
        start = time.perf_counter()
        evaluate(model, data["target_val"], prototypes, device, cfg.num_classes)
        sync(device)
        eval_s = time.perf_counter() - start
    peak, peak_kind = peak_memory_mb(device)
    images = cfg.batch_size * (2 if uses_target else 1)
    total = sum(iter_times)
    cache_active = data_root is not None and all(data[k].dataset.cache is not None for k in DATA_ROLES
                                                 if data[k] is not None)
    return {"what": "stage", "stage": stage, "impl": cfg.head_impl, "amp": cfg.amp, "epoch": epoch,
            "images_per_iter": images, "images_per_s": images * len(iter_times) / total,
            "s_per_iter": total / len(iter_times), "s_per_iter_median": statistics.median(iter_times),
            "data_fraction": sum(data_times) / total, "refresh_s": refresh_s, "eval_s": eval_s,
            "peak_mem_mb": peak, "peak_mem_kind": peak_kind, "iter_times_s": list(iter_times),
            "data": "synthetic-random" if data_root is None else str(data_root), "cache_active": cache_active}


def bench_stage(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Each stage of ``--stages`` in turn (see the module docstring)."""
    data_root = None if args.synthetic_random else args.data_dir
    return [bench_one_stage(stage, args, device, data_root) for stage in args.stages]


def bench_loader(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Samples/s of one split through a DataLoader: PNG decoding vs the uint8 cache, 0 and N workers."""
    root = resolve_domain(args.data_dir, args.source or resolve_config("step0").source)
    return benchmarking.bench_loader(root, split=args.split, batch=args.batch, workers=args.workers,
                                     warmup=args.warmup, repeats=args.repeats)


BENCHMARKS: dict[str, Callable[[argparse.Namespace, torch.device], list[dict]]] = {
    "head": bench_head,
    "network": bench_network,
    "stage": bench_stage,
    "loader": bench_loader,
}
NEEDS_DATA = ("stage", "loader")


def format_table(rows: list[dict]) -> str:
    """head/network rows -> a text table with the speed-up over the reference row of the same benchmark."""
    reference = {r["what"]: r["median_ms"] for r in rows if r["impl"] == "reference"}
    lines = [f"{'what':<10} {'impl':<10} {'median ms':>10} {'speed-up':>9}"]
    for r in rows:
        ref = reference.get(r["what"])
        speedup = f"{ref / r['median_ms']:.1f}x" if ref else "-"
        lines.append(f"{r['what']:<10} {r['impl']:<10} {r['median_ms']:>10.2f} {speedup:>9}")
    return "\n".join(lines)


def format_stage_table(rows: list[dict]) -> str:
    """stage rows -> a text table."""
    lines = [f"{'stage':<6} {'head':<9} {'amp':<4} {'img/s':>7} {'s/iter':>7} {'data %':>6} {'refresh s':>9} "
             f"{'eval s':>7} {'peak MiB':>9}  memory"]
    for r in rows:
        lines.append(f"{r['stage']:<6} {r['impl']:<9} {r['amp']:<4} {r['images_per_s']:>7.2f} {r['s_per_iter']:>7.3f} "
                     f"{100 * r['data_fraction']:>6.1f} {r['refresh_s']:>9.2f} {r['eval_s']:>7.2f} "
                     f"{r['peak_mem_mb']:>9.0f}  {r['peak_mem_kind']}")
    return "\n".join(lines)


def format_loader_table(rows: list[dict]) -> str:
    """loader rows -> a text table with the cache's speed-up over PNG decoding at the same worker count."""
    png = {r["workers"]: r["samples_per_s"] for r in rows if r["impl"] == "png"}
    lines = [f"{'loader':<7} {'workers':>7} {'samples/s':>10} {'speed-up':>9}"]
    for r in rows:
        ref = png.get(r["workers"])
        speedup = f"{r['samples_per_s'] / ref:.1f}x" if ref else "-"
        lines.append(f"{r['impl']:<7} {r['workers']:>7} {r['samples_per_s']:>10.1f} {speedup:>9}")
    build = [r["cache_build_s"] for r in rows if r["cache_build_s"] is not None]
    if build:
        lines.append(f"(cache build or check: {build[0]:.2f} s, once per split; {rows[0]['samples']} samples)")
    return "\n".join(lines)


TABLES: dict[str, Callable[[list[dict]], str]] = {
    "head": format_table,
    "network": format_table,
    "stage": format_stage_table,
    "loader": format_loader_table,
}


@contextlib.contextmanager
def data_folder(args: argparse.Namespace) -> Iterator[Path | None]:
    """``--data-root``, or the small synthetic set generated into a temporary folder, when any chosen
    benchmark reads data; None otherwise."""
    needs = "loader" in args.what or ("stage" in args.what and not args.synthetic_random)
    if not needs:
        yield None
    elif args.data_root is not None:
        if not args.data_root.is_dir():
            raise UserError(f"--data-root {args.data_root} is not a folder; prepare data with tools/prepare_isprs.py "
                            "or leave the flag out to use the synthetic set")
        yield args.data_root
    else:
        from data.synthetic import make_synthetic

        with tempfile.TemporaryDirectory(prefix="napg-benchmark-") as tmp:
            print(f"generating the small synthetic data set in {tmp} ...", file=sys.stderr, flush=True)
            make_synthetic(Path(tmp), mode="prepared", size="small")
            yield Path(tmp)


def build_parser() -> FlagParser:
    parser = FlagParser(description="Time NAPG parts (fast vs reference), training stages and loaders.")
    parser.add_argument("--what", nargs="+", default=["head", "network"], choices=list(BENCHMARKS),
                        help="what to time")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", "--batch", dest="batch", type=int, default=2,
                        help="images per batch (per domain in a stage)")
    parser.add_argument("--img-size", "--size", dest="size", type=int, default=256,
                        help="input side in pixels (multiple of 32; a stage's training crop)")
    parser.add_argument("--k", type=int, default=4, help="prototypes per class (head/network)")
    parser.add_argument("--num-classes", type=int, default=6, help="classes of the head")
    parser.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES), help="ResNet depth")
    add_shared_similarity(parser, "one similarity conv for all classes (the original); false: one per class")
    parser.add_argument("--repeats", type=int, default=10, help="timed iterations (loader: timed passes)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations (loader: passes) first")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    stage = parser.add_argument_group("stage and loader benchmarks")
    stage.add_argument("--stages", nargs="+", default=["step1", "step2"], choices=STAGE_NAMES,
                       help="stages whose iterations are timed")
    stage.add_argument("--head-impl", default="fast", choices=IMPLS, help="prototype head implementation")
    stage.add_argument("--amp", default="off", choices=OPTIONS["amp"].choices, help=OPTIONS["amp"].help)
    stage.add_argument("--cache", action="store_true", help="read patches from the uint8 cache")
    stage.add_argument("--num-workers", "--workers", dest="workers", type=int, default=0,
                       help="data-loader processes (loader: also runs 0)")
    stage.add_argument("--resize", type=int, help="resize every patch to this side first (as the config option)")
    stage.add_argument("--epoch", type=int, help="epoch whose schedule the iterations follow (default: the "
                       "first with every term of the stage on)")
    stage.add_argument("--data-root", type=Path, help="folder of prepared domain folders (default: the small "
                       "synthetic set, generated into a temporary folder)")
    stage.add_argument("--source", help="source domain (default: the config's); the loader benchmark reads it")
    stage.add_argument("--target", help="target domain (default: the config's)")
    stage.add_argument("--split", default="train", help="split read by the loader benchmark")
    stage.add_argument("--synthetic-random", action="store_true", help="stage: random batches held in memory, "
                       "no data loading (isolates compute)")
    stage.add_argument("--init", type=Path, help="start every stage from this hand-off checkpoint or finished "
                       "run folder (e.g. a converted original checkpoint) instead of random weights")
    stage.add_argument("--random-batches", type=int, default=2, help="refresh/evaluation batches per role with "
                       "--synthetic-random")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json is not None:
        check_output_files([args.json], "--json")
    if args.size % 32 or args.size <= 0:
        raise UserError(f"--img-size must be a positive multiple of 32, got {args.size}")
    for name in ("batch", "k", "num_classes", "repeats", "random_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0 or args.warmup < 0:
        raise UserError("--num-workers and --warmup must be >= 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    rows = []
    with data_folder(args) as args.data_dir:
        for what in args.what:
            new = BENCHMARKS[what](args, device)
            print(TABLES[what](new), flush=True)
            rows += new
        data_dir = None if args.data_dir is None else str(args.data_dir)
    if args.json is not None:
        env = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "data_dir": data_dir,
        }
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "data_dir"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config, "env": env, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
