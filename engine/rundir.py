"""The run folder of a stage: where it trains, what it writes first and last, the resume checkpoint and
the hand-off (through ``engine/handoff.py``, which owns that checkpoint's schema).

A stage writes ``<work_dir>/<stage>/``::

    config.yaml    resolved options          env.json       seeds, git hash, library versions
    last.pt        full training state       model.pt       hand-off: weights, D1, D2, prototypes, meta
    metrics.jsonl  one record per log/eval   tb/            TensorBoard events
    eval.json      final target-val and source-val metrics
    manifest.json  written last: the stage is complete

``--overwrite`` of a trained folder trains in ``<stage>.new`` and swaps it in only when it is finished;
:class:`RunFolder` decides what an invocation does with the folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from data.benchmarks import Benchmark, data_protocol_of
from data.domains import domain_bands, resolve_domain
from data.files import read_meta
from engine.build import bn_stats_of
from engine.coverage import GradientCoverage
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
from utils.publish import replace_dir
from utils.run import environment_info, rng_state, set_rng_state, write_json

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


class State(Enum):
    """What a stage's run folder holds (read from its files by :attr:`RunFolder.state`)."""

    FRESH = "fresh"  # nothing trained: no folder, or one that stopped before its first checkpoint
    PARTIAL = "partial"  # last.pt without manifest.json: an interrupted run
    FINISHED = "finished"  # manifest.json: a complete run
    REPLACING = "replacing"  # <stage>.new/last.pt: an interrupted --overwrite of a finished or unfinished run


class Action(Enum):
    """What an invocation does with a run folder (:meth:`RunFolder.next_action`)."""

    START = "start"  # train from the beginning in the run folder
    RESUME = "resume"  # continue from last.pt, in the run folder or in the replacement's staging twin
    SKIP = "skip"  # keep the finished run
    REPLACE = "replace"  # train anew in the staging twin, which replaces the run folder once finished


class RunFolder:
    """``<work_dir>/<stage>`` and its staging twin ``<stage>.new``: the one place that decides whether an
    invocation starts, resumes, skips or replaces a run (the stage itself, tools/run_pipeline.py and
    tools/validity.py all ask :meth:`next_action`).

    ``--overwrite`` of a folder holding a checkpoint trains in ``<stage>.new``, which replaces the old run
    only once the new one is finished, so no failure of the new run loses the old one; ``--resume``
    continues such an interrupted replacement. A folder without a checkpoint was never trained (killed or
    stopped by an error early): it is simply started again.
    """

    def __init__(self, work_dir: str | Path, stage: str) -> None:
        self.stage = stage
        self.path = Path(work_dir) / stage
        self.staging = self.path.with_name(stage + ".new")

    @property
    def finished(self) -> bool:
        """Whether the run folder holds a finished run (a replacement may be under way beside it)."""
        return (self.path / "manifest.json").exists()

    @property
    def state(self) -> State:
        """What the folder holds; an interrupted replacement beside it comes first."""
        if (self.staging / "last.pt").exists():
            return State.REPLACING
        if self.finished:
            return State.FINISHED
        return State.PARTIAL if (self.path / "last.pt").exists() else State.FRESH

    def next_action(self, resume: bool | None = None, overwrite: bool = False) -> Action:
        """What to do with this folder; refuses, with one line, to touch finished work unasked.

        ``resume`` True is ``--resume`` (continue, or fail if there is nothing to continue), False a plain
        start (which refuses a folder holding a run unless ``overwrite``), None whatever carries the work on
        (the pipeline and the study: a finished run is skipped, an interrupted one resumed)::

            state       resume=None        resume=True   resume=False    resume=False, overwrite
            FRESH       START              START [1]     START           START
            PARTIAL     RESUME             RESUME        error           REPLACE
            FINISHED    SKIP               error         error           REPLACE
            REPLACING   RESUME [2]         RESUME        error [3]       REPLACE [3]

        ``resume=None`` with ``overwrite`` is the last column; ``resume=True`` ignores ``overwrite``. [1] an
        error when there is no folder at all.
        [2] in the staging twin, as every RESUME of a replacement. [3] as PARTIAL or FINISHED for the run it
        replaces (START when there is none); REPLACE discards the interrupted replacement.
        """
        holds_run = self.finished or (self.path / "last.pt").exists()
        if resume is None:
            if overwrite:
                return Action.REPLACE if holds_run else Action.START
            return {State.FRESH: Action.START, State.FINISHED: Action.SKIP}.get(self.state, Action.RESUME)
        if resume:
            state = self.state
            if state in (State.PARTIAL, State.REPLACING):
                return Action.RESUME
            if state is State.FINISHED:
                raise UserError(f"{self.path} is already finished; nothing to resume (to train it again, drop "
                                f"--resume and pass --overwrite)")
            if not self.path.exists():
                raise UserError(f"--resume: no run {self.path} to continue (check --work-dir, or drop --resume "
                                f"to start the stage)")
            print(f"{self.path} has no checkpoint yet (it stopped before its first one); starting it again")
            return Action.START
        if not holds_run:
            return Action.START
        if overwrite:
            return Action.REPLACE
        what = "a finished" if self.finished else "an unfinished"
        hint = "" if self.finished else " continue it with --resume, or"
        if self.state is State.REPLACING:
            hint = f" continue the interrupted replacement in {self.staging} with --resume, or"
        raise UserError(f"{self.path} holds {what} {self.stage} run;{hint} pass --overwrite to replace it, "
                        f"or choose another --work-dir")

    def train_dir(self, action: Action) -> Path:
        """The folder ``action`` trains in: the staging twin for a replacement (new or resumed)."""
        replacing = action is Action.REPLACE or action is Action.RESUME and self.state is State.REPLACING
        return self.staging if replacing else self.path

    def clear(self, action: Action) -> None:
        """Empty what a START or REPLACE trains in: the staging twin of an earlier --overwrite entirely, or
        what a run that never saved a checkpoint wrote (only the run's own files: a folder may hold other
        things of the user's)."""
        if action is Action.REPLACE:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        for name in ("config.yaml", "env.json", "metrics.jsonl", "eval.json", "best.pt", "tb"):
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def swap_in(self) -> None:
        """Replace the run folder by the finished run in the staging twin (two renames, through
        ``<stage>.old``; see :meth:`complete_swap`)."""
        replace_dir(self.staging, self.path, aside=self.path.with_name(self.stage + ".old"))

    def complete_swap(self) -> None:
        """Finish a :meth:`swap_in` that a crash cut short between its renames (every rank calls it)."""
        if dist.is_main() and (self.staging / "manifest.json").exists() and not self.path.exists():
            self.swap_in()
        dist.barrier()


def save_last(run_dir: Path, napg: Method, protos: RefreshResult, data: dict[str, Any], progress: Progress,
              cfg: Config, coverage: GradientCoverage) -> None:
    """Everything needed to continue exactly here: weights, optimisers, prototypes, RNG, data position."""
    if not dist.is_main():
        return
    state = napg.state_dict()
    state.update(epoch=progress.epoch, iteration=progress.iteration, global_step=progress.global_step,
                 best=progress.best, rng=rng_state(),
                 prototypes=protos.state_dict(), config=cfg.to_dict(), gradient_coverage=coverage.state_dict(),
                 streams={k: data[k].state_dict() for k in ("source", "target") if data[k] is not None})
    save_checkpoint(state, run_dir / "last.pt")


def load_last(run_dir: Path, cfg: Config, napg: Method, data: dict[str, Any], device: torch.device,
              coverage: GradientCoverage) -> tuple[Progress, RefreshResult]:
    """Restore what :func:`save_last` wrote into ``napg``, the data streams and the RNGs."""
    state = load_checkpoint(run_dir / "last.pt", map_location=device)
    saved = state.get("config", {})
    current = cfg.to_dict()
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != current[k]]
    if changed:
        raise UserError(f"--resume with different {', '.join(changed)} than the interrupted run "
                        f"({', '.join(f'{k}={saved[k]}' for k in changed)})")
    napg.load_state_dict(state)
    coverage.load_state_dict(state["gradient_coverage"])
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
                        input_scale=_input_scale(cfg), resize=cfg.resize, bands=_bands(cfg),
                        window=cfg.window, **extra)
    d1, d2 = (None if d is None else unwrap(d) for d in (napg.d1, napg.d2))
    save_handoff(path, napg.scored_model, d1, d2, protos.state_dict(), meta)


def _bands(cfg: Config) -> dict[str, list[str] | None]:
    """The bands of the run's source and target images (see ``META_DEFAULTS``)."""
    return {role: domain_bands(resolve_domain(Path(cfg.data_root), name)) if name else None
            for role, name in (("source", cfg.source), ("target", cfg.target))}


def data_protocol(cfg: Config) -> str:
    """The protocol (the benchmark declaration's) the run's domains were prepared with: their ``meta.json`` (a
    folder without the field, e.g. from mmseg's own converters, has its benchmark's default); "a / b" when
    source and target differ."""
    found = [data_protocol_of(read_meta(resolve_domain(Path(cfg.data_root), name)))
             for name in (cfg.source, cfg.target) if name]
    return " / ".join(dict.fromkeys(found))


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
                  init_source: dict[str, Any] | None, seconds: float, ranks: dict[str, Any],
                  untrained: dict[str, int], benchmark: Benchmark) -> None:
    """eval.json, then manifest.json, the file that marks the stage complete (after ``model.pt``).

    ``untrained``: parameter -> elements that act at evaluation but had no gradient (engine/coverage.py)."""
    protocol = data_protocol(cfg)
    write_json(run_dir / "eval.json", {"split": f"target-{cfg.target_eval_split}", "selection": "last",
                                       "protocol": protocol, "benchmark": benchmark.name,
                                       "classes": list(benchmark.classes),
                                       **all_results.get("target_val", {}), "source_val": all_results["source_val"],
                                       "untrained_at_evaluation": untrained})
    manifest = {"stage": cfg.stage, "source": cfg.source, "target": cfg.target,
                "num_classes": cfg.num_classes, "backbone": cfg.backbone,
                "prototypes_per_class": max(protos.clusters), "clusters": protos.clusters,
                "preset": cfg.preset, "epochs": cfg.epochs, "git": environment_info()["git"],
                "checkpoint": "model.pt", "checkpoint_sha256": sha256_file(run_dir / "model.pt"),
                "init": init_source, "train_seconds": round(seconds, 1), "ranks": ranks,
                "bn_stats": bn_stats_of(cfg), "protocol": protocol, "benchmark": benchmark.name,
                **{role: {b: {k: m[k] for k in SUMMARY_KEYS} for b, m in res.items()}
                   for role, res in all_results.items()}}
    write_json(run_dir / "manifest.json", manifest)
