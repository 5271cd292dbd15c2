"""A training stage from resolved config to run folder: build, then per epoch refresh the prototypes,
train, evaluate; at the end evaluate and hand off (the run folder: ``engine/rundir.py``).

Words: a *stage* is an entry of the stage table (step0..step3 and the baselines, ``utils/stages.py``), an
*iteration* one optimiser update of the stage's method (``Method.train_step``, ``engine/methods/``), an *epoch*
a pass over the stage's epoch role.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.benchmarks import Benchmark
from data.domains import check_num_classes, data_benchmark
from data.preprocess import to_model_input
from engine.build import build_data, build_method, iters_per_epoch
from engine.coverage import GradientCoverage, describe, untrained_at_evaluation
from engine.device import set_cudnn_autotuning, unwrap
from engine.evaluate import evaluate
from engine.handoff import handoff_prototypes, resolve_init
from engine.logger import RunLogger, panel
from engine.methods.base import Logs, Method
from engine.pictures import predict_patch, write_stage_pictures
from engine.refresh import RefreshResult, RefreshSpec, refresh_prototypes
from engine.rundir import (
    Action,
    Progress,
    RunFolder,
    load_last,
    save_last,
    save_stage_handoff,
    write_results,
    write_start,
)
from engine.safety import StopSignals, read_back, require_finite_weights
from utils import dist
from utils.config import Config
from utils.errors import NonFiniteError, StageInterrupted, UserError
from utils.metrics import SUMMARY_KEYS, format_table
from utils.run import resolve_device, seed_everything


def run_stage(cfg: Config) -> dict[str, Any]:
    """Train one stage as configured and return its final target-val metrics."""
    stage = cfg.stage
    benchmark = data_benchmark(cfg.data_root, cfg.source, cfg.target)
    check_num_classes(cfg.num_classes, benchmark)
    folder = RunFolder(cfg.work_dir, stage)
    device = dist.init_from_env(resolve_device(cfg.device))
    set_cudnn_autotuning(device, cfg.deterministic)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device (its loss scaling is CUDA-only), this run is on {device}; "
                        f"use --amp bf16 or --amp off")
    folder.complete_swap()
    action = folder.next_action(cfg.resume, cfg.overwrite)
    out_dir = folder.train_dir(action)
    init_state, init_source = resolve_init(cfg)
    seed_everything(cfg.seed, cfg.deterministic)

    data = build_data(cfg, device)
    method = build_method(cfg, device, init_state)
    # The previous stage's prototypes: the fallback for classes without samples at the first refresh.
    protos = handoff_prototypes(init_state, device)
    progress = Progress()
    coverage = GradientCoverage(unwrap(method.model))
    if action is Action.RESUME:
        progress, protos = load_last(out_dir, cfg, method, data, device, coverage)
    elif dist.is_main():
        folder.clear(action)
        write_start(out_dir, cfg, method, init_source)
    dist.barrier()

    start_time = time.time()
    # The iterations of the pipeline's earlier stages: one TensorBoard axis for the whole pipeline.
    step_offset = int((init_state or {}).get("meta", {}).get("pipeline_step_end") or 0)
    loop = _StageLoop(cfg, method, data, protos, progress, coverage, out_dir, device, benchmark, step_offset)
    try:
        if action is not Action.RESUME:
            loop.logger.config(cfg.to_dict(), [f"{prefix}/classifier/miou" for prefix in ("eval", "eval_source")])
        try:
            while progress.epoch <= cfg.epochs and not loop.stopped:
                loop.train_epoch()
        finally:
            loop.signals.restore()
        if loop.signal:
            raise StageInterrupted(f"{stage}: {signal.Signals(loop.signal).name} received; saved "
                                   f"{out_dir / 'last.pt'} after {loop.invocation_iters} iterations of this run; "
                                   f"continue with the same command and --resume", loop.signal)
        if progress.epoch <= cfg.epochs:
            print(f"{stage}: stopped after {loop.invocation_iters} iterations; continue with --resume")
            return {"stopped": True}
        require_finite_weights(method, loop.protos)  # the hand-off never carries a diverged network
        results = _finish(out_dir, method, loop.protos, data, cfg, init_source, time.time() - start_time, coverage,
                          loop.logger, progress.global_step, benchmark)
    finally:
        loop.logger.close()
    if out_dir == folder.staging and dist.is_main():
        folder.swap_in()
    dist.barrier()
    return results


class _StageLoop:
    """The epochs of one invocation: where it stands (``progress``), its prototypes, logger and stop state."""

    def __init__(self, cfg: Config, method: Method, data: dict[str, Any], protos: RefreshResult | None,
                 progress: Progress, coverage: GradientCoverage, out_dir: Path, device: torch.device,
                 benchmark: Benchmark, step_offset: int = 0):
        self.cfg, self.method, self.data, self.protos = cfg, method, data, protos
        self.progress, self.coverage, self.out_dir, self.device = progress, coverage, out_dir, device
        self.refresh_spec = RefreshSpec.from_config(cfg)
        self.logger = RunLogger(out_dir, enabled=dist.is_main(), step_offset=step_offset)
        self.benchmark = benchmark
        self.iters = iters_per_epoch(cfg, data)
        self.signals = StopSignals()
        self.invocation_iters = 0  # iterations of this invocation (what --stop-after counts)
        self.stopped = False

    @property
    def signal(self) -> int:
        """The stop signal received (SIGTERM/SIGINT), 0 if none."""
        return self.signals.poll()

    def train_epoch(self) -> None:
        """Train from the current position to the end of the epoch (then evaluate and save), or until a
        stop is asked for (then save where it stands and set ``stopped``)."""
        cfg, p = self.cfg, self.progress
        tau = cfg.tau_at(p.epoch)
        # At an epoch's start (or a resume without prototypes); a method that reads no prototype refreshes
        # only when it has none (Method.refreshes_prototypes).
        if self.protos is None or p.iteration == 0 and self.method.refreshes_prototypes:
            self._refresh(tau)
        asked_to_stop = self._train_iterations(tau)
        if p.iteration < self.iters or self.signal:  # stopped inside the epoch: a signal skips its evaluation
            self._save_last()
            self.stopped = True
            return
        if not cfg.eval_every or p.global_step % cfg.eval_every == 0:
            self._evaluate()
        p.epoch, p.iteration = p.epoch + 1, 0
        self._save_last()
        self.stopped = asked_to_stop or bool(self.signal)

    def _refresh(self, tau: float | None) -> None:
        """This epoch's prototypes (docs/method.md §3), logged."""
        p = self.progress
        # Prototypes come from the network being trained (in step 3 the student, as in the original).
        self.protos = refresh_prototypes(unwrap(self.method.model), self.data["source_refresh"],
                                         self.data["target_refresh"], tau, self.refresh_spec, self.device,
                                         previous=self.protos, epoch=p.epoch)
        _log_refresh(self.logger, p.global_step, p.epoch, tau, self.protos, self.benchmark.classes)

    def _train_iterations(self, tau: float | None) -> bool:
        """The epoch's remaining iterations; True when it ended early on --stop-after or a signal."""
        cfg, p = self.cfg, self.progress
        bar = tqdm(total=self.iters, initial=p.iteration, disable=not cfg.progress, dynamic_ncols=True,
                   desc=f"{cfg.stage} epoch {p.epoch}/{cfg.epochs}")
        window = _Window()
        stopping = False
        while p.iteration < self.iters and not stopping:
            logs, data_seconds = train_iteration(self.method, self.data, self.protos, p.epoch)
            p.iteration += 1
            p.global_step += 1
            self.invocation_iters += 1
            window.add(data_seconds)
            bar.update()
            inside = p.iteration < self.iters  # the end of the pass evaluates and saves anyway
            log_now = p.global_step % cfg.log_every == 0 or not inside
            eval_now = cfg.eval_every and p.global_step % cfg.eval_every == 0 and inside
            save_now = cfg.checkpoint_every and p.global_step % cfg.checkpoint_every == 0 and inside
            stopping = bool(cfg.stop_after is not None and self.invocation_iters >= cfg.stop_after
                            or self.signal)
            # Reading the values back waits for the device, so it happens only where they are used: at
            # log points and before anything that uses or keeps the weights (an evaluation, a checkpoint,
            # the end of a pass or of the run). A divergence is thus found within --log-every iterations
            # and always before a checkpoint could keep it; the losses tolerate NaN until then.
            if not (log_now or eval_now or save_now or stopping):
                continue
            try:
                values = read_back(self.method, logs)
            except NonFiniteError as err:
                raise UserError(_diverged_message(err, cfg, self.method, p.epoch, p.iteration,
                                                  self.out_dir)) from None
            self.coverage.record()  # sampled where the device is waited for anyway
            if log_now:
                bar.set_postfix(loss=f"{values['loss_total']:.3f}")
                self._log_train(values, window, tau)
            if eval_now:
                self._evaluate()
            if save_now:
                self._save_last()
            window = _Window()  # the next timings leave out the logging, evaluation and saving above
        bar.close()
        return stopping

    def _log_train(self, values: dict[str, float], window: _Window, tau: float | None) -> None:
        method, p = self.method, self.progress
        values.update(window.times(), lr=method.opt_g.param_groups[0]["lr"],
                      tau=tau if tau is not None else float("nan"))
        if method.opt_d1 is not None:
            values["lr_d"] = method.opt_d1.param_groups[0]["lr"]
        self.logger.scalars(p.global_step, values, prefix="train/", epoch=p.epoch, iteration=p.iteration,
                            kind="train")

    def _evaluate(self) -> None:
        """Evaluate both val splits, then, each in a call of its own: log the metrics, draw the panels,
        print the summary line, and keep ``best.pt`` (``--select-on-target-val``)."""
        if self.data["target_val"] is None:
            return
        cfg, p = self.cfg, self.progress
        all_results = evaluate_stage(self.method, self.data, self.protos, cfg)
        _log_eval(self.logger, p.global_step, p.epoch, all_results, self.benchmark.classes)
        if dist.is_main():
            _log_panels(self.method, self.data, self.protos, self.logger, p.global_step, cfg.normalize,
                        self.benchmark.palette_array)
        _print_eval(cfg, p.epoch, all_results)
        if cfg.select_on_target_val and dist.is_main():
            self._keep_best(all_results["target_val"])

    def _keep_best(self, results: dict[str, Any]) -> None:
        """Write ``best.pt`` when the target-val classifier mIoU beats the best so far (an oracle selection)."""
        p = self.progress
        miou = results["classifier"]["miou"]
        if p.best is None or miou > p.best["miou"]:
            p.best = {"miou": miou, "epoch": p.epoch, "step": p.global_step}
            save_stage_handoff(self.out_dir / "best.pt", self.method, self.protos, self.cfg, p.epoch,
                               selected_on="target-val mIoU (oracle selection)", target_val=results)

    def _save_last(self) -> None:
        save_last(self.out_dir, self.method, self.protos, self.data, self.progress, self.cfg, self.coverage)


# ---------------------------------------------------------------------------------------------- iterations
def train_iteration(method: Method, data: dict[str, Any], protos: RefreshResult,
                    epoch: int) -> tuple[Logs, float]:
    """One iteration: its detached logs (device tensors, not waited for) and the seconds spent waiting for
    the next batches."""
    start = time.perf_counter()
    src = next(data["source"])
    tgt = next(data["target"]) if method.uses_target else None
    data_seconds = time.perf_counter() - start
    return method.train_step(src, tgt, protos, epoch), data_seconds


class _Window:
    """Wall time and data wait of the iterations since the last check. The device runs ahead of the host,
    so one iteration's host time means little; over a window that ends with a read-back it is exact."""

    def __init__(self) -> None:
        self.start, self.data_seconds, self.iterations = time.perf_counter(), 0.0, 0

    def add(self, data_seconds: float) -> None:
        self.data_seconds += data_seconds
        self.iterations += 1

    def times(self) -> dict[str, float]:
        """``iter_time`` (s per iteration) and ``data_time_fraction`` over the window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"iter_time": elapsed / max(self.iterations, 1), "data_time_fraction": self.data_seconds / elapsed}


def _log_refresh(logger: RunLogger, iteration: int, epoch: int, tau: float | None, protos: RefreshResult,
                 names: tuple[str, ...]) -> None:
    values = {f"count_{name}": n for name, n in zip(names, protos.counts_source_target)}
    values.update({f"count_target_{name}": n for name, n in zip(names, protos.counts_target)})
    values.update({f"k_{name}": k for name, k in zip(names, protos.clusters)})
    for domain, sizes in protos.pool_sizes.items():  # before balancing
        values.update({f"pool_{domain}_{name}": n for name, n in zip(names, sizes)})
    values["tau"] = tau if tau is not None else float("nan")
    logger.scalars(iteration, values, prefix="prototypes/", epoch=epoch, kind="refresh",
                   kept_previous=[names[c] for c in protos.kept_previous])
    if protos.kept_previous:
        missing = ", ".join(names[c] for c in protos.kept_previous)
        tqdm.write(f"epoch {epoch}: no samples of {missing}; kept their previous prototypes")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_stage(method: Method, data: dict[str, Any], protos: RefreshResult,
                   cfg: Config) -> dict[str, dict[str, Any]]:
    """Target-val and source-val metrics of both branches, each domain with its own BN statistics.

    Returns ``{"target_val": {branch: metrics}, "source_val": {...}}`` (a role without data is left out).
    The target is evaluated with the target prototypes P_T once they exist, the source with P_ST.
    """
    device = protos.source_target.device
    results = {}
    for role, domain, prototypes in (("target_val", "target", protos.for_target),
                                     ("source_val", "source", protos.source_target)):
        if data[role] is not None:
            results[role] = evaluate(method.scored_model, data[role], prototypes, device, cfg.num_classes,
                                     max_batches=cfg.eval_max_batches, amp=cfg.amp, domain=domain,
                                     normalize=cfg.normalize)
    return results


def _log_eval(logger: RunLogger, iteration: int, epoch: int, all_results: dict[str, dict[str, Any]],
              names: tuple[str, ...]) -> None:
    """Summary metrics and per-class IoU of every role and branch (``eval/``: target val, ``eval_source/``)."""
    for role, results in all_results.items():
        prefix = "eval" if role == "target_val" else "eval_source"
        for branch, m in results.items():
            values = {k: m[k] for k in SUMMARY_KEYS}
            values.update({f"iou_{n}": v for n, v in zip(names, m["iou"])})
            logger.scalars(iteration, values, prefix=f"{prefix}/{branch}/", epoch=epoch, kind="eval", split=role)


def _print_eval(cfg: Config, epoch: int, all_results: dict[str, dict[str, Any]]) -> None:
    results = all_results["target_val"]
    source_miou = all_results["source_val"]["classifier"]["miou"]
    tqdm.write(f"{cfg.stage} epoch {epoch}: target-{cfg.target_eval_split} mIoU "
               f"{100 * results['classifier']['miou']:.2f} (prototypes "
               f"{100 * results.get('prototype', {}).get('miou', float('nan')):.2f}), source-val mIoU "
               f"{100 * source_miou:.2f}")


@torch.no_grad()
def _log_panels(method: Method, data: dict[str, Any], protos: RefreshResult, logger: RunLogger, iteration: int,
                normalize: str, palette: np.ndarray) -> None:
    """Input, ground truth, prediction and entropy of the first source and target-val patches."""
    model = method.scored_model
    for tag, dataset in (("source", data["source_refresh"].dataset),
                         ("target", data["target_val"].dataset if data["target_val"] is not None else None)):
        if dataset is None:
            continue
        sample = dataset[0]
        pred, entropy = predict_patch(model, sample["img"], protos.for_target, protos.source_target.device, tag,
                                      normalize)
        logger.image(f"panels/{tag}", iteration, panel(sample["img"], sample.get("label"), pred, entropy, palette))


def _diverged_message(err: NonFiniteError, cfg: Config, method: Method, epoch: int, iteration: int,
                      out_dir: Path) -> str:
    last = out_dir / "last.pt"
    kept = f"{last} keeps the last good state" if last.exists() else "no checkpoint was written yet"
    again = "continue with --resume" if last.exists() else "start it again"
    amp = "" if cfg.amp == "off" else ", or use --amp off"
    lr_d = f" or --lr-d (now {cfg.lr_d})" if method.discriminators else ""
    return (f"{cfg.stage} diverged by epoch {epoch}, iteration {iteration} (checked every --log-every "
            f"iterations): {err} is not finite; stopped, {kept}. "
            f"Lower --lr (now {cfg.lr}){lr_d}{amp}, and {again}")


def _finish(run_dir: Path, method: Method, protos: RefreshResult, data: dict[str, Any], cfg: Config,
            init_source: dict[str, Any] | None, seconds: float, coverage: GradientCoverage, logger: RunLogger,
            global_step: int, benchmark: Benchmark) -> dict[str, Any]:
    """Final evaluation, hand-off checkpoint and the manifest that marks the stage complete."""
    all_results = evaluate_stage(method, data, protos, cfg)
    untrained = _untrained_weights(method, data, protos, cfg, coverage)
    if untrained and dist.is_main():
        print(f"warning: {cfg.stage}: {describe(untrained)}")
    results = all_results.get("target_val", {})
    ranks = _rank_consistency(method, protos)
    if dist.is_main():
        save_stage_handoff(run_dir / "model.pt", method, protos, cfg, cfg.epochs,
                           pipeline_step_end=logger.step_offset + global_step, benchmark=benchmark.name)
        if results:
            _write_pictures(run_dir, method, data, protos, cfg, results["classifier"]["confusion"], logger,
                            global_step)
        write_results(run_dir, cfg, protos, all_results, init_source, seconds, ranks, untrained,  # the manifest: last
                      benchmark)
        if results:
            print(f"{cfg.stage} target-{cfg.target_eval_split} (classifier):")
            print(format_table(results["classifier"], benchmark.classes, benchmark.mean_without is not None))
        source_miou = all_results["source_val"]["classifier"]["miou"]
        print(f"{cfg.stage} source-val mIoU (classifier): {100 * source_miou:.2f}")
    dist.barrier()
    return results


def _untrained_weights(method: Method, data: dict[str, Any], protos: RefreshResult, cfg: Config,
                       coverage: GradientCoverage) -> dict[str, int]:
    """:func:`engine.coverage.untrained_at_evaluation` on the first target-val batch (nothing without one)."""
    if data["target_val"] is None:
        return {}
    batch = next(iter(data["target_val"]))
    x = to_model_input(batch["img"], protos.for_target.device, cfg.normalize)
    return untrained_at_evaluation(coverage, x, protos.for_target, "target")


def _write_pictures(run_dir: Path, method: Method, data: dict[str, Any], protos: RefreshResult, cfg: Config,
                    confusion: list[list[int]], logger: RunLogger, global_step: int) -> None:
    """confusion.png and panels.png of the final target evaluation, also logged to TensorBoard (``final/``)."""
    pictures = write_stage_pictures(run_dir, method.scored_model, data["target_val"].dataset, protos.for_target,
                                    protos.source_target.device, cfg.normalize, confusion,
                                    f"{cfg.stage} target-{cfg.target_eval_split} (rows sum to 1)")
    for name, rgb in pictures.items():
        logger.image(f"final/{name}", global_step, rgb)


def _rank_consistency(method: Method, protos: RefreshResult) -> dict[str, Any]:
    """Whether every rank ends with bit-identical parameters and prototypes."""
    if not dist.is_dist():
        return {"world_size": 1}
    nets = [m for m in (method.model, method.d1, method.d2) if m is not None]
    return {"world_size": dist.world_size(),
            "identical_parameters": dist.identical_across_ranks([p.detach() for m in nets
                                                                 for p in unwrap(m).parameters()]),
            "identical_prototypes": dist.identical_across_ranks([t for t in (protos.source_target, protos.target)
                                                                 if t is not None])}
