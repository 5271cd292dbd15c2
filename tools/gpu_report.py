"""One prepared GPU report: correctness, training throughput, refresh/evaluation passes, loaders, projection.

    make gpu-report      (or: python3 tools/gpu_report.py [--device cuda|cpu] [--tiny] [--out DIR])

Meant for a short GPU reservation on a bare machine: it needs only what such a machine has (PyTorch,
torchvision, NumPy, OpenCV, Pillow, scikit-learn, tqdm, TensorBoard, PyYAML), no network and no install,
and writes ``DIR/gpu_report.json`` and ``DIR/gpu_report.md`` (default ``gpu-report/``). The parts:

- ``gpu_check``: ``tools/gpu_check.py`` (every stage in bf16 and fp32, finite losses; torchrun with 2+ GPUs);
- ``variants``: step-1 and step-2 training at the paper's setting (ResNet-50, 512², 10 images per domain,
  the stage's K) in fp32, bf16 + channels-last and bf16 + channels-last + torch.compile: images/s (source +
  target), s/iteration, data-wait fraction (in-memory batches: compute only), peak memory, counted network
  GFLOP per image (forward + backward, ``torch.utils.flop_counter``) and the fraction of the device's dense
  bf16 peak that reaches;
- ``passes``: one refresh and one evaluation pass over a data set of the paper's size (3,456 source and
  344 target patches of 512², random images);
- ``loader``: samples/s of 512² PNG patches and of their uint8 cache, with 0 and 8 workers;
- ``projected_pipeline_s``: the paper schedule (steps 0-3) for one pair, from the measured pieces.

On a GPU every part runs in its own process under a time cap, in order of importance, within
``--budget-s``: a part that fails, hangs or kills its process (a device assert) is recorded with its
one-line error and the others still run. On the CPU the parts run in this process (a failure is recorded
alike), which saves a start-up per part. ``--tiny`` shrinks every size (ResNet-18, 64², a few patches) so
that ``--device cpu --tiny`` runs end to end in seconds, as CI does; fields that only a GPU measures are
null on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from tools.benchmark import bench_loader, peak_memory_mb, random_data, stage_config, sync, time_steps
from utils.config import Config
from utils.errors import UserError, run_cli
from utils.run import seed_everything
from utils.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets, without sparsity), by a part of the device's
# name; the first match wins, so a name that contains another (A100 holds A10) comes first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A6000", 155.0), ("RTX 4090", 165.0),
    ("RTX 3090", 71.0), ("A10", 125.0), ("L4", 121.0),
)  # fmt: skip
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": "off", "channels_last": False, "compile": False},
    "bf16-cl": {"amp": "bf16", "channels_last": True, "compile": False},
    "bf16-cl-compile": {"amp": "bf16", "channels_last": True, "compile": True},
}
# The paper's setting, and the CI-sized one.
SCALES: dict[str, dict[str, Any]] = {
    "paper": {"backbone": "resnet50", "size": 512, "batch": 10, "warmup": 3, "repeats": 10, "source": 3456,
              "target": 344, "loader_patches": 160, "workers": 8},
    "tiny": {"backbone": "resnet18", "size": 64, "batch": 2, "warmup": 1, "repeats": 2, "source": 8,
             "target": 4, "loader_patches": 8, "workers": 2},
}
# (part, time cap in seconds on a GPU) in the order they run: the figures the goals need first.
PARTS: tuple[tuple[str, int], ...] = (
    ("gpu_check", 150), ("variant:step2:bf16-cl", 60), ("variant:step2:bf16-cl-compile", 120),
    ("passes", 60), ("variant:step1:bf16-cl", 50), ("loader", 60), ("variant:step2:fp32", 50),
    ("variant:step1:fp32", 50), ("variant:step1:bf16-cl-compile", 100),
)
DEFAULT_BUDGET_S = 450  # all parts together: 7.5 minutes, inside a 10-minute reservation with start-up


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device by its name (None when the table does not know it)."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


# ---------------------------------------------------------------------------------------------- parts
def _bench_args(scale: dict[str, Any], device: torch.device, setting: str = "bf16-cl") -> argparse.Namespace:
    """The benchmark tool's flags for this scale (what ``tools.benchmark.stage_config`` reads)."""
    return argparse.Namespace(size=scale["size"], resize=None, batch=scale["batch"], workers=0,
                              backbone=scale["backbone"], head_impl="fast", amp=SETTINGS[setting]["amp"],
                              cache=False, device=device.type, source=None, target=None)


def gflop_per_image(cfg: Config, device: torch.device) -> float:
    """Counted GFLOP of the segmenter's forward + backward per training image at the stage's K."""
    from models import NAPGNet
    from models.napg import FEATURE_CHANNELS

    model = NAPGNet(cfg.num_classes, backbone=cfg.backbone)
    model.to(device).train()
    images = torch.rand(2, 3, cfg.img_size, cfg.img_size, device=device)  # BatchNorm trains on 2+
    prototypes = torch.randn(cfg.num_classes * max(cfg.clusters), FEATURE_CHANNELS, device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(images, prototypes)
        (out["logits_up"].float().mean() + out["proto_logits"].float().mean()).backward()
    return counter.get_total_flops() / images.shape[0] / 1e9


def part_variant(stage: str, setting: str, scale: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Training throughput of ``stage`` under ``setting`` on in-memory random batches."""
    from engine.build import build_method
    from engine.device import unwrap
    from engine.refresh import RefreshSpec, refresh_prototypes
    from engine.trainer import train_iteration

    cfg = stage_config(stage, _bench_args(scale, device, setting), None)
    cfg = dataclasses.replace(cfg, **SETTINGS[setting])
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data = random_data(cfg, batches=1)
    napg = build_method(cfg, device)
    epoch = cfg.steady_epoch()
    tau = cfg.tau_at(epoch)
    protos = refresh_prototypes(unwrap(napg.model), data["source_refresh"], data["target_refresh"], tau,
                                dataclasses.replace(RefreshSpec.from_config(cfg), max_batches=1), device)
    data_seconds: list[float] = []

    def step() -> None:
        data_seconds.append(train_iteration(napg, data, protos, epoch)[1])

    times_s = [ms / 1000 for ms in time_steps({"train": step}, device, scale["repeats"], scale["warmup"])["train"]]
    images = cfg.batch_size * (2 if napg.uses_target else 1)
    s_per_iter = sum(times_s) / len(times_s)
    gflop = gflop_per_image(cfg, device)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {"stage": stage, "setting": setting, "images_per_s": images / s_per_iter, "s_per_iter": s_per_iter,
            "data_fraction": sum(data_seconds[-len(times_s):]) / sum(times_s),
            "peak_mem_mib": peak_memory_mb(device)[0] if device.type == "cuda" else None,
            "gflop_per_image": gflop,
            "peak_fraction": None if peak is None else gflop * 1e9 * images / s_per_iter / (peak * 1e12)}


def part_passes(scale: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One step-2 refresh pass and one evaluation pass over a data set of the paper's size (bf16)."""
    from engine.build import build_method
    from engine.device import unwrap
    from engine.evaluate import evaluate
    from engine.refresh import RefreshSpec, refresh_prototypes

    cfg = stage_config("step2", _bench_args(scale, device), None)
    cfg = dataclasses.replace(cfg, **SETTINGS["bf16-cl"], eval_batch_size=scale["batch"])
    seed_everything(cfg.seed)
    one = random_data(cfg, batches=1)
    # The same batch over and over: the time of a pass depends on its size, not on its pixels.
    data = {"source_refresh": one["source_refresh"] * math.ceil(scale["source"] / scale["batch"]),
            "target_refresh": one["target_refresh"] * math.ceil(scale["target"] / scale["batch"]),
            "target_val": one["target_val"] * math.ceil(scale["target"] / scale["batch"])}
    napg = build_method(cfg, device)
    tau = cfg.tau_at(cfg.steady_epoch())
    spec = RefreshSpec.from_config(cfg)
    refresh_data = (unwrap(napg.model), data["source_refresh"], data["target_refresh"], tau)
    refresh_prototypes(*refresh_data, dataclasses.replace(spec, max_batches=1), device)  # warm-up
    sync(device)
    start = time.perf_counter()
    protos = refresh_prototypes(*refresh_data, spec, device)
    sync(device)
    refresh_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(napg.model, data["target_val"], protos.source_target, device, cfg.num_classes, amp=cfg.amp)
    sync(device)
    return {"refresh_s": refresh_s, "eval_s": time.perf_counter() - start,
            "source_patches": scale["source"], "target_patches": scale["target"]}


def part_loader(scale: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Samples/s of random PNG patches of the run's size (and of their uint8 cache) through a DataLoader."""
    with tempfile.TemporaryDirectory(prefix="napg-gpu-report-") as tmp:
        domain = Path(tmp) / "patches"
        rng = np.random.default_rng(0)
        for split in ("img_dir", "ann_dir"):
            (domain / split / "train").mkdir(parents=True)
        side = scale["size"]
        for i in range(scale["loader_patches"]):
            # Smooth content, as aerial patches: random noise would not compress and would decode slower.
            small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
            image = cv2.resize(small, (side, side), interpolation=cv2.INTER_LINEAR)
            cv2.imwrite(str(domain / "img_dir" / "train" / f"p{i:04d}.png"), image)
            cv2.imwrite(str(domain / "ann_dir" / "train" / f"p{i:04d}.png"), image[..., 0] % 6)
        (domain / "meta.json").write_text(json.dumps({"label_format": "train_ids"}))
        args = argparse.Namespace(data_dir=Path(tmp), source=str(domain), split="train", batch=scale["batch"],
                                  workers=scale["workers"], warmup=1, repeats=2)
        rows = bench_loader(args, device)
    return {"patch_side": scale["size"], "patches": scale["loader_patches"],
            "rows": [{k: r[k] for k in ("impl", "workers", "samples_per_s", "cache_build_s")} for r in rows]}


def part_gpu_check(scale: dict[str, Any], device: torch.device) -> dict[str, Any] | None:
    """``tools/gpu_check.py`` in bf16 and in fp32 (None on the CPU: it checks CUDA code paths)."""
    if device.type != "cuda":
        return None
    from tools import gpu_check

    for amp in ("bf16", "off"):
        gpu_check.main(["--amp", amp])
    return {"passed": True, "amp": ["bf16", "off"], "gpus": torch.cuda.device_count()}


def run_part(name: str, scale: dict[str, Any], device: torch.device) -> Any:
    """The value of one part (in the process that measures it)."""
    if name.startswith("variant:"):
        _, stage, setting = name.split(":")
        if SETTINGS[setting]["compile"] and device.type != "cuda":
            # Compiling for the CPU takes minutes; tests/test_compile.py checks --compile on the CPU instead.
            raise UserError("the torch.compile variants are measured on a GPU only")
        return part_variant(stage, setting, scale, device)
    parts: dict[str, Callable[[dict[str, Any], torch.device], Any]] = {
        "gpu_check": part_gpu_check, "passes": part_passes, "loader": part_loader}
    return parts[name](scale, device)


# ---------------------------------------------------------------------------------------------- the report
def _child(name: str, args: argparse.Namespace, cap_s: float, folder: Path) -> dict[str, Any]:
    """Run one part in a process of its own under ``cap_s`` seconds: {"value": ...} or {"error": line}."""
    out = folder / f"{name.replace(':', '_')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--device", args.device,
           "--part-out", str(out), *(["--tiny"] if args.tiny else [])]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=cap_s)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped at its time cap of {cap_s:.0f} s", "seconds": cap_s}
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}", "seconds": seconds}
    return {"value": json.loads(out.read_text()), "seconds": seconds}


def _here(name: str, scale: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Run one part in this process: {"value": ...} or {"error": line}, like :func:`_child`."""
    start = time.perf_counter()
    try:
        value = run_part(name, scale, device)
    except Exception as err:  # the report records any failure of a part and goes on with the next one
        lines = str(err).strip().splitlines()
        return {"error": f"{type(err).__name__}: {lines[-1] if lines else ''}", "seconds": time.perf_counter() - start}
    return {"value": value, "seconds": time.perf_counter() - start}


def project_pipeline(variants: list[dict[str, Any]], passes: dict[str, Any] | None,
                     scale: dict[str, Any]) -> dict[str, Any] | None:
    """Seconds of the paper schedule (steps 0-3, refreshes and evaluations) for one pair, from the fastest
    measured setting of steps 1 and 2. Step 0 is counted at step 1's time per iteration (it skips the
    target half, so this overestimates), step 3 at step 2's (a teacher and a student pass per view)."""
    best = {}
    for v in variants:
        if v["stage"] not in best or v["s_per_iter"] < best[v["stage"]]["s_per_iter"]:
            best[v["stage"]] = v
    if "step1" not in best or "step2" not in best or passes is None:
        return None
    like = {"step0": "step1", "step1": "step1", "step2": "step2", "step3": "step2"}
    stages = {}
    for stage, measured in like.items():
        role = STAGES[stage].epoch_role
        iters = scale[role] // scale["batch"]
        epochs = STAGES[stage].defaults["epochs"]
        per_epoch = iters * best[measured]["s_per_iter"] + passes["refresh_s"] + passes["eval_s"]
        stages[stage] = {"epochs": epochs, "iters_per_epoch": iters, "s_per_iter": best[measured]["s_per_iter"],
                         "setting": best[measured]["setting"], "seconds": epochs * per_epoch}
    return {"seconds": sum(s["seconds"] for s in stages.values()), "stages": stages}


def build_report(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every part in its own process, in order, within the time budget; the report's JSON object."""
    scale = SCALES["tiny" if args.tiny else "paper"]
    deadline = time.perf_counter() + args.budget_s
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="napg-gpu-report-parts-") as tmp:
        for name, cap_s in PARTS:
            left = deadline - time.perf_counter()
            if left < 5:
                results[name] = {"error": f"not run: the {args.budget_s:.0f} s budget was spent"}
            elif device.type == "cuda":
                results[name] = _child(name, args, min(cap_s, left), Path(tmp))
            else:
                results[name] = _here(name, scale, device)
            print(f"{name}: {results[name].get('error') or 'ok'} ({results[name].get('seconds', 0):.0f} s)",
                  file=sys.stderr, flush=True)

    def value(name: str) -> Any:
        return results[name].get("value")

    variants = []
    for name, _ in PARTS:
        if name.startswith("variant:"):
            _, stage, setting = name.split(":")
            row = value(name) or {"stage": stage, "setting": setting, "images_per_s": None, "s_per_iter": None,
                                  "data_fraction": None, "peak_mem_mib": None, "gflop_per_image": None,
                                  "peak_fraction": None}
            variants.append({**row, "error": results[name].get("error")})
    passes = value("passes")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    measured = [v for v in variants if v["s_per_iter"] is not None]
    projection = project_pipeline(measured, passes, scale)
    return {
        "device": {"type": device.type, "name": name, "count": torch.cuda.device_count() if device.type == "cuda"
                   else None, "peak_bf16_tflops": peak_tflops(name) if device.type == "cuda" else None,
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        "scale": {k: scale[k] for k in ("backbone", "size", "batch", "source", "target")},
        "gpu_check": value("gpu_check") if results["gpu_check"].get("error") is None
        else {"passed": False, "error": results["gpu_check"]["error"]},
        "variants": variants,
        "refresh_s": None if passes is None else passes["refresh_s"],
        "eval_s": None if passes is None else passes["eval_s"],
        "loader": value("loader"),
        "projected_pipeline_s": None if projection is None else projection["seconds"],
        "projection": projection,
        "errors": {k: r["error"] for k, r in results.items() if r.get("error")},
        "part_seconds": {k: r.get("seconds") for k, r in results.items()},
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: device, one row per training variant, then the passes, loader and projection."""
    dev, check = report["device"], report["gpu_check"]
    check_line = "not run (CPU)" if check is None else "passed" if check.get("passed") else f"FAILED: {check['error']}"
    lines = [f"**Device:** {dev['name']} (torch {dev['torch']}, {dev['date']}); dense bf16 peak "
             f"{_fmt(dev['peak_bf16_tflops'], 0)} TFLOP/s. **gpu-check:** {check_line}.", "",
             "| stage | setting | images/s | s/iter | data wait | peak MiB | GFLOP/image | of bf16 peak |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for v in report["variants"]:
        if v["error"]:
            lines.append(f"| {v['stage']} | {v['setting']} | failed: {v['error']} | | | | | |")
            continue
        fraction = None if v["peak_fraction"] is None else f"{100 * v['peak_fraction']:.1f} %"
        lines.append(f"| {v['stage']} | {v['setting']} | {_fmt(v['images_per_s'], 1)} | {_fmt(v['s_per_iter'], 3)} "
                     f"| {100 * v['data_fraction']:.1f} % | {_fmt(v['peak_mem_mib'], 0)} | "
                     f"{_fmt(v['gflop_per_image'], 1)} | {_fmt(fraction)} |")
    scale = report["scale"]
    lines += ["", f"Refresh pass ({scale['source']} source + {scale['target']} target patches of {scale['size']}²): "
              f"{_fmt(report['refresh_s'])} s; evaluation pass ({scale['target']} patches): "
              f"{_fmt(report['eval_s'])} s."]
    if report["loader"]:
        rows = ", ".join(f"{r['impl']} {r['workers']} workers {r['samples_per_s']:.0f}/s"
                         for r in report["loader"]["rows"])
        lines.append(f"Loader ({report['loader']['patch_side']}² patches, samples/s): {rows}.")
    if report["projected_pipeline_s"] is not None:
        minutes = report["projected_pipeline_s"] / 60
        lines.append(f"Projected paper schedule, steps 0-3 for one pair: {minutes:.1f} min.")
    for name, error in report["errors"].items():
        if not name.startswith("variant:"):
            lines.append(f"{name} failed: {error}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="CI sizes: ResNet-18, 64², a few patches")
    parser.add_argument("--out", type=Path, default=Path("gpu-report"), help="folder for the JSON and Markdown")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: measure one part in this process
    parser.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device visible; run on a GPU machine, or pass --device cpu (with --tiny for a "
                        "quick check)")
    device = torch.device(args.device)
    if args.part is not None:
        value = run_part(args.part, SCALES["tiny" if args.tiny else "paper"], device)
        args.part_out.write_text(json.dumps(value))
        return 0
    report = build_report(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "gpu_report.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
