"""The run folder of a stage: where it trains, what it writes first and last, the resume checkpoint and
the hand-off (through ``engine/handoff.py``, which owns that checkpoint's schema).

A stage writes ``<work_dir>/<stage>/``::

    config.yaml    resolved options          env.json       seeds, git hash, library versions
    last.pt        full training state       model.pt       hand-off: weights, D1, D2, prototypes, meta
    metrics.jsonl  one record per log/eval   tb/            TensorBoard events
    eval.json      final target-val and source-val metrics
    manifest.json  written last: the stage is complete

``--overwrite`` of a trained folder trains in ``<stage>.new`` and swaps it in only when it is finished.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.domains import resolve_domain
from data.files import read_meta
from engine.build import bn_stats_of
from engine.device import unwrap
from engine.handoff import handoff_meta, save_handoff
from engine.methods.base import Method
from engine.refresh import RefreshResult
from models.napg import weights_record
from utils import dist
from utils.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from utils.config import Config, dump_config
from utils.errors import UserError
from utils.metrics import SUMMARY_KEYS
from utils.run import environment_info, rng_state, set_rng_state, staging_dir, write_json

# Options that must not change when a stage is resumed.
RESUME_FIXED = ("source", "target", "num_classes", "backbone", "batch_size", "img_size", "resize", "clusters",
                "seed", "preset")


@dataclass
class Progress:
    """Where a stage stands; what ``last.pt`` records besides the weights."""

    epoch: int = 1  # the epoch being trained (1-based; epochs + 1 once the stage is done)
    iteration: int = 0  # iterations of that epoch already done
    global_step: int = 0  # iterations of the stage so far
    best: dict[str, Any] | None = None  # the oracle selection's best so far (--select-on-target-val)


def prepare_run_dir(run_dir: Path, cfg: Config) -> tuple[Path, bool]:
    """The folder this invocation trains in, and whether it resumes there; refuses to touch finished work.

    ``--overwrite`` of a folder holding a checkpoint trains in a staging folder (``<stage>.new``) that
    replaces the old run only once the new one is finished, so no failure of the new run loses the old
    one; ``--resume`` continues such an interrupted replacement. A folder without a checkpoint was never
    trained (killed or stopped by an error early): it is simply started again.
    """
    complete_swap(run_dir)
    staging = staging_dir(run_dir)
    finished = (run_dir / "manifest.json").exists()
    has_checkpoint = (run_dir / "last.pt").exists()
    if cfg.resume:
        if (staging / "last.pt").exists():
            return staging, True
        if finished:
            raise UserError(f"{run_dir} is already finished; nothing to resume (to train it again, drop --resume "
                            f"and pass --overwrite)")
        if has_checkpoint:
            return run_dir, True
        if not run_dir.exists():
            raise UserError(f"--resume: no run {run_dir} to continue (check --work-dir, or drop --resume to start "
                            f"the stage)")
        print(f"{run_dir} has no checkpoint yet (it stopped before its first one); starting it again")
        return run_dir, False
    if finished or has_checkpoint:
        if cfg.overwrite:
            return staging, False
        what = "a finished" if finished else "an unfinished"
        hint = "" if finished else " continue it with --resume, or"
        if (staging / "last.pt").exists():
            hint = f" continue the interrupted replacement in {staging} with --resume, or"
        raise UserError(f"{run_dir} holds {what} {cfg.stage} run;{hint} pass --overwrite to replace it, "
                        f"or choose another --work-dir")
    return run_dir, False


def swap_in(staging: Path, run_dir: Path) -> None:
    """Replace ``run_dir`` by the finished run in ``staging`` (two renames; see :func:`complete_swap`)."""
    old = run_dir.with_name(run_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if run_dir.exists():
        run_dir.rename(old)
    staging.rename(run_dir)
    if old.exists():
        shutil.rmtree(old)


def complete_swap(run_dir: Path) -> None:
    """Finish a :func:`swap_in` that a crash cut short between its renames."""
    staging = staging_dir(run_dir)
    if dist.is_main() and (staging / "manifest.json").exists() and not run_dir.exists():
        swap_in(staging, run_dir)
    dist.barrier()


def clear_untrained(folder: Path, staging: bool) -> None:
    """Empty a staging folder of an earlier --overwrite, or remove what a run that never saved a checkpoint
    wrote (only the run's own files: a folder may hold other things of the user's)."""
    if staging:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in ("config.yaml", "env.json", "metrics.jsonl", "eval.json", "best.pt", "tb"):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def save_last(run_dir: Path, napg: Method, protos: RefreshResult, data: dict[str, Any], progress: Progress,
              cfg: Config) -> None:
    """Everything needed to continue exactly here: weights, optimisers, prototypes, RNG, data position."""
    if not dist.is_main():
        return
    state = napg.state_dict()
    state.update(epoch=progress.epoch, iteration=progress.iteration, global_step=progress.global_step,
                 best=progress.best, rng=rng_state(),
                 prototypes=protos.state_dict(), config=cfg.to_dict(),
                 streams={k: data[k].state_dict() for k in ("source", "target") if data[k] is not None})
    save_checkpoint(state, run_dir / "last.pt")


def load_last(run_dir: Path, cfg: Config, napg: Method, data: dict[str, Any],
              device: torch.device) -> tuple[Progress, RefreshResult]:
    """Restore what :func:`save_last` wrote into ``napg``, the data streams and the RNGs."""
    state = load_checkpoint(run_dir / "last.pt", map_location=device)
    saved = state.get("config", {})
    current = cfg.to_dict()
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != current[k]]
    if changed:
        raise UserError(f"--resume with different {', '.join(changed)} than the interrupted run "
                        f"({', '.join(f'{k}={saved[k]}' for k in changed)})")
    napg.load_state_dict(state)
    for key, stream_state in state["streams"].items():
        data[key].load_state_dict(stream_state)
    set_rng_state(state["rng"])
    protos = RefreshResult.from_state(state["prototypes"], device)
    return Progress(state["epoch"], state["iteration"], state["global_step"], state["best"]), protos


def save_stage_handoff(path: Path, napg: Method, protos: RefreshResult, cfg: Config, epoch: int,
                  **extra: Any) -> None:
    meta = handoff_meta(stage=cfg.stage, source=cfg.source, target=cfg.target,
                        num_classes=cfg.num_classes, backbone=cfg.backbone,
                        shared_similarity=cfg.shared_similarity, clusters=protos.clusters,
                        bn_stats=bn_stats_of(cfg), normalize=cfg.normalize, epoch=epoch,
                        input_scale=_input_scale(cfg), **extra)
    d1, d2 = (None if d is None else unwrap(d) for d in (napg.d1, napg.d2))
    save_handoff(path, unwrap(napg.model), d1, d2, protos.state_dict(), meta)


def _input_scale(cfg: Config) -> float:
    """Network px per image px the weights were trained at: --resize over the source patch side."""
    if not cfg.resize:
        return 1.0
    # Folders without meta.json come from mmseg's converters, which cut 512 px patches.
    side = read_meta(resolve_domain(Path(cfg.data_root), cfg.source)).get("clip", 512)
    return cfg.resize / side


def write_start(out_dir: Path, cfg: Config, napg: Method, init_source: dict[str, Any] | None) -> None:
    """config.yaml and env.json of a run that starts training (the main process only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    write_json(out_dir / "env.json", {"seed": cfg.seed, "init": init_source, "world_size": dist.world_size(),
                                      "pretrained": weights_record(unwrap(napg.model).pretrained_path),
                                      **environment_info()})


def write_results(run_dir: Path, cfg: Config, protos: RefreshResult, all_results: dict[str, Any],
                  init_source: dict[str, Any] | None, seconds: float, ranks: dict[str, Any]) -> None:
    """eval.json, then manifest.json, the file that marks the stage complete (after ``model.pt``)."""
    write_json(run_dir / "eval.json", {"split": f"target-{cfg.target_eval_split}", "selection": "last",
                                       **all_results.get("target_val", {}), "source_val": all_results["source_val"]})
    manifest = {"stage": cfg.stage, "source": cfg.source, "target": cfg.target,
                "num_classes": cfg.num_classes, "backbone": cfg.backbone,
                "prototypes_per_class": max(protos.clusters), "clusters": protos.clusters,
                "preset": cfg.preset, "epochs": cfg.epochs, "git": environment_info()["git"],
                "checkpoint": "model.pt", "checkpoint_sha256": sha256_file(run_dir / "model.pt"),
                "init": init_source, "train_seconds": round(seconds, 1), "ranks": ranks,
                "bn_stats": bn_stats_of(cfg),
                **{role: {b: {k: m[k] for k in SUMMARY_KEYS} for b, m in res.items()}
                   for role, res in all_results.items()}}
    write_json(run_dir / "manifest.json", manifest)
