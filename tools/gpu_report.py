"""One prepared GPU report: device, correctness, training throughput, refresh/evaluation, loaders, projection.

    make gpu-report      (or: python3 tools/gpu_report.py [--device cuda|cpu] [--tiny] [--out DIR] [--parts ...])

Meant for a short GPU reservation on a bare machine: it imports only what such a machine's ``python3`` has
(``utils/gpu_machine.py``: PyTorch, torchvision, NumPy, OpenCV, Pillow, scikit-learn, tqdm, TensorBoard,
PyYAML), needs no network and no install, and writes ``DIR/gpu_report.json`` and ``DIR/gpu_report.md``
(default ``gpu-report/``) after every part, each part's value under ``DIR/parts/`` and its full output
under ``DIR/logs/``, so a reservation that ends mid-way keeps the parts done so far. The parts, in order
(the figures the goals need first):

- ``device``: name, the peak-table key it matched and its dense bf16 and TF32 peaks, SM count, memory,
  CUDA, cuDNN and driver versions, the packages' versions, and whether ``torch.compile`` can build
  (Triton compiles a C helper at run time: a C compiler and ``Python.h``);
- ``gpu_check:bf16`` and, later, ``gpu_check:fp32``: ``tools/gpu_check.py`` (every stage, finite losses;
  torchrun with 2+ GPUs) on one shared data set, each stage under its own time limit, recorded as it ends;
- ``variant:STAGE:SETTING``: training at the paper's setting (ResNet-50, 512², 10 images per domain, the
  stage's K) on in-memory batches in training's format (pinned uint8), cuDNN autotuning on as in
  training: images/s (source + target), s/iteration, warm-up seconds (autotuning; with torch.compile
  the cold Inductor/Triton compile, also ``compile_s``), peak memory, counted network GFLOP per image
  (forward + backward, ``torch.utils.flop_counter``) and the fraction of the device's dense peak that
  reaches (bf16 rows against the bf16 peak, fp32 rows against the TF32 one: cuDNN runs fp32
  convolutions on TF32 tensor cores by default);
- ``passes``: one refresh pass at the paper's data size (3,456 source + 344 target patches) and the
  evaluation's seconds per patch (the projection scales it to both validation splits, 398 + 2,016);
- ``loader_vs_gpu``: step 2 (bf16, channels-last) reading 512² PNG files through the real loaders and
  transforms with 8 workers: its data-wait fraction against the GPU's rate;
- ``loader``: samples/s of 512² PNG patches and of their uint8 cache, with 0 and 8 workers;
- and from them ``projected_pipeline_s``: the paper schedule (steps 0-3) for one pair.

On a GPU every part runs as a process group of its own under a time cap (killed as a group when it
overruns), and the caps fit ``--budget-s`` (counted from this command's start): a part that fails,
hangs or kills its process (a device assert) is recorded with its one-line error and the others still
run; a variant keeps what it measured before it was stopped (``compile_s`` after warm-up).
``gpu_report.json`` says for each part what could not be measured and why (``not_measured``), and the
first line of ``gpu_report.md`` whether every part ran. On the CPU the parts run in this process (a
failure is recorded alike), which saves a start-up per part. ``--tiny`` shrinks every size (ResNet-18,
64², a few patches; fp32 for ``passes`` and ``loader_vs_gpu``) so that ``--device cpu --tiny``
runs end to end, as CI does; fields that only a GPU measures are null on the CPU.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts this command's own start-up (importing torch) too

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.isprs import POTSDAM, VAIHINGEN
from engine.benchmarking import (
    bench_loader,
    peak_memory_mb,
    random_data,
    refresh_once,
    set_up_device,
    stage_config,
    sync,
)
from utils.checkpoint import atomic_write_bytes
from utils.config import Config
from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.gpu_machine import GPU_MACHINE_PACKAGES
from utils.paths import check_output_files, check_output_folder
from utils.process import run_group
from utils.run import seed_everything, write_json
from utils.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
# Dense tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity): (bf16, TF32), by the part of
# the device's name that torch reports ("NVIDIA H100 80GB HBM3" is the SXM board, "NVIDIA H200" the SXM
# H200). A key matches as a whole word (GH200 is not H200, L40S not L40, A10G not A10); the longest wins.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H100": (989.4, 494.7), "H100 PCIe": (756.0, 378.0), "H100 NVL": (835.5, 417.5),
    "H200": (989.4, 494.7), "H200 NVL": (835.5, 417.5), "GH200": (989.4, 494.7),
    "A100": (312.0, 156.0),  # 40 and 80 GB, SXM and PCIe alike
    "L40S": (362.1, 183.0), "L40": (181.0, 90.5), "L4": (121.0, 60.0), "A10": (125.0, 62.5),
    "RTX A6000": (154.8, 77.4), "RTX 4090": (165.2, 82.6), "RTX 3090": (71.0, 35.6),
}  # fmt: skip
# A training setting: stage_config's precision, memory format and compile flags.
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"amp": "off", "channels_last": False, "compile": False},
    "bf16-cl": {"amp": "bf16", "channels_last": True, "compile": False},
    "bf16-cl-compile": {"amp": "bf16", "channels_last": True, "compile": True},
}


@dataclass(frozen=True)
class Scale:
    """The sizes of a report: the paper's, or CI's."""

    backbone: str
    size: int  # patch side
    batch: int  # images per domain and per evaluation batch
    warmup: int  # untimed iterations before the timed ones
    repeats: int  # timed iterations
    loader_warmup: int  # untimed iterations of loader_vs_gpu: long enough to drain the loaders' prefetch
    loader_repeats: int
    source_train: int  # patches (the paper pair: Potsdam -> Vaihingen)
    target_train: int
    source_val: int
    target_val: int
    loader_patches: int
    workers: int
    stage_timeout_s: int  # of each gpu_check stage
    # The setting of ``passes`` and ``loader_vs_gpu``: training's bf16 on a GPU; fp32 in CI, whose CPU
    # emulates bf16 several times slower and whose figures are not the point.
    pass_setting: str


SCALES = {
    "paper": Scale(backbone="resnet50", size=512, batch=10, warmup=3, repeats=10, loader_warmup=20, loader_repeats=30,
                   source_train=POTSDAM.mmseg_counts["train"], target_train=VAIHINGEN.mmseg_counts["train"],
                   source_val=POTSDAM.mmseg_counts["val"], target_val=VAIHINGEN.mmseg_counts["val"],
                   loader_patches=160, workers=8, stage_timeout_s=35, pass_setting="bf16-cl"),
    "tiny": Scale(backbone="resnet18", size=64, batch=2, warmup=1, repeats=1, loader_warmup=1, loader_repeats=2,
                  source_train=8, target_train=4, source_val=4, target_val=4, loader_patches=8, workers=2,
                  stage_timeout_s=35, pass_setting="fp32"),
}


@dataclass(frozen=True)
class Part:
    """One measurement: its name, its time cap on a GPU (start-up included) and, for a part that only a GPU
    runs, why."""

    name: str
    cap_s: int
    gpu_only: str | None = None


# In the order they run: the figures the goals need first. Cold process start-up, CUDA start-up and
# cuDNN autotuning are inside each cap; the compile variant's cap holds a cold Inductor/Triton compile of
# the network's forward and backward once per domain (each has its own BatchNorm statistics; the refresh
# and evaluation run the bare network).
PARTS: tuple[Part, ...] = (
    Part("device", 25),
    Part("gpu_check:bf16", 85, gpu_only="it checks the CUDA code paths"),
    Part("variant:step2:bf16-cl", 40),
    Part("variant:step2:bf16-cl-compile", 140, gpu_only="compiling for the CPU takes minutes; tests/test_compile.py "
         "checks --compile on the CPU"),
    Part("passes", 40),
    Part("loader_vs_gpu", 50),
    Part("variant:step1:bf16-cl", 35),
    Part("gpu_check:fp32", 70, gpu_only="it checks the CUDA code paths"),
    Part("variant:step2:fp32", 40),
    Part("loader", 25),
)
PART_NAMES = tuple(p.name for p in PARTS)
GPU_CHECK_AMP = {"gpu_check:bf16": "bf16", "gpu_check:fp32": "off"}
# All parts at their caps, and this command's start-up, inside the 10-minute command of a reservation.
DEFAULT_BUDGET_S = 560
MIN_PART_S = 10  # a part with less time left is not started
WAITING = {"pending": "not reached: the report is still running, or was stopped before it",
           "running": "the report is running it, or was stopped while it ran"}
VARIANT_KEYS = ("stage", "setting", "images_per_s", "s_per_iter", "warmup_s", "compile_s", "peak_mem_mib",
                "gflop_per_image", "peak_kind", "peak_fraction")


def peak_tflops(device_name: str) -> tuple[str, dict[str, float]] | None:
    """(the table's key, {"bf16": TFLOP/s, "tf32": TFLOP/s}) of a device by its name; None when unknown."""
    found = [key for key in PEAK_TFLOPS
             if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE)]
    if not found:
        return None
    key = max(found, key=len)
    return key, dict(zip(("bf16", "tf32"), PEAK_TFLOPS[key]))


def compile_blocker() -> str | None:
    """Why ``torch.compile`` cannot build kernels on this machine (None when nothing is missing)."""
    if not any(_installed(name) for name in ("triton", "pytorch-triton")):  # release and nightly wheels
        return "torch.compile needs Triton on a GPU, and it is not installed"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "Triton compiles a C helper at run time and no C compiler (gcc, clang or $CC) was found"
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.is_file():
        return f"Triton compiles a C helper at run time and needs {include} (the Python development headers)"
    return None


def _installed(distribution: str) -> bool:
    """Whether a package is installed, by its metadata (without importing it)."""
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- parts
def part_device(device: torch.device) -> dict[str, Any]:
    """What the machine is: device facts, versions, packages, and whether torch.compile can build."""
    packages, missing = {}, []
    for name in GPU_MACHINE_PACKAGES:
        try:
            packages[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            missing.append(GPU_MACHINE_PACKAGES[name])
    facts: dict[str, Any] = {
        "type": device.type, "name": "cpu", "count": None, "peak_key": None, "peak_tflops": None,
        "sm_count": None, "memory_gib": None, "capability": None, "cuda": torch.version.cuda, "cudnn": None,
        "driver": None, "tf32_convs": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "torch": torch.__version__,
        "python": platform.python_version(), "packages": packages, "missing_packages": missing,
        "matplotlib": _importable("matplotlib"), "cpu_count": _cpu_count(), "compile_blocker": compile_blocker(),
        # DataLoader workers hand batches over in shared memory: a container's small /dev/shm fails them.
        "shm_gib": shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").is_dir() else None,
        "date": time.strftime("%Y-%m-%d"),
        "unmeasured": "no GPU: its name, SM count, memory, cuDNN and driver versions and peaks are null",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        matched = peak_tflops(props.name)
        facts.update(name=props.name, count=torch.cuda.device_count(), sm_count=props.multi_processor_count,
                     memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                     cudnn=torch.backends.cudnn.version(), driver=_driver_version(),
                     peak_key=None if matched is None else matched[0],
                     peak_tflops=None if matched is None else matched[1],
                     unmeasured=None if matched else f"{props.name} is not in the peak table: no peak fractions")
    return facts


def _cpu_count() -> int | None:
    """The CPUs this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


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


def _timed_iterations(step: Callable[[], float], device: torch.device, count: int) -> tuple[float, float]:
    """(seconds, seconds waiting for data) of ``count`` iterations back to back, as training runs them (the
    host runs ahead of the device; the synchronisation closes the window)."""
    sync(device)
    start, data_s = time.perf_counter(), 0.0
    for _ in range(count):
        data_s += step()
    sync(device)
    return time.perf_counter() - start, data_s


def part_variant(stage: str, setting: str, scale: Scale, device: torch.device,
                 keep: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Training throughput of ``stage`` under ``setting`` on in-memory batches; ``keep`` gets what is measured
    so far after the warm-up and after the timed iterations."""
    from engine.build import build_method
    from engine.trainer import train_iteration

    compiled = SETTINGS[setting]["compile"]
    blocker = compile_blocker() if compiled else None
    if blocker:
        raise UserError(blocker)
    cfg = stage_config(stage, size=scale.size, batch=scale.batch, backbone=scale.backbone, device=device.type,
                       **SETTINGS[setting])
    seed_everything(cfg.seed)
    set_up_device(cfg, device)
    data = random_data(cfg, device, batches=1)
    napg = build_method(cfg, device)
    epoch = cfg.steady_epoch()
    tau = cfg.tau_at(epoch)
    row: dict[str, Any] = dict.fromkeys(VARIANT_KEYS)
    # fp32 convolutions run on TF32 tensor cores when cuDNN may use them (torch's default); the table has
    # no peak for plain fp32.
    kind = "bf16" if cfg.amp == "bf16" else "tf32" if torch.backends.cudnn.allow_tf32 else None
    row.update(stage=stage, setting=setting, peak_kind=kind)
    # Untimed: the starting prototypes (a one-batch refresh) and the warm-up iterations, where cuDNN
    # autotunes every shape and torch.compile compiles every graph (both domains' BatchNorm).
    sync(device)
    start = time.perf_counter()
    if compiled:
        _compile_smoke(device)
    protos = refresh_once(napg, data, cfg, tau, device, max_batches=1)

    def step() -> float:
        return train_iteration(napg, data, protos, epoch)[1]

    _timed_iterations(step, device, scale.warmup)
    row["warmup_s"] = time.perf_counter() - start
    row["compile_s"] = row["warmup_s"] if compiled else None
    keep(row)
    seconds, _ = _timed_iterations(step, device, scale.repeats)
    images = cfg.batch_size * (2 if napg.uses_target else 1)
    row.update(s_per_iter=seconds / scale.repeats, images_per_s=images * scale.repeats / seconds,
               peak_mem_mib=peak_memory_mb(device)[0] if device.type == "cuda" else None)
    keep(row)
    row["gflop_per_image"] = gflop_per_image(cfg, device)
    matched = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if matched is not None and kind is not None:
        peak = matched[1][row["peak_kind"]]
        row["peak_fraction"] = row["gflop_per_image"] * 1e9 * row["images_per_s"] / (peak * 1e12)
    row["unmeasured"] = ("peak memory and the fraction of the peak: GPU only" if device.type != "cuda" else
                         "the fraction of the peak: the device is not in the peak table" if matched is None else
                         "the fraction of the peak: cuDNN may not use TF32, and plain fp32 has no peak in the table"
                         if kind is None else None)
    return row


def _compile_smoke(device: torch.device) -> None:
    """A one-line kernel through torch.compile first: Triton builds its C helper and finds the CUDA driver
    library here, so a missing piece fails in seconds with its own message, not minutes into ResNet-50."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(8, device=device))
        sync(device)
    except Exception as err:  # any failure of the toolchain: the variant cannot be measured
        line = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise UserError(f"torch.compile cannot build a kernel here: {line}") from None


def part_passes(scale: Scale, device: torch.device) -> dict[str, Any]:
    """One step-2 refresh pass at the paper's data size and the evaluation's seconds per patch."""
    from engine.build import build_method
    from engine.evaluate import evaluate

    cfg = stage_config("step2", size=scale.size, batch=scale.batch, backbone=scale.backbone, device=device.type,
                       **SETTINGS[scale.pass_setting])
    seed_everything(cfg.seed)
    set_up_device(cfg, device)
    one = random_data(cfg, device, batches=1)
    # The same full batch over and over: a pass's time depends on its size, not on its pixels, and every
    # batch has the shape that the warm-up autotuned.
    batches = {role: math.ceil(count / scale.batch) for role, count in
               (("source_refresh", scale.source_train), ("target_refresh", scale.target_train),
                ("target_val", scale.target_val))}
    data = {role: one[role] * n for role, n in batches.items()}
    napg = build_method(cfg, device)
    tau = cfg.tau_at(cfg.steady_epoch())
    protos = refresh_once(napg, data, cfg, tau, device, max_batches=1)  # warm-up
    evaluate(napg.model, one["target_val"], protos.source_target, device, cfg.num_classes, amp=cfg.amp)
    sync(device)
    start = time.perf_counter()
    protos = refresh_once(napg, data, cfg, tau, device, previous=protos)
    sync(device)
    refresh_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(napg.model, data["target_val"], protos.source_target, device, cfg.num_classes, amp=cfg.amp)
    sync(device)
    eval_s = time.perf_counter() - start
    patches = batches["target_val"] * scale.batch
    return {"refresh_s": refresh_s, "refresh_patches": (batches["source_refresh"] + batches["target_refresh"])
            * scale.batch, "eval_s": eval_s, "eval_patches": patches, "eval_s_per_patch": eval_s / patches}


def write_png_domain(folder: Path, *, side: int, counts: dict[str, int], unique: int, seed: int = 0) -> None:
    """A prepared domain folder of ``counts[split]`` random ``side``² PNG patches with train-id labels;
    ``unique`` distinct files per split, the others hard links to them (decoding cost is per file read,
    and the page cache holds a real training set too)."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for sub in ("img_dir", "ann_dir"):
            (folder / sub / split).mkdir(parents=True)
        for i in range(count):
            names = [folder / sub / split / f"p{i:04d}.png" for sub in ("img_dir", "ann_dir")]
            if i < unique:
                # Smooth content, as aerial patches: random noise would not compress and would decode slower.
                small = rng.integers(0, 256, (max(side // 16, 2), max(side // 16, 2), 3), dtype=np.uint8)
                image = cv2.resize(small, (side, side), interpolation=cv2.INTER_LINEAR)
                cv2.imwrite(str(names[0]), image)
                cv2.imwrite(str(names[1]), image[..., 0] % 6)
            else:
                for name in names:
                    os.link(name.with_name(f"p{i % unique:04d}.png"), name)
    (folder / "meta.json").write_text(json.dumps({"label_format": "train_ids"}))


def part_loader_vs_gpu(scale: Scale, device: torch.device) -> dict[str, Any]:
    """Step 2 (``pass_setting``) fed from PNG files by the real loaders, transforms and workers: the
    fraction of each iteration spent waiting for data once the loaders' first prefetch is used up."""
    iterations = scale.loader_warmup + scale.loader_repeats
    with tempfile.TemporaryDirectory(prefix="napg-gpu-report-") as tmp:
        root = Path(tmp)
        # One pass holds every iteration: the window never waits at a pass boundary (a real pass has 345).
        train = (iterations + 1) * scale.batch
        for name in ("source", "target"):
            write_png_domain(root / name, side=scale.size, counts={"train": train, "val": scale.batch},
                             unique=min(train, 20))
        # The loaders and their workers end with the call, before their files are removed.
        return _fed_from_files(root, scale, device)


def _fed_from_files(root: Path, scale: Scale, device: torch.device) -> dict[str, Any]:
    from engine.build import build_data, build_method
    from engine.trainer import train_iteration

    cfg = stage_config("step2", size=scale.size, batch=scale.batch, backbone=scale.backbone, device=device.type,
                       workers=scale.workers, data_root=root, source=str(root / "source"),
                       target=str(root / "target"), **SETTINGS[scale.pass_setting])
    seed_everything(cfg.seed)
    set_up_device(cfg, device)
    data = build_data(cfg, device)
    napg = build_method(cfg, device)
    epoch = cfg.steady_epoch()
    tau = cfg.tau_at(epoch)
    protos = refresh_once(napg, data, cfg, tau, device, max_batches=1)

    def step() -> float:
        return train_iteration(napg, data, protos, epoch)[1]

    _timed_iterations(step, device, scale.loader_warmup)
    seconds, data_s = _timed_iterations(step, device, scale.loader_repeats)
    images = cfg.batch_size * 2
    return {"stage": "step2", "setting": scale.pass_setting, "workers": cfg.num_workers, "patch_side": scale.size,
            "cpu_count": _cpu_count(), "images_per_s": images * scale.loader_repeats / seconds,
            "s_per_iter": seconds / scale.loader_repeats, "data_fraction": data_s / seconds}


def part_loader(scale: Scale) -> dict[str, Any]:
    """Samples/s of random PNG patches of the run's size (and of their uint8 cache) through a DataLoader."""
    with tempfile.TemporaryDirectory(prefix="napg-gpu-report-") as tmp:
        domain = Path(tmp) / "patches"
        write_png_domain(domain, side=scale.size, counts={"train": scale.loader_patches}, unique=scale.loader_patches)
        rows = bench_loader(domain, split="train", batch=scale.batch, workers=scale.workers, warmup=1, repeats=2)
    return {"patch_side": scale.size, "patches": scale.loader_patches,
            "rows": [{k: r[k] for k in ("impl", "workers", "samples_per_s", "cache_build_s")} for r in rows]}


def run_part(name: str, scale: Scale, device: torch.device, out: Path) -> None:
    """Measure one part in this process and write its value to ``out`` (a variant also writes what it has
    measured so far, so a part stopped at its cap keeps it)."""
    def keep(value: dict[str, Any]) -> None:
        write_json(out, value)

    if name.startswith("variant:"):
        _, stage, setting = name.split(":")
        value = part_variant(stage, setting, scale, device, keep)
    elif name == "device":
        value = part_device(device)
    elif name == "passes":
        value = part_passes(scale, device)
    elif name == "loader_vs_gpu":
        value = part_loader_vs_gpu(scale, device)
    elif name == "loader":
        value = part_loader(scale)
    else:
        raise UserError(f"{name} is not a part that this tool measures in-process")
    keep(value)


# ---------------------------------------------------------------------------------------------- running them
@dataclass(frozen=True)
class Report:
    """Where and how a report runs."""

    device: torch.device
    isolated: bool  # each part in a process group of its own under its cap (on a GPU); else in this process
    tiny: bool
    out: Path
    work: Path  # gpu_check's data and runs: large, so outside ``out``
    deadline: float  # time.monotonic() at which the budget is spent
    budget_s: float

    @property
    def scale(self) -> Scale:
        return SCALES["tiny" if self.tiny else "paper"]

    def part_file(self, name: str) -> Path:
        return self.out / "parts" / f"{name.replace(':', '_')}.json"

    def log_file(self, name: str) -> Path:
        return self.out / "logs" / f"{name.replace(':', '_')}.log"


def measure(part: Part, report: Report) -> dict[str, Any]:
    """Run one part: {"status": ok|failed|skipped|not run, "seconds", "reason", "value"}."""
    left = report.deadline - time.monotonic()
    if report.device.type != "cuda" and part.gpu_only:
        return {"status": "skipped", "reason": f"needs a GPU: {part.gpu_only}"}
    if left < MIN_PART_S:
        return {"status": "not run", "reason": f"the {report.budget_s:.0f} s budget was spent"}
    out, log = report.part_file(part.name), report.log_file(part.name)
    out.unlink(missing_ok=True)
    if report.isolated:
        cap = min(part.cap_s, left)
        run = run_group(_command(part.name, report, out, log), timeout_s=cap, log=log, cwd=REPO)
        seconds = run.seconds
        reason = (f"stopped at its cap of {cap:.0f} s" if run.timed_out else None if run.returncode == 0 else
                  f"killed by {signal.Signals(-run.returncode).name}" if run.returncode < 0 else
                  _last_line(log) or f"exit code {run.returncode}")
    else:
        start = time.perf_counter()
        reason = None
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            try:
                run_part(part.name, report.scale, report.device, out)
            except Exception as err:  # the report records any failure of a part and goes on with the next one
                lines = str(err).strip().splitlines()
                reason = f"{type(err).__name__}: {lines[-1] if lines else ''}"
                print(reason, file=stream)
        seconds = time.perf_counter() - start
    value = json.loads(out.read_text()) if out.is_file() else None
    if reason is None and value is None:
        reason = "it wrote no result"
    return {"status": "failed" if reason else "ok", "seconds": seconds, "reason": reason, "value": value}


def _command(name: str, report: Report, out: Path, log: Path) -> list[str]:
    """The command line of a part's own process: gpu_check's, or this tool's for one part."""
    if name in GPU_CHECK_AMP:
        return [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--amp", GPU_CHECK_AMP[name],
                "--work-dir", str(report.work / "gpu_check"), "--record", str(out),
                "--log-dir", str(log.with_suffix("")), "--stage-timeout-s", str(report.scale.stage_timeout_s)]
    return [sys.executable, str(Path(__file__).resolve()), "--part", name, "--device", report.device.type,
            "--part-out", str(out), *(["--tiny"] if report.tiny else [])]


def _last_line(log: Path) -> str:
    """The last non-empty line of a log: a traceback's exception or a tool's one-line error."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_report(report: Report, parts: Sequence[Part]) -> dict[str, Any]:
    """Every part in order within the budget, the report rewritten before and after each; the report."""
    results: dict[str, dict[str, Any]] = {p.name: {"status": "pending"} for p in parts}
    try:
        for part in parts:
            results[part.name] = {"status": "running"}
            write_report(report, parts, results)
            results[part.name] = measure(part, report)
            result = results[part.name]
            print(f"{part.name}: {result['status']}{': ' + result['reason'] if result.get('reason') else ''} "
                  f"({result.get('seconds') or 0:.0f} s)", file=sys.stderr, flush=True)
            write_report(report, parts, results)
    finally:
        for result in results.values():  # the part that a signal or an error stopped
            if result["status"] == "running":
                result.update(status="failed", reason="the report was stopped while it ran")
        shutil.rmtree(report.work, ignore_errors=True)
        data = write_report(report, parts, results)
    return data


def write_report(report: Report, parts: Sequence[Part], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``gpu_report.json`` and ``gpu_report.md`` from the parts so far; returns the JSON object."""
    data = assemble(report, parts, results)
    write_json(report.out / "gpu_report.json", data)
    atomic_write_bytes(report.out / "gpu_report.md", markdown(data).encode())
    return data


def assemble(report: Report, parts: Sequence[Part], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's JSON object from the parts' results."""
    def value(name: str) -> Any:
        return results.get(name, {}).get("value")

    not_measured = {}
    for part in parts:
        result = results[part.name]
        if result["status"] != "ok":
            not_measured[part.name] = f"{result['status']}: {result.get('reason') or WAITING[result['status']]}"
        elif (result["value"] or {}).get("unmeasured"):
            not_measured[part.name] = result["value"]["unmeasured"]
    variants = []
    for part in parts:
        if part.name.startswith("variant:"):
            _, stage, setting = part.name.split(":")
            row = {**dict.fromkeys(VARIANT_KEYS), "stage": stage, "setting": setting, **(value(part.name) or {})}
            row.pop("unmeasured", None)
            variants.append({**row, "error": None if results[part.name]["status"] == "ok"
                             else not_measured[part.name]})
    passes = value("passes")
    projection = project_pipeline([v for v in variants if v["s_per_iter"] is not None], passes, report.scale)
    device = {k: v for k, v in (value("device") or {"type": report.device.type}).items() if k != "unmeasured"}
    return {
        "complete": all(r["status"] == "ok" for r in results.values()),
        "parts": {p.name: {"status": results[p.name]["status"], "seconds": results[p.name].get("seconds"),
                           "cap_s": p.cap_s if report.isolated else None,
                           "log": str(report.log_file(p.name).relative_to(report.out))
                           if report.log_file(p.name).is_file() else None} for p in parts},
        "not_measured": not_measured,
        "device": device,
        "scale": asdict(report.scale),
        "budget_s": report.budget_s,
        "gpu_check": {amp: value(name) for name, amp in (("gpu_check:bf16", "bf16"), ("gpu_check:fp32", "fp32"))
                      if name in results},
        "variants": variants,
        "passes": passes,
        "loader_vs_gpu": value("loader_vs_gpu"),
        "loader": value("loader"),
        "projected_pipeline_s": None if projection is None else projection["seconds"],
        "projection": projection,
    }


def project_pipeline(variants: list[dict[str, Any]], passes: dict[str, Any] | None,
                     scale: Scale) -> dict[str, Any] | None:
    """Seconds of the paper schedule (steps 0-3, refreshes and evaluations) for one pair, from the fastest
    measured setting of steps 1 and 2. Step 0 is counted at step 1's time per iteration (it skips the
    target half, so this overestimates), step 3 at step 2's (a teacher and a student pass per view). Each
    epoch refreshes once and evaluates target val and source val; the end of a stage evaluates once more."""
    best: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v["stage"] not in best or v["s_per_iter"] < best[v["stage"]]["s_per_iter"]:
            best[v["stage"]] = v
    if "step1" not in best or "step2" not in best or passes is None:
        return None
    eval_s = passes["eval_s_per_patch"] * (scale.target_val + scale.source_val)
    counts = {"source": scale.source_train, "target": scale.target_train}
    like = {"step0": "step1", "step1": "step1", "step2": "step2", "step3": "step2"}
    stages = {}
    for stage, measured in like.items():
        iters = counts[STAGES[stage].epoch_role] // scale.batch
        epochs = STAGES[stage].defaults["epochs"]
        s_per_iter = best[measured]["s_per_iter"]
        seconds = epochs * (iters * s_per_iter + passes["refresh_s"] + eval_s) + eval_s
        stages[stage] = {"epochs": epochs, "iters_per_epoch": iters, "s_per_iter": s_per_iter,
                         "setting": best[measured]["setting"], "eval_s_per_epoch": eval_s, "seconds": seconds}
    return {"seconds": sum(s["seconds"] for s in stages.values()), "stages": stages}


# ---------------------------------------------------------------------------------------------- Markdown
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: whether every part ran, the device, the checks, one row per training
    variant, the loaders, the passes, the projection and what was not measured."""
    parts = report["parts"]
    done = sum(p["status"] == "ok" for p in parts.values())
    first = ("**Every part ran.**" if report["complete"] else
             f"**Not every part ran:** {done} of {len(parts)} measured; see *Not measured* at the end.")
    dev = report["device"]
    peak = dev.get("peak_tflops") or {}
    lines = [first, "",
             f"**Device:** {dev.get('name', '-')} ({dev.get('count') or '-'} visible; peak-table key "
             f"{_fmt(dev.get('peak_key'))}: dense bf16 {_fmt(peak.get('bf16'), 0)}, TF32 {_fmt(peak.get('tf32'), 0)} "
             f"TFLOP/s; {_fmt(dev.get('sm_count'))} SMs, {_fmt(dev.get('memory_gib'), 0)} GiB; CUDA "
             f"{_fmt(dev.get('cuda'))}, cuDNN {_fmt(dev.get('cudnn'))}, driver {_fmt(dev.get('driver'))}; torch "
             f"{_fmt(dev.get('torch'))}; {_fmt(dev.get('date'))})."]
    for amp, check in report["gpu_check"].items():
        verdict = ("not run" if check is None else "passed" if check.get("passed") else
                   "FAILED" if check.get("passed") is False else "unfinished")
        stages = "" if check is None else ", ".join(f"{s['stage']} {s['chain']} {'ok' if s['ok'] else 'failed'} "
                                                    f"{s['seconds']:.0f} s" for s in check["stages"])
        lines.append(f"**gpu-check {amp}:** {verdict}{f' ({stages})' if stages else ''}.")
    lines += ["", "| stage | setting | images/s | s/iter | warm-up s | compile s | peak MiB | GFLOP/image "
              "| of dense peak |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in report["variants"]:
        if v["s_per_iter"] is None:
            lines.append(f"| {v['stage']} | {v['setting']} | {v['error']} | | {_fmt(v['warmup_s'], 1)} | "
                         f"{_fmt(v['compile_s'], 1)} | | | |")
            continue
        fraction = "-" if v["peak_fraction"] is None else f"{_percent(v['peak_fraction'])} of {v['peak_kind']}"
        lines.append(f"| {v['stage']} | {v['setting']} | {_fmt(v['images_per_s'], 1)} | {_fmt(v['s_per_iter'], 3)} "
                     f"| {_fmt(v['warmup_s'], 1)} | {_fmt(v['compile_s'], 1)} | {_fmt(v['peak_mem_mib'], 0)} | "
                     f"{_fmt(v['gflop_per_image'], 1)} | {fraction} |")
    lines.append("")
    fed = report["loader_vs_gpu"]
    if fed:
        lines.append(f"Step 2 ({fed['setting']}) fed from {fed['patch_side']}² PNG files by {fed['workers']} loader "
                     f"workers ({fed['cpu_count']} CPUs): {fed['images_per_s']:.1f} images/s, "
                     f"{fed['s_per_iter']:.3f} s/iter, data wait {_percent(fed['data_fraction'])}.")
    if report["loader"]:
        rows = ", ".join(f"{r['impl']} {r['workers']} workers {r['samples_per_s']:.0f}/s"
                         for r in report["loader"]["rows"])
        lines.append(f"Loader ({report['loader']['patch_side']}² patches, samples/s): {rows}.")
    passes, scale = report["passes"], report["scale"]
    if passes:
        lines.append(f"Refresh pass ({passes['refresh_patches']} patches of {scale['size']}²): "
                     f"{passes['refresh_s']:.2f} s; evaluation {1000 * passes['eval_s_per_patch']:.1f} ms per patch "
                     f"({scale['target_val']} target-val + {scale['source_val']} source-val patches per epoch).")
    if report["projected_pipeline_s"] is not None:
        minutes = report["projected_pipeline_s"] / 60
        lines.append(f"Projected paper schedule, steps 0-3 for one pair: {minutes:.1f} min.")
    if report["not_measured"]:
        lines += ["", "**Not measured:**"]
        lines += [f"- {name}: {why}" for name, why in report["not_measured"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device to measure")
    parser.add_argument("--tiny", action="store_true", help="CI sizes: ResNet-18, 64², a few patches")
    parser.add_argument("--out", type=Path, default=Path("gpu-report"), help="folder for the JSON and Markdown")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the whole command, its start-up included")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, default=list(PART_NAMES),
                        help="measure only these parts (in the usual order)")
    parser.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)  # internal: one part, this process
    parser.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = check_output_folder(args.out, "--out")
    check_output_files([out / "gpu_report.json", out / "gpu_report.md"], "--out")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device visible; run on a GPU machine, or pass --device cpu (with --tiny for a "
                        "quick check)")
    device = torch.device(args.device)
    if args.part is not None:
        run_part(args.part, SCALES["tiny" if args.tiny else "paper"], device, args.part_out)
        return 0
    # A SIGTERM (a reservation ending) unwinds like Ctrl-C: the running part's processes are killed and the
    # report says which part was stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.out.mkdir(parents=True, exist_ok=True)
    # Run as a script, the budget counts the imports above; called as a function, it starts now.
    started = STARTED if __name__ == "__main__" else time.monotonic()
    report = Report(device=device, isolated=device.type == "cuda", tiny=args.tiny, out=args.out,
                    work=Path(tempfile.mkdtemp(prefix="napg-gpu-report-work-")),
                    deadline=started + args.budget_s, budget_s=args.budget_s)
    data = run_report(report, [p for p in PARTS if p.name in args.parts])
    print(markdown(data), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
