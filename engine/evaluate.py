"""Evaluation of the classifier and the prototype branch over a whole split, and of a hand-off checkpoint
on any prepared domain (:func:`evaluate_checkpoint`, what tools/evaluate.py and tools/validity.py call)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.benchmarks import Benchmark, benchmark_of
from data.checks import SplitUse, check_data
from data.dataset import SegmentationFolder
from data.domains import data_benchmark, domain_bands, resolve_domain
from data.loaders import build_loader
from data.preprocess import to_model_input
from data.transforms import Resize
from engine.device import amp_dtype, autocast
from engine.handoff import handoff_file, handoff_network, load_handoff, trained_bands
from engine.inference import SlideConfig, predict_image
from engine.refresh import RefreshResult
from models.labels import resize_labels
from utils import dist
from utils.errors import UserError
from utils.metrics import PROTOCOLS, ConfusionMatrix
from utils.run import resolve_device


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, Any]], prototypes: torch.Tensor | None,
             device: torch.device, num_classes: int = 6, protocol: str = "standard",
             max_batches: int | None = None, amp: str = "off", domain: str = "target",
             normalize: str = "unit") -> dict[str, dict[str, Any]]:
    """Global confusion matrices of the classifier (and, given prototypes, the prototype branch).

    ``standard``: both branches' maps are bilinearly upsampled to the label resolution [H, W] and every
    patch of the split counts. ``napg_legacy``: the original protocol, classifier argmax at H/4 and
    prototype argmax at H/16 against nearest-downsampled labels, the last batch left out, IoU + 1.
    ``domain`` ("source" or "target") picks the BatchNorm statistics of a ``--bn-stats domain`` network;
    ``normalize`` is the network's input normalisation, applied to uint8 batches (``data.preprocess``).
    Returns ``{"classifier": metrics, "prototype": metrics}`` (``prototype`` only with prototypes); the
    classifier's also hold its ``confusion`` counts [C][C] (rows = ground truth).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}")
    cm_cls = ConfusionMatrix(num_classes)
    cm_proto = ConfusionMatrix(num_classes) if prototypes is not None else None
    with model.evaluating(domain):
        for batch in list_batches(loader, protocol, max_batches):
            x = to_model_input(batch["img"], device, normalize)
            y = batch["label"].to(device, non_blocking=True)
            with autocast(device, amp_dtype(amp)):
                out = model(x, prototypes)
            if protocol == "standard":
                full = y.shape[-2:]
                cm_cls.update(upsampled_argmax(out["logits_up"], full), y)
                if cm_proto is not None:
                    cm_proto.update(upsampled_argmax(out["proto_prob"], full), y)
            else:
                logits_up = out["logits_up"].float()
                cm_cls.update(logits_up.argmax(1), resize_labels(y, logits_up.shape[-2:]))
                if cm_proto is not None:
                    prob = out["proto_prob"].float()
                    cm_proto.update(prob.argmax(1), resize_labels(y, prob.shape[-2:]))
    if not cm_cls.matrix.sum() and not dist.is_dist():
        hint = " (napg_legacy leaves out the last batch: lower the batch size)" if protocol == "napg_legacy" else ""
        raise UserError(f"no labelled pixels were evaluated{hint}")
    for cm in (cm_cls, cm_proto):
        if cm is not None:
            cm.all_reduce()
    results = {"classifier": {**cm_cls.compute(protocol=protocol), "confusion": cm_cls.matrix.tolist()}}
    if cm_proto is not None:
        results["prototype"] = cm_proto.compute(protocol=protocol)
    return results


@torch.no_grad()
def evaluate_tiles(model: nn.Module, tiles: Iterable[tuple[torch.Tensor, torch.Tensor]], cfg: SlideConfig,
                   device: torch.device, num_classes: int = 6) -> dict[str, dict[str, Any]]:
    """Sliding-window metrics of the classifier over whole tiles, one confusion matrix for all of them.

    ``tiles`` yields (image [3, H, W] uint8 or float network input, train-id label [H, W]); the prediction is
    made at the label's full resolution (see ``engine.inference``). Returns ``{"classifier": metrics}``.
    """
    cm = ConfusionMatrix(num_classes)
    for image, label in tiles:
        cm.update(torch.from_numpy(predict_image(model, image, cfg, device).classes), label)
    if not cm.matrix.sum():
        raise UserError("no labelled pixels were evaluated")
    return {"classifier": cm.compute()}


def list_batches(loader: Iterable[dict[str, Any]], protocol: str, max_batches: int | None):
    """The batches an evaluation sees: all of them, or (legacy) all but the last."""
    limit = max_batches
    if protocol == "napg_legacy":
        n = len(loader) - 1  # the original evaluates len(loader) - 1 batches
        limit = n if limit is None else min(limit, n)
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        yield batch


def upsampled_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """argmax over classes of ``scores`` [B, C, h, w] bilinearly resized to ``size``: [B, H, W]."""
    if scores.shape[-2:] != size:
        scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
    return scores.argmax(1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, domain: str = "target",
                   amp: str = "off") -> int:
    """Re-estimate ``domain``'s BatchNorm running statistics on ``loader``'s images (AdaBN, Li et al. 2017).

    The statistics are reset and replaced by their cumulative average over every batch (labels are not
    read); weights do not change. Batches of one image are skipped (BatchNorm on the ASPP's 1x1
    pooled map needs two). Returns the number of images used.
    """
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in batchnorms]
    was_training = model.training
    used = 0
    with model.domain(domain):
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None  # None = cumulative moving average: every batch weighs the same
        model.train()
        try:
            for batch in loader:
                x = batch["img"]
                if len(x) < 2:
                    continue
                with autocast(device, amp_dtype(amp)):
                    model(x.to(device, non_blocking=True))
                used += len(x)
        finally:
            for bn, momentum in zip(batchnorms, momenta):
                bn.momentum = momentum
            model.train(was_training)
    if used == 0:
        raise UserError("BatchNorm re-estimation needs batches of at least 2 images; raise the batch size")
    return used


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class LoadedCheckpoint:
    """A hand-off checkpoint's network, rebuilt to evaluate one domain."""

    path: Path  # the checkpoint file read
    state: dict[str, Any]  # as ``load_handoff`` returns it
    model: nn.Module
    device: torch.device
    bn_domain: str  # "source" or "target": the BatchNorm statistics that evaluate the domain
    bn: str  # those statistics, in words


@dataclass(frozen=True)
class CheckpointScores:
    """What :func:`evaluate_checkpoint` measured, and how."""

    results: dict[str, dict[str, Any]]  # {"classifier": metrics, "prototype": metrics} (see :func:`evaluate`)
    checkpoint: Path
    mode: str  # "patch", or the sliding-window settings
    bn: str  # the BatchNorm statistics used, in words
    benchmark: Benchmark  # the checkpoint's: its classes by train id, and which means it reports
    recalibrated_bn: dict[str, Any] | None = None  # {"split": "train", "images": n} after re-estimation


def load_for_evaluation(checkpoint: str | Path, data_root: str | Path | None, domain: str, device: str = "auto",
                        bn_domain: str = "auto") -> LoadedCheckpoint:
    """Read ``checkpoint`` (a file or a finished run folder) and rebuild its network on ``device``.

    ``bn_domain`` "auto" evaluates the checkpoint's target domain with its target BatchNorm statistics and
    any other domain with its source statistics (for a ``--bn-stats domain`` network).
    """
    path = handoff_file(checkpoint, "--checkpoint")
    state = load_handoff(path, flag="--checkpoint")
    meta = state["meta"]
    torch_device = resolve_device(device)
    model = handoff_network(state, torch_device)
    if bn_domain == "auto":
        bn_domain = "target" if _is_target(meta, data_root, domain) else "source"
    bn = f"{bn_domain} BatchNorm statistics" if meta["bn_stats"] == "domain" else "shared BatchNorm statistics"
    return LoadedCheckpoint(path, state, model, torch_device, bn_domain, bn)


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, domain: str, *, split: str = "val",
                        batch_size: int = 8, num_workers: int = 2, resize: int | None = None,
                        recalibrate: bool = False, protocol: str = "standard", prototypes: str = "auto",
                        label_format: str | None = None, normalize: str | None = None, bn_domain: str = "auto",
                        device: str = "auto", allow_band_mismatch: bool = False) -> CheckpointScores:
    """Scores of ``checkpoint`` on the ``split`` patches of the prepared ``domain`` under ``data_root``.

    ``resize`` resizes the patches (default: as the run did, from the checkpoint); ``recalibrate`` first
    re-estimates the BatchNorm statistics on the domain's *train* images (AdaBN; no labels read).
    ``prototypes`` picks the set for the prototype branch: auto (target if present), target, source_target
    or none. ``normalize`` defaults to the checkpoint's, ``bn_domain`` as :func:`load_for_evaluation`. A
    domain whose bands are neither the run's source bands nor its target bands is refused unless
    ``allow_band_mismatch``.
    """
    folder = resolve_domain(Path(data_root), domain)
    loaded = load_for_evaluation(checkpoint, data_root, domain, device, bn_domain)
    meta = loaded.state["meta"]
    check_benchmark(meta, folder)
    check_bands(meta, domain_bands(folder), f"{domain}", allow_band_mismatch)
    resize = resize or meta["resize"]
    uses = [SplitUse(folder, split)] + ([SplitUse(folder, "train", labels=False)] if recalibrate else [])
    check_data(uses, label_format=label_format, resize=resize, batch_size=batch_size, batch_flag="--batch-size",
               window=meta["window"])
    protos = _pick_prototypes(loaded.state.get("prototypes"), prototypes)
    if protos is not None:
        protos = protos.to(loaded.device)
    common = {"label_format": label_format, "normalize": normalize or meta["normalize"],
              "transform": Resize(resize) if resize else None}
    bn, recalibrated = loaded.bn, None
    if recalibrate:
        train = SegmentationFolder(folder, "train", with_labels=False, **common)
        train_loader = build_loader(train, batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
        used = recalibrate_bn(loaded.model, train_loader, loaded.device, domain=loaded.bn_domain)
        recalibrated = {"split": "train", "images": used}
        bn += f", re-estimated on {used} {domain}/train images"
    dataset = SegmentationFolder(folder, split, **common)
    loader = build_loader(dataset, batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
    results = evaluate(loaded.model, loader, protos, loaded.device, meta["num_classes"], protocol=protocol,
                       domain=loaded.bn_domain)
    mode = f"patch (resized to {resize})" if resize else "patch"
    return CheckpointScores(results, loaded.path, mode, bn, benchmark_of(meta), recalibrated)


def check_benchmark(meta: dict, folder: Path) -> None:
    """Refuse data of another benchmark (another class list) than the checkpoint's."""
    data, ours = data_benchmark(folder.parent, str(folder)), benchmark_of(meta)
    if data.name != ours.name or meta["num_classes"] != data.num_classes:
        raise UserError(f"the checkpoint segments the {meta['num_classes']} {ours.name} classes, {folder} holds "
                        f"{data.name} labels ({data.num_classes} classes); evaluate it on data of its benchmark")


def check_bands(meta: dict, bands: list[str] | None, what: str, allow: bool) -> None:
    """Refuse images whose bands the checkpoint's run never saw (e.g. an IRRG-only model on RGB tiles)."""
    seen = trained_bands(meta)
    if allow or bands is None or not seen or bands in seen:
        return
    trained = " and ".join(",".join(b) for b in seen)
    raise UserError(f"the checkpoint was trained on {trained} images, {what} holds {','.join(bands)}; use data with "
                    f"those bands, or pass --allow-band-mismatch to score it anyway")


def _is_target(meta: dict, data_root: str | Path | None, domain: str) -> bool:
    """Whether ``domain`` is the checkpoint's target domain (same folder, or same name when unresolvable)."""
    if meta.get("target") is None:
        return False
    try:
        return resolve_domain(data_root, meta["target"]) == resolve_domain(data_root, domain)
    except UserError:
        return str(meta["target"]) == str(domain)


def _pick_prototypes(protos: dict | None, which: str) -> torch.Tensor | None:
    if not protos or which == "none":
        return None
    if which == "auto":
        return RefreshResult.from_state(protos, torch.device("cpu")).for_target
    if protos.get(which) is None:
        raise UserError(f"the checkpoint has no '{which}' prototypes (use --prototypes auto)")
    return protos[which]
