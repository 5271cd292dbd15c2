"""The hand-off checkpoint (``model.pt``, also ``best.pt``) that a stage passes to the next one.

Every writer and reader goes through this module: the trainer, ``tools/evaluate.py``,
``tools/convert_original_checkpoint.py`` and ``tools/benchmark.py``. Schema (``torch.save`` of a dict,
read back with ``weights_only=True``)::

    model       NAPGNet state dict
    d1, d2      discriminator state dicts (absent for step 0 and for a bare original network)
    prototypes  {"source_target": P_ST [C*K, 128], "target": P_T [C*K, 128] or None,
                 "counts_source_target", "counts_target", "kept_previous", "clusters"},
                or None (converted original checkpoints: the original never saved its prototypes)
    meta        see :func:`handoff_meta`; ``stage`` is step0..step3, or "original" for a converted one
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.refresh import RefreshResult
from models import NAPGNet
from utils.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from utils.config import Config
from utils.errors import UserError
from utils.stages import ORIGINAL, STAGES

# meta fields that older checkpoints may lack, with the value they were written under.
# ``input_scale``: image px -> network px the weights were trained at (patches resized by --resize);
# ``resize``: that --resize (None: patches as they are); ``bands``: {"source": [...], "target": [...]}, the
# bands of the run's domains in the network's three input channels, e.g. ["NIR", "R", "G"] (None: not recorded);
# ``window``: the network's --window (None: inputs whole).
META_DEFAULTS = {"shared_similarity": True, "bn_stats": "shared", "normalize": "unit", "input_scale": 1.0,
                 "resize": None, "bands": None, "window": None}


def handoff_meta(*, stage: str, source: str | None, target: str | None, num_classes: int, backbone: str,
                 shared_similarity: bool, clusters: list[int] | None, bn_stats: str, normalize: str,
                 epoch: int | None, **extra: Any) -> dict[str, Any]:
    """The ``meta`` dict: what a later stage or the evaluation tool needs to rebuild and check the network.

    ``source``/``target`` name the domain pair (None when unknown, as for a converted original),
    ``clusters`` the K_c per class of the stored prototypes (None without prototypes), ``bn_stats``
    the BatchNorm statistics mode, ``normalize`` the input normalisation the weights were trained with.
    ``extra`` adds ``input_scale``, ``resize``, ``bands`` and ``window`` (see ``META_DEFAULTS``) and
    free-form provenance (oracle selection, conversion report).
    """
    return {"stage": stage, "source": source, "target": target, "num_classes": num_classes, "backbone": backbone,
            "shared_similarity": shared_similarity, "clusters": clusters,
            "prototypes_per_class": max(clusters) if clusters else None, "bn_stats": bn_stats,
            "normalize": normalize, "epoch": epoch, **extra}


def save_handoff(path: Path, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None,
                 prototypes: dict[str, Any] | None, meta: dict[str, Any]) -> None:
    """Write the hand-off checkpoint atomically (``prototypes`` in the schema's form, or None)."""
    state: dict[str, Any] = {"model": model.state_dict(), "prototypes": prototypes, "meta": meta}
    if d1 is not None:
        state["d1"] = d1.state_dict()
    if d2 is not None:
        state["d2"] = d2.state_dict()
    save_checkpoint(state, path)


def trained_bands(meta: dict[str, Any]) -> list[list[str]]:
    """The distinct band lists of the images a checkpoint's run saw (source first; [] when not recorded)."""
    seen: list[list[str]] = []
    for bands in (meta.get("bands") or {}).values():
        if bands and list(bands) not in seen:
            seen.append(list(bands))
    return seen


def handoff_file(path: str | Path, flag: str = "--init") -> Path:
    """``path`` itself, or the model.pt of a finished run folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "manifest.json").exists():
            raise UserError(f"{flag} {path}: no manifest.json, so the run is unfinished or not a stage folder")
        path = path / "model.pt"
    return path


def load_handoff(path: str | Path, expected_stage: str | None = None, flag: str = "--init") -> dict[str, Any]:
    """Read a hand-off checkpoint (a file, or a finished run folder's model.pt) and check its kind.

    ``expected_stage``: the stage that will start from it, which must accept its kind (``Stage.accepts_init``).
    None accepts any stage (evaluation). Missing optional meta fields get ``META_DEFAULTS``.
    Every problem is a one-line UserError that names ``flag``.
    """
    path = handoff_file(path, flag)
    state = load_checkpoint(path)
    meta = state.get("meta")
    if "rng" in state and "streams" in state:  # a run's last.pt: the full training state, not a hand-off
        raise UserError(f"{flag} {path} is a training state for --resume (last.pt); pass the finished stage "
                        f"folder or its model.pt")
    if "model" not in state or not isinstance(meta, dict):
        raise UserError(f"{flag} {path}: not a stage checkpoint of this project (no 'model'/'meta'); original "
                        f"NAPG checkpoints are converted with tools/convert_original_checkpoint.py")
    got = meta.get("stage")
    if got not in {*STAGES, ORIGINAL}:
        raise UserError(f"{flag} {path}: its meta names no stage (written by an older converter?); convert the "
                        f"original checkpoint again with tools/convert_original_checkpoint.py")
    if expected_stage is not None and got not in STAGES[expected_stage].accepts_init:
        want = " or ".join(_kind(s) for s in sorted(STAGES[expected_stage].accepts_init))
        raise UserError(f"{flag} {path} is {_kind(got)}, but {expected_stage} starts from {want}")
    state["meta"] = {**META_DEFAULTS, **meta}
    return state


def _kind(kind: str) -> str:
    """How a message names a checkpoint whose meta says ``kind`` (a stage, or ORIGINAL)."""
    return "a converted original checkpoint" if kind == ORIGINAL else f"a {kind} checkpoint"


def check_fits(state: dict[str, Any], cfg: Config, path: str | Path, flag: str = "--init") -> None:
    """The checkpoint's network must be the one ``cfg`` builds (classes, backbone, similarity convs)."""
    meta = state["meta"]
    for key in ("num_classes", "backbone", "shared_similarity"):
        value = getattr(cfg, key)
        if meta[key] != value:
            raise UserError(f"{flag} {path} was trained with {key}={meta[key]}, this run has {key}={value}; "
                            f"pass --{key.replace('_', '-')} {meta[key]} or another checkpoint")


def resolve_init(cfg: Config) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The checkpoint a stage starts from (``--init``, else the previous stage under ``--work-dir``).

    Returns (state, provenance for env.json/manifest.json), or (None, None) for a fresh start.
    """
    stage, init = cfg.stage, cfg.init
    if init is None:
        expected = STAGES[stage].previous
        if expected is None:
            return None, None
        candidate = Path(cfg.work_dir) / expected
        if not (candidate / "model.pt").exists():
            raise UserError(f"{stage} starts from a finished {expected} run: pass --init <{expected} run folder or "
                            f"checkpoint> (looked for {candidate / 'model.pt'})")
        init = str(candidate)
    path = handoff_file(init)
    state = load_handoff(path, stage)
    check_fits(state, cfg, path)
    return state, {"path": str(path), "sha256": sha256_file(path), "stage": state["meta"]["stage"]}


def handoff_prototypes(state: dict[str, Any] | None, device: torch.device) -> RefreshResult | None:
    """The prototypes stored in a hand-off (None if it has none): the fallback for classes that have no
    sample at the first refresh of the next stage."""
    p = None if state is None else state.get("prototypes")
    return RefreshResult.from_state(p, device) if p else None


def handoff_network(state: dict[str, Any], device: torch.device) -> NAPGNet:
    """The network of a hand-off checkpoint, rebuilt from its meta and loaded, on ``device``."""
    meta = state["meta"]
    model = NAPGNet(num_classes=meta["num_classes"], backbone=meta["backbone"],
                    shared_similarity=meta["shared_similarity"], bn_stats=meta["bn_stats"], window=meta["window"])
    model.load_state_dict(state["model"])
    return model.to(device)
