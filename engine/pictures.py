"""What a finished stage or pipeline shows: the confusion matrix and panels of fixed target-val patches.

The panels always use the first ``PANEL_PATCHES`` patches of the split (sorted names), so the pictures
of different stages and runs show the same places.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.dataset import SegmentationFolder
from data.domains import resolve_domain
from data.preprocess import to_model_input
from engine.build import build_transforms
from engine.handoff import handoff_network, handoff_prototypes, load_handoff
from engine.logger import colorize, image_rgb, panel
from losses import self_information
from utils.checkpoint import atomic_write_bytes
from utils.config import Config, load_config
from utils.plots import can_draw, confusion_rgb, image_png

PANEL_PATCHES = 4


@torch.no_grad()
def predict_patch(model: nn.Module, img: torch.Tensor, prototypes: torch.Tensor | None, device: torch.device,
                  domain: str, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction [H, W] and normalised entropy [H, W] of one patch ``img`` [3, H, W] (uint8 or network input),
    in eval mode with ``domain``'s BatchNorm statistics."""
    with model.evaluating(domain):
        out = model(to_model_input(img[None], device, normalize), prototypes)
    prob = F.interpolate(out["logits_up"].float(), size=img.shape[-2:], mode="bilinear",
                         align_corners=False).softmax(1)
    return prob.argmax(1)[0].cpu(), self_information(prob).sum(1)[0].cpu()


@torch.no_grad()
def panel_rows(model: nn.Module, dataset: SegmentationFolder, prototypes: torch.Tensor | None, device: torch.device,
               normalize: str, domain: str = "target", count: int = PANEL_PATCHES) -> np.ndarray:
    """Input | ground truth | prediction | entropy of the first ``count`` patches, one row each: [H*n, 4W, 3]."""
    rows = []
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        pred, entropy = predict_patch(model, sample["img"], prototypes, device, domain, normalize)
        rows.append(panel(sample["img"], sample.get("label"), pred, entropy, dataset.benchmark.palette_array))
    return np.concatenate(rows, axis=0)


def write_stage_pictures(run_dir: Path, model: nn.Module, dataset: SegmentationFolder, prototypes: torch.Tensor | None,
                         device: torch.device, normalize: str, confusion: list[list[int]],
                         title: str) -> dict[str, np.ndarray]:
    """Write ``confusion.png`` (row-normalised) and ``panels.png`` into ``run_dir``; returns them as RGB arrays.

    The panels need only NumPy; without matplotlib the confusion picture is skipped with a one-line note.
    """
    pictures = {}
    if can_draw("confusion.png"):
        pictures["confusion"] = confusion_rgb(np.array(confusion), dataset.benchmark.classes, title)
    pictures["panels"] = panel_rows(model, dataset, prototypes, device, normalize)
    for name, rgb in pictures.items():
        atomic_write_bytes(run_dir / f"{name}.png", image_png(rgb))
    return pictures


def target_val_dataset(cfg: Config) -> SegmentationFolder:
    """The target evaluation split of a stage's resolved config, read as the stage read it."""
    folder = resolve_domain(Path(cfg.data_root), cfg.target)
    return SegmentationFolder(folder, cfg.target_eval_split, label_format=cfg.label_format,
                              normalize=cfg.normalize, transform=build_transforms(cfg)[1])


def pipeline_panels(stage_dirs: list[Path], device: torch.device) -> np.ndarray:
    """Input | ground truth | one prediction per stage, on the first target-val patches: [H*n, (2+S)W, 3].

    Every stage is read from its ``model.pt`` and ``config.yaml``; the patches are the first stage's.
    """
    cfg = load_config(stage_dirs[0] / "config.yaml")
    dataset = target_val_dataset(cfg)
    samples = [dataset[i] for i in range(min(PANEL_PATCHES, len(dataset)))]
    palette = dataset.benchmark.palette_array
    columns = [[image_rgb(s["img"]) for s in samples], [colorize(s["label"], palette) for s in samples]]
    for stage_dir in stage_dirs:
        state = load_handoff(stage_dir, flag="stage folder")
        model = handoff_network(state, device)
        stored = handoff_prototypes(state, device)
        protos = stored.for_target if stored is not None else None
        columns.append([colorize(predict_patch(model, s["img"], protos, device, "target", cfg.normalize)[0], palette)
                         for s in samples])
    return np.concatenate([np.concatenate(row, axis=1) for row in zip(*columns)], axis=0)
