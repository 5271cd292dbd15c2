"""What the measuring tools (``tools/benchmark.py``, ``tools/gpu_report.py``) share: a stage's config as
they run it, the device set up as training sets it up, in-memory batches in training's formats, timed
steps, peak memory and the loader's rate."""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from data.dataset import SegmentationFolder, finish_sample
from data.loaders import build_loader
from engine.build import build_transforms
from engine.config import resolve_config
from engine.device import set_cudnn_autotuning, unwrap
from engine.methods.base import Method
from engine.refresh import RefreshResult, RefreshSpec, refresh_prototypes
from utils.config import Config
from utils.stages import STAGES


def stage_config(stage: str, *, size: int, batch: int, backbone: str, device: str, amp: str = "off",
                 channels_last: bool = False, compile: bool = False, head_impl: str = "fast", workers: int = 0,
                 resize: int | None = None, cache: bool = False, data_root: Path | None = None,
                 source: str | None = None, target: str | None = None) -> Config:
    """The resolved config of ``stage`` with a training crop of ``size``, ``batch`` images per domain and
    per evaluation batch, and no progress bar (None leaves the config's default)."""
    return resolve_config(stage, overrides={
        "img_size": size, "resize": resize, "batch_size": batch, "eval_batch_size": batch, "num_workers": workers,
        "backbone": backbone, "head_impl": head_impl, "amp": amp, "channels_last": channels_last,
        "compile": compile, "cache": cache, "device": device, "source": source, "target": target,
        "progress": False, "data_root": None if data_root is None else str(data_root)})


def refresh_once(method: Method, data: dict[str, Any], cfg: Config, tau: float | None, device: torch.device,
                 previous: RefreshResult | None = None, max_batches: int | None = None) -> RefreshResult:
    """One prototype refresh over ``data``'s refresh roles with the network being trained, as the trainer runs
    it before an epoch (``max_batches`` overrides the config's cap)."""
    spec = RefreshSpec.from_config(cfg)
    if max_batches is not None:
        spec = dataclasses.replace(spec, max_batches=max_batches)
    return refresh_prototypes(unwrap(method.model), data["source_refresh"], data["target_refresh"], tau, spec,
                              device, previous=previous)


def set_up_device(cfg: Config, device: torch.device) -> None:
    """cuDNN autotuning as training sets it, and the peak-memory counter started afresh, so that a measurement
    sees what training sees and its own peak only."""
    set_cudnn_autotuning(device, cfg.deterministic)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    """Wait until ``device`` has finished its queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int,
               warmup: int) -> dict[str, list[float]]:
    """Milliseconds of ``repeats`` calls of each step after ``warmup`` untimed ones.

    The steps take turns within each repeat, so a change in machine load affects them alike; the device
    is synchronised around every timed call.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what it measures) since the last ``torch.cuda.reset_peak_memory_stats`` on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux; the process's peak since it started.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def random_data(cfg: Config, device: torch.device, batches: int) -> dict[str, Any]:
    """In-memory stand-ins of ``engine.build.build_data``'s loaders: random patches of side ``resize or
    img_size`` through the stage's transforms, one training batch per role (reused every iteration) and
    ``batches`` batches per refresh/evaluation role.

    The batches are what the loaders deliver: training images uint8 where ``build_data`` keeps them uint8
    (no resize; not step 3's strong views), float elsewhere, in pinned memory on CUDA.
    """
    train_tf, eval_tf, strong_tf = build_transforms(cfg)
    side, bs = cfg.resize or cfg.img_size, cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    pin = device.type == "cuda"

    def batch(transform: Callable | None, labels: bool, uint8: bool) -> dict[str, Any]:
        samples = []
        for i in range(bs):
            img = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=gen)
            sample = {"img": img if uint8 else img.float().div_(255.0), "name": f"random{i}"}
            if labels:
                sample["label"] = torch.randint(0, cfg.num_classes, (side, side), generator=gen)
            samples.append(finish_sample(sample, transform, cfg.normalize))
        collated = default_collate(samples)
        return {k: v.pin_memory() if pin and torch.is_tensor(v) else v for k, v in collated.items()}

    uint8 = not cfg.resize
    strong = STAGES[cfg.stage].target_view == "weak_strong"
    src = batch(train_tf, True, uint8)
    tgt = batch(strong_tf if strong else train_tf, False, uint8 and not strong)
    return {"source": iter(lambda: src, None), "target": iter(lambda: tgt, None),
            "source_refresh": [batch(eval_tf, True, False) for _ in range(batches)],
            "target_refresh": [batch(eval_tf, False, False) for _ in range(batches)],
            "target_val": [batch(eval_tf, True, False) for _ in range(batches)]}


def bench_loader(root: Path, *, split: str, batch: int, workers: int, warmup: int, repeats: int) -> list[dict]:
    """Samples/s of ``root``'s ``split`` through a DataLoader: PNG decoding vs the uint8 cache, with 0 and
    ``workers`` loader processes, over ``repeats`` passes after ``warmup`` untimed ones."""
    start = time.perf_counter()
    cached = SegmentationFolder(root, split, cache=True)
    build_s = time.perf_counter() - start
    datasets = {"png": SegmentationFolder(root, split), "cache": cached}
    rows = []
    for count in sorted({0, workers}):
        for impl, dataset in datasets.items():
            loader = build_loader(dataset, batch, shuffle=False, drop_last=False, num_workers=count,
                                  persistent_workers=True)
            for _ in range(warmup):
                for _ in loader:
                    pass
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in loader:
                    pass
                times.append(time.perf_counter() - start)
            rows.append({"what": "loader", "impl": impl, "workers": count, "split": split, "domain": str(root),
                         "samples": len(dataset), "pass_times_s": times,
                         "samples_per_s": len(dataset) * len(times) / sum(times),
                         "cache_build_s": build_s if impl == "cache" else None})
            del loader  # ends its persistent workers before the next configuration starts
    return rows
