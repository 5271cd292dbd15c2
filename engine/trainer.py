"""A training stage from resolved config to run folder: data, model, refresh, loop, evaluation, hand-off.

A stage writes ``<work_dir>/<stage>/``::

    config.yaml    resolved options          env.json       seeds, git hash, library versions
    last.pt        full training state       model.pt       hand-off: weights, D1, D2, prototypes, meta
    metrics.jsonl  one record per log/eval   tb/            TensorBoard events
    eval.json      final target-val and source-val metrics
    manifest.json  written last: the stage is complete
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.dataset import SegmentationFolder, read_meta
from data.domains import CLASS_NAMES, resolve_domain
from data.loaders import BatchStream, eval_loader, shuffled_loader
from data.transforms import build_transforms
from engine.evaluate import evaluate
from engine.handoff import handoff_meta, handoff_prototypes, resolve_init, save_handoff
from engine.logger import RunLogger, panel
from engine.pictures import predict_patch, write_stage_pictures
from engine.refresh import RefreshResult, refresh_prototypes
from engine.safety import StopSignals, require_finite_weights
from engine.uda import NAPG, _unwrap
from models import FCDiscriminatorHighMask, NAPGNet
from models.napg import weights_record
from utils import dist
from utils.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from utils.config import dump_config, tau_at
from utils.errors import NonFiniteError, StageInterrupted, UserError
from utils.metrics import format_table
from utils.run import (
    environment_info,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    staging_dir,
    write_json,
)

# Options that must not change when a stage is resumed.
RESUME_FIXED = ("source", "target", "num_classes", "backbone", "batch_size", "img_size", "resize", "clusters",
                "seed", "preset")


def run_stage(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one stage as configured and return its final target-val metrics."""
    stage = cfg["stage"]
    run_dir = Path(cfg["work_dir"]) / stage
    device = dist.init_from_env(resolve_device(cfg["device"]))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
    if cfg["amp"] == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device (its loss scaling is CUDA-only), this run is on {device}; "
                        f"use --amp bf16 or --amp off")
    out_dir, resume = _check_run_dir(run_dir, cfg)
    init_state, init_source = resolve_init(cfg)
    seed_everything(cfg["seed"], cfg["deterministic"])

    data = build_data(cfg, device)
    napg = build_napg(cfg, device, init_state)

    epoch, iteration, global_step = 1, 0, 0
    # The previous stage's prototypes: the fallback for classes without samples at the first refresh.
    protos = handoff_prototypes(init_state, device)
    best: dict[str, Any] | None = None
    if resume:
        epoch, iteration, global_step, protos, best = _resume(out_dir, cfg, napg, data, device)
    elif dist.is_main():
        _clear_untrained(out_dir, staging=out_dir != run_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.yaml")
        write_json(out_dir / "env.json", {"seed": cfg["seed"], "init": init_source, "world_size": dist.world_size(),
                                          "pretrained": weights_record(_unwrap(napg.model).pretrained_path),
                                          **environment_info()})
    dist.barrier()

    logger = RunLogger(out_dir, enabled=dist.is_main())
    iters = _iters_per_epoch(cfg, data)
    stop = False
    invocation_iters = 0
    start_time = time.time()
    signals = StopSignals()
    try:
        while epoch <= cfg["epochs"]:
            tau = tau_at(cfg, epoch)
            if iteration == 0 or protos is None:
                protos = refresh(napg, data, cfg, tau, protos, device, epoch=epoch)
                _log_refresh(logger, global_step, epoch, tau, protos)
            done = iteration
            bar = tqdm(range(iteration, iters), total=iters, initial=iteration, disable=not cfg["progress"],
                       desc=f"{stage} epoch {epoch}/{cfg['epochs']}", dynamic_ncols=True)
            for iteration in bar:
                try:
                    logs = train_iteration(napg, data, protos, epoch, tau)
                    require_finite_weights(napg)
                except NonFiniteError as err:
                    raise UserError(_diverged_message(err, cfg, epoch, iteration + 1, out_dir)) from None
                global_step += 1
                invocation_iters += 1
                done = iteration + 1
                bar.set_postfix(loss=f"{logs['loss_total']:.3f}")
                if global_step % cfg["log_every"] == 0 or done == iters:
                    logs.update(lr=napg.opt_g.param_groups[0]["lr"], tau=tau if tau is not None else float("nan"))
                    if napg.opt_d1 is not None:
                        logs["lr_d"] = napg.opt_d1.param_groups[0]["lr"]
                    logger.scalars(global_step, logs, prefix="train/", epoch=epoch, iteration=done, kind="train")
                if cfg["eval_every"] and global_step % cfg["eval_every"] == 0 and done < iters:
                    best = _evaluate_and_log(napg, data, protos, cfg, logger, global_step, epoch, out_dir, best)
                if cfg["checkpoint_every"] and global_step % cfg["checkpoint_every"] == 0 and done < iters:
                    _save_last(out_dir, napg, protos, data, epoch, done, global_step, best, cfg)
                stop = cfg["stop_after"] is not None and invocation_iters >= cfg["stop_after"]
                if stop or signals.poll():
                    break
            bar.close()
            if done < iters or signals.poll():  # stopped inside the epoch (a signal skips the epoch's evaluation)
                _save_last(out_dir, napg, protos, data, epoch, done, global_step, best, cfg)
                break
            if not cfg["eval_every"] or global_step % cfg["eval_every"] == 0:
                best = _evaluate_and_log(napg, data, protos, cfg, logger, global_step, epoch, out_dir, best)
            epoch, iteration = epoch + 1, 0
            _save_last(out_dir, napg, protos, data, epoch, 0, global_step, best, cfg)
            if stop or signals.poll():
                break
    finally:
        logger.close()
        signals.restore()
    if signals.poll():
        raise StageInterrupted(f"{stage}: {signal.Signals(signals.poll()).name} received; saved "
                               f"{out_dir / 'last.pt'} after {invocation_iters} iterations of this run; continue "
                               f"with the same command and --resume", signals.poll())
    if epoch <= cfg["epochs"]:
        print(f"{stage}: stopped after {invocation_iters} iterations; continue with --resume")
        return {"stopped": True}
    require_finite_weights(napg, protos)  # the hand-off never carries a diverged network
    results = _finish(out_dir, napg, protos, data, cfg, init_source, time.time() - start_time)
    if out_dir != run_dir and dist.is_main():
        _swap_in(out_dir, run_dir)
    dist.barrier()
    return results


# ---------------------------------------------------------------------------------------------- building blocks
def build_napg(cfg: dict[str, Any], device: torch.device, init_state: dict[str, Any] | None = None) -> NAPG:
    """Network, discriminators (not in step 0) and optimisers of a stage, ready on ``device``."""
    model = NAPGNet(num_classes=cfg["num_classes"], prototypes_per_class=max(cfg["clusters"]),
                    backbone=cfg["backbone"], pretrained=cfg["pretrained"] if init_state is None else None,
                    shared_similarity=cfg["shared_similarity"], head_impl=cfg["head_impl"],
                    bn_stats=bn_stats_of(cfg)).to(device)
    d1 = d2 = None
    if cfg["stage"] != "step0":
        d1 = FCDiscriminatorHighMask(cfg["num_classes"]).to(device)
        d2 = FCDiscriminatorHighMask(cfg["num_classes"]).to(device)
    if init_state is not None:
        model.load_state_dict(init_state["model"])
        for disc, key in ((d1, "d1"), (d2, "d2")):
            if disc is not None and key in init_state:
                disc.load_state_dict(init_state[key])
    model, d1, d2 = _prepare_modules(model, d1, d2, cfg, device)
    return NAPG(model, d1, d2, cfg)


def bn_stats_of(cfg: dict[str, Any]) -> str:
    """The stage's BatchNorm statistics: step 0 never sees a target image, so it has one set."""
    return "shared" if cfg["stage"] == "step0" else cfg["bn_stats"]


def build_data(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Datasets and loaders of every role; the target's labels are read only for evaluation."""
    root = Path(cfg["data_root"])
    src_dir = resolve_domain(root, cfg["source"])
    common = {"label_format": cfg["label_format"], "normalize": cfg["normalize"], "cache": cfg["cache"]}
    train_tf, eval_tf, strong_tf = build_transforms(cfg)
    src_train = SegmentationFolder(src_dir, "train", transform=train_tf, **common)
    if not cfg["proto_ignore_index"] and src_train.meta.get("labels") == "eroded":
        raise UserError(f"the legacy prototype NLL has no ignore index (as released), but {src_dir} holds eroded "
                        f"labels whose class borders are ignored pixels; prepare the source with "
                        f"tools/prepare_isprs.py --labels full, or pass --proto-ignore-index true")
    src_refresh = SegmentationFolder(src_dir, "train", transform=eval_tf, **common)
    seed, bs, ebs = cfg["seed"], cfg["batch_size"], cfg["eval_batch_size"]
    # Workers stay alive between passes (the refresh and evaluation loaders are read every epoch).
    loader_kw = {"num_workers": cfg["num_workers"], "pin_memory": device.type == "cuda",
                 "persistent_workers": cfg["num_workers"] > 0}
    data: dict[str, Any] = {
        "source": BatchStream(src_train, bs, seed=seed, **loader_kw),
        "source_refresh": shuffled_loader(src_refresh, ebs, seed, **loader_kw) if cfg["refresh"] == "legacy"
        else eval_loader(src_refresh, ebs, **loader_kw),
        "source_val": eval_loader(SegmentationFolder(src_dir, "val", transform=eval_tf, **common), ebs, **loader_kw),
        "target": None, "target_refresh": None, "target_val": None,
    }
    if cfg["stage"] != "step0" or cfg["target"]:
        tgt_dir = resolve_domain(root, cfg["target"])
        tgt_tf = strong_tf if cfg["stage"] == "step3" else train_tf
        tgt_train = SegmentationFolder(tgt_dir, "train", transform=tgt_tf, with_labels=False, **common)
        tgt_refresh = SegmentationFolder(tgt_dir, "train", transform=eval_tf, with_labels=False, **common)
        tgt_val = SegmentationFolder(tgt_dir, cfg["target_eval_split"], transform=eval_tf, **common)
        data["target"] = BatchStream(tgt_train, bs, seed=seed + 1, **loader_kw)
        data["target_refresh"] = eval_loader(tgt_refresh, ebs, **loader_kw)
        data["target_val"] = eval_loader(tgt_val, ebs, **loader_kw)
    return data


def _iters_per_epoch(cfg: dict[str, Any], data: dict[str, Any]) -> int:
    role = "target" if cfg["stage"] == "step3" else "source"
    n = data[role].batches_per_pass - int(cfg["legacy_epoch_length"])  # the released loops: len(loader) - 1
    if n < 1:
        raise UserError(f"--legacy-epoch-length leaves no iteration: the {role} data fill only one batch of "
                        f"{cfg['batch_size']}; lower --batch-size or pass --legacy-epoch-length false")
    return min(n, cfg["iters_per_epoch"]) if cfg["iters_per_epoch"] else n


def _prepare_modules(model, d1, d2, cfg: dict[str, Any], device: torch.device):
    """Memory format, SyncBatchNorm, DistributedDataParallel and torch.compile, as configured."""
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if dist.is_dist():
        if cfg["sync_bn"]:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
        if d1 is not None:
            d1 = DistributedDataParallel(d1, device_ids=ids)
            d2 = DistributedDataParallel(d2, device_ids=ids)
    if cfg["compile"]:
        model = torch.compile(model)
    return model, d1, d2


# ---------------------------------------------------------------------------------------------- steps
def train_iteration(napg: NAPG, data: dict[str, Any], protos: RefreshResult, epoch: int,
                     tau: float | None) -> dict[str, float]:
    """One iteration; also logs how much of it was spent waiting for data."""
    start = time.perf_counter()
    src = next(data["source"])
    tgt = next(data["target"]) if data["target"] is not None and napg.uses_target else None
    data_time = time.perf_counter() - start
    if napg.stage == "step3":
        student_protos = protos.target if protos.target is not None else protos.source_target
        logs = napg.distill_step(src, tgt, protos.source_target, student_protos)
    else:
        logs = napg.train_step(src, tgt, protos.source_target, epoch, tau)
    iter_time = time.perf_counter() - start
    logs.update(iter_time=iter_time, data_time_fraction=data_time / max(iter_time, 1e-9))
    return logs


def refresh(napg: NAPG, data: dict[str, Any], cfg: dict[str, Any], tau: float | None,
            previous: RefreshResult | None, device: torch.device,
            max_batches: int | None = None, epoch: int = 1) -> RefreshResult:
    """The prototype refresh before ``epoch`` (``max_batches`` overrides the config's cap)."""
    # Prototypes come from the network being trained (in step 3 the student, as in the original).
    model = _unwrap(napg.model)
    set_epoch = getattr(getattr(data["source_refresh"], "sampler", None), "set_epoch", None)
    if set_epoch is not None:  # the legacy refresh's shuffled source loader: a new order every epoch
        set_epoch(epoch)
    clusters = cfg["clusters"]
    kwargs = {"backend": cfg["kmeans_backend"], "n_init": cfg["kmeans_n_init"], "seed": cfg["kmeans_seed"]}
    return refresh_prototypes(model, data["source_refresh"], data["target_refresh"], tau, clusters, device,
                              previous=previous, mode=cfg["refresh"],
                              max_batches=max_batches if max_batches is not None else cfg["refresh_max_batches"],
                              cluster_kwargs=kwargs, amp=cfg["amp"],
                              auto_k=(cfg["auto_k_max"], cfg["auto_k_threshold"]) if cfg["auto_k"] else None,
                              balance=cfg["refresh_balance"], seed=cfg["kmeans_seed"])


def _log_refresh(logger: RunLogger, step: int, epoch: int, tau: float | None, protos: RefreshResult) -> None:
    values = {f"count_{name}": n for name, n in zip(CLASS_NAMES, protos.counts_source_target)}
    values.update({f"count_target_{name}": n for name, n in zip(CLASS_NAMES, protos.counts_target)})
    values.update({f"k_{name}": k for name, k in zip(CLASS_NAMES, protos.clusters)})
    for domain, sizes in protos.pool_sizes.items():  # before balancing
        values.update({f"pool_{domain}_{name}": n for name, n in zip(CLASS_NAMES, sizes)})
    values["tau"] = tau if tau is not None else float("nan")
    logger.scalars(step, values, prefix="prototypes/", epoch=epoch, kind="refresh",
                   kept_previous=[CLASS_NAMES[c] for c in protos.kept_previous])
    if protos.kept_previous:
        names = ", ".join(CLASS_NAMES[c] for c in protos.kept_previous)
        tqdm.write(f"epoch {epoch}: no samples of {names}; kept their previous prototypes")


# ---------------------------------------------------------------------------------------------- evaluation
def _eval_prototypes(protos: RefreshResult) -> torch.Tensor:
    return protos.target if protos.target is not None else protos.source_target


def evaluate_stage(napg: NAPG, data: dict[str, Any], protos: RefreshResult,
                   cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Target-val and source-val metrics of both branches, each domain with its own BN statistics.

    Returns ``{"target_val": {branch: metrics}, "source_val": {...}}`` (a role without data is left out).
    The target is evaluated with the target prototypes P_T once they exist, the source with P_ST.
    """
    device = protos.source_target.device
    results = {}
    for role, domain, prototypes in (("target_val", "target", _eval_prototypes(protos)),
                                     ("source_val", "source", protos.source_target)):
        if data[role] is not None:
            results[role] = evaluate(_unwrap(napg.model), data[role], prototypes, device, cfg["num_classes"],
                                     max_batches=cfg["eval_max_batches"], amp=cfg["amp"], domain=domain)
    return results


def _evaluate_and_log(napg: NAPG, data: dict[str, Any], protos: RefreshResult, cfg: dict[str, Any],
                      logger: RunLogger, step: int, epoch: int, run_dir: Path,
                      best: dict[str, Any] | None) -> dict[str, Any] | None:
    if data["target_val"] is None:
        return best
    all_results = evaluate_stage(napg, data, protos, cfg)
    for role, results in all_results.items():
        prefix = "eval" if role == "target_val" else "eval_source"
        for branch, m in results.items():
            values = {k: m[k] for k in ("miou", "mf1", "oa", "miou5", "mf1_5")}
            values.update({f"iou_{n}": v for n, v in zip(CLASS_NAMES, m["iou"])})
            logger.scalars(step, values, prefix=f"{prefix}/{branch}/", epoch=epoch, kind="eval", split=role)
    if dist.is_main():
        _log_panels(napg, data, protos, logger, step, protos.source_target.device)
    results = all_results["target_val"]
    source_miou = all_results["source_val"]["classifier"]["miou"]
    tqdm.write(f"{cfg['stage']} epoch {epoch}: target-{cfg['target_eval_split']} mIoU "
               f"{100 * results['classifier']['miou']:.2f} (prototypes "
               f"{100 * results.get('prototype', {}).get('miou', float('nan')):.2f}), source-val mIoU "
               f"{100 * source_miou:.2f}")
    if cfg["select_on_target_val"] and dist.is_main():
        miou = results["classifier"]["miou"]
        if best is None or miou > best["miou"]:
            best = {"miou": miou, "epoch": epoch, "step": step}
            _save_handoff(run_dir / "best.pt", napg, protos, cfg, epoch,
                          selected_on="target-val mIoU (oracle selection)", target_val=results)
    return best


@torch.no_grad()
def _log_panels(napg: NAPG, data: dict[str, Any], protos: RefreshResult, logger: RunLogger, step: int,
                device: torch.device) -> None:
    """Input, ground truth, prediction and entropy of the first source and target-val patches."""
    model = _unwrap(napg.model)
    was_training = model.training
    model.eval()
    for tag, dataset in (("source", data["source_refresh"].dataset),
                         ("target", data["target_val"].dataset if data["target_val"] is not None else None)):
        if dataset is None:
            continue
        sample = dataset[0]
        pred, entropy = predict_patch(model, sample["img"], _eval_prototypes(protos), device, tag)
        logger.image(f"panels/{tag}", step, panel(sample["img"], sample.get("label"), pred, entropy))
    model.train(was_training)


# ---------------------------------------------------------------------------------------------- run folder
def _check_run_dir(run_dir: Path, cfg: dict[str, Any]) -> tuple[Path, bool]:
    """The folder this invocation trains in, and whether it resumes there; refuses to touch finished work.

    ``--overwrite`` of a folder holding a checkpoint trains in a staging folder (``<stage>.new``) that
    replaces the old run only once the new one is finished, so no failure of the new run loses the old
    one; ``--resume`` continues such an interrupted replacement. A folder without a checkpoint was never
    trained (killed or stopped by an error early): it is simply started again.
    """
    _complete_swap(run_dir)
    staging = staging_dir(run_dir)
    finished = (run_dir / "manifest.json").exists()
    has_checkpoint = (run_dir / "last.pt").exists()
    if cfg["resume"]:
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
        if cfg["overwrite"]:
            return staging, False
        what = "a finished" if finished else "an unfinished"
        hint = "" if finished else " continue it with --resume, or"
        if (staging / "last.pt").exists():
            hint = f" continue the interrupted replacement in {staging} with --resume, or"
        raise UserError(f"{run_dir} holds {what} {cfg['stage']} run;{hint} pass --overwrite to replace it, "
                        f"or choose another --work-dir")
    return run_dir, False


def _swap_in(staging: Path, run_dir: Path) -> None:
    """Replace ``run_dir`` by the finished run in ``staging`` (two renames; see :func:`_complete_swap`)."""
    old = run_dir.with_name(run_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if run_dir.exists():
        run_dir.rename(old)
    staging.rename(run_dir)
    if old.exists():
        shutil.rmtree(old)


def _complete_swap(run_dir: Path) -> None:
    """Finish a :func:`_swap_in` that a crash cut short between its renames."""
    staging = staging_dir(run_dir)
    if dist.is_main() and (staging / "manifest.json").exists() and not run_dir.exists():
        _swap_in(staging, run_dir)
    dist.barrier()


def _clear_untrained(folder: Path, staging: bool) -> None:
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


def _diverged_message(err: NonFiniteError, cfg: dict[str, Any], epoch: int, iteration: int, out_dir: Path) -> str:
    last = out_dir / "last.pt"
    kept = f"{last} keeps the last good state" if last.exists() else "no checkpoint was written yet"
    again = "continue with --resume" if last.exists() else "start it again"
    amp = "" if cfg["amp"] == "off" else ", or use --amp off"
    return (f"{cfg['stage']} diverged at epoch {epoch}, iteration {iteration}: {err} is not finite; stopped, {kept}. "
            f"Lower --lr (now {cfg['lr']}) or --lr-d (now {cfg['lr_d']}){amp}, and {again}")


def _save_last(run_dir: Path, napg: NAPG, protos: RefreshResult, data: dict[str, Any], epoch: int, iteration: int,
               global_step: int, best: dict[str, Any] | None, cfg: dict[str, Any]) -> None:
    """Everything needed to continue exactly here: weights, optimisers, prototypes, RNG, data position."""
    if not dist.is_main():
        return
    state = napg.state_dict()
    state.update(epoch=epoch, iteration=iteration, global_step=global_step, best=best, rng=rng_state(),
                 prototypes=_protos_state(protos), config=dict(cfg),
                 streams={k: data[k].state_dict() for k in ("source", "target") if data[k] is not None})
    save_checkpoint(state, run_dir / "last.pt")


def _resume(run_dir: Path, cfg: dict[str, Any], napg: NAPG, data: dict[str, Any], device: torch.device):
    state = load_checkpoint(run_dir / "last.pt", map_location=device)
    saved = state.get("config", {})
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != cfg[k]]
    if changed:
        raise UserError(f"--resume with different {', '.join(changed)} than the interrupted run "
                        f"({', '.join(f'{k}={saved[k]}' for k in changed)})")
    napg.load_state_dict(state)
    for key, stream_state in state["streams"].items():
        data[key].load_state_dict(stream_state)
    set_rng_state(state["rng"])
    p = state["prototypes"]
    protos = RefreshResult(p["source_target"].to(device), None if p["target"] is None else p["target"].to(device),
                           p["counts_source_target"], p["counts_target"], p["kept_previous"], p["clusters"])
    return state["epoch"], state["iteration"], state["global_step"], protos, state["best"]


def _protos_state(protos: RefreshResult) -> dict[str, Any]:
    return {"source_target": protos.source_target, "target": protos.target,
            "counts_source_target": protos.counts_source_target, "counts_target": protos.counts_target,
            "kept_previous": protos.kept_previous, "clusters": protos.clusters}


def _save_handoff(path: Path, napg: NAPG, protos: RefreshResult, cfg: dict[str, Any], epoch: int,
                  **extra: Any) -> None:
    meta = handoff_meta(stage=cfg["stage"], source=cfg["source"], target=cfg["target"],
                        num_classes=cfg["num_classes"], backbone=cfg["backbone"],
                        shared_similarity=cfg["shared_similarity"], clusters=protos.clusters,
                        bn_stats=bn_stats_of(cfg), normalize=cfg["normalize"], epoch=epoch,
                        input_scale=_input_scale(cfg), **extra)
    d1, d2 = (None if d is None else _unwrap(d) for d in (napg.d1, napg.d2))
    save_handoff(path, _unwrap(napg.model), d1, d2, _protos_state(protos), meta)


def _input_scale(cfg: dict[str, Any]) -> float:
    """Network px per image px the weights were trained at: --resize over the source patch side."""
    if not cfg["resize"]:
        return 1.0
    # Folders without meta.json come from mmseg's converters, which cut 512 px patches.
    side = read_meta(resolve_domain(Path(cfg["data_root"]), cfg["source"])).get("clip", 512)
    return cfg["resize"] / side


def _finish(run_dir: Path, napg: NAPG, protos: RefreshResult, data: dict[str, Any], cfg: dict[str, Any],
            init_source: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """Final evaluation, hand-off checkpoint and the manifest that marks the stage complete."""
    all_results = evaluate_stage(napg, data, protos, cfg)
    results = all_results.get("target_val", {})
    ranks = _rank_consistency(napg, protos)
    if dist.is_main():
        _save_handoff(run_dir / "model.pt", napg, protos, cfg, cfg["epochs"])
        write_json(run_dir / "eval.json", {"split": f"target-{cfg['target_eval_split']}", "selection": "last",
                                           **results, "source_val": all_results["source_val"]})
        manifest = {"stage": cfg["stage"], "source": cfg["source"], "target": cfg["target"],
                    "num_classes": cfg["num_classes"], "backbone": cfg["backbone"],
                    "prototypes_per_class": max(protos.clusters), "clusters": protos.clusters,
                    "preset": cfg["preset"], "epochs": cfg["epochs"], "git": environment_info()["git"],
                    "checkpoint": "model.pt", "checkpoint_sha256": sha256_file(run_dir / "model.pt"),
                    "init": init_source, "train_seconds": round(seconds, 1), "ranks": ranks,
                    "bn_stats": bn_stats_of(cfg),
                    **{role: {b: {k: m[k] for k in ("miou", "mf1", "oa", "miou5", "mf1_5")} for b, m in res.items()}
                       for role, res in all_results.items()}}
        write_json(run_dir / "manifest.json", manifest)
        if results:
            _write_pictures(run_dir, napg, data, protos, cfg, results["classifier"]["confusion"])
            print(f"{cfg['stage']} target-{cfg['target_eval_split']} (classifier):")
            print(format_table(results["classifier"], CLASS_NAMES))
        source_miou = all_results["source_val"]["classifier"]["miou"]
        print(f"{cfg['stage']} source-val mIoU (classifier): {100 * source_miou:.2f}")
    dist.barrier()
    return results


def _write_pictures(run_dir: Path, napg: NAPG, data: dict[str, Any], protos: RefreshResult, cfg: dict[str, Any],
                    confusion: list[list[int]]) -> None:
    """confusion.png and panels.png of the final target evaluation, also logged to TensorBoard (``final/``)."""
    pictures = write_stage_pictures(run_dir, _unwrap(napg.model), data["target_val"].dataset, _eval_prototypes(protos),
                                    protos.source_target.device, confusion,
                                    f"{cfg['stage']} target-{cfg['target_eval_split']} (rows sum to 1)")
    logger = RunLogger(run_dir)
    for name, rgb in pictures.items():
        logger.image(f"final/{name}", cfg["epochs"], rgb)
    logger.close()


def _rank_consistency(napg: NAPG, protos: RefreshResult) -> dict[str, Any]:
    """Whether every rank ends with bit-identical parameters and prototypes (checksums compared)."""
    if not dist.is_dist():
        return {"world_size": 1}

    def checksum(tensors: list[torch.Tensor]) -> torch.Tensor:
        sums = [torch.stack([t.double().sum(), (t.double() ** 2).sum(),
                             (t.double().flatten() * torch.arange(t.numel(), device=t.device)).sum()])
                for t in tensors]
        return torch.cat(sums)

    nets = [m for m in (napg.model, napg.d1, napg.d2) if m is not None]
    params = checksum([p.detach() for m in nets for p in _unwrap(m).parameters()])
    prototypes = checksum([t for t in (protos.source_target, protos.target) if t is not None])
    result = {"world_size": dist.world_size()}
    for name, local in (("identical_parameters", params), ("identical_prototypes", prototypes)):
        gathered = [torch.empty_like(local) for _ in range(dist.world_size())]
        torch.distributed.all_gather(gathered, local)
        result[name] = all(torch.equal(g, gathered[0]) for g in gathered)
    return result
