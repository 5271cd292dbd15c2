"""Step 0, source only: the supervised losses on labelled source batches, no adaptation (docs/method.md §5)."""

from __future__ import annotations

import torch
from torch import nn

from engine.methods.base import Batch, Logs, Method
from engine.refresh import RefreshResult
from losses import classifier_ce, gnce_loss, prototype_nll
from models.labels import resize_labels
from utils.config import Config


class SourceOnly(Method):
    """w_ce·L_ce + w_proto·L_p (+ w_gnce·L_GNCE on the source, when configured) on the source (§4.1, §4.2,
    §4.5), with the prototypes P_ST of the epoch's refresh."""

    prototype_nll = True
    options = ("w_ce", "w_proto", "w_gnce", "gnce_start_epoch", "gnce_windows")

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        super().__init__(model, d1, d2, cfg)
        self.w_ce, self.w_proto = cfg.w_ce, cfg.w_proto
        # Without an ignore index (legacy) a 255 label would index out of range: the data pipeline rejects
        # such labels (data.transforms.RejectIgnored), so the step need not look at them.
        self.proto_ignore_index = 255 if cfg.proto_ignore_index else None
        self.gnce_weight_at = cfg.gnce_weight_at  # epoch -> weight: 0 before --gnce-start-epoch (§5)
        self.gnce_windows = cfg.gnce_windows

    def train_step(self, src: Batch, tgt: Batch | None, protos: RefreshResult, epoch: int) -> Logs:
        """One iteration on a source batch (``img`` [B, 3, H, W], ``label`` [B, H, W]); ``tgt`` is not read."""
        logs: Logs = {}
        # 1. Source forward and the supervised losses.
        loss, _ = self.source_losses(src, protos.source_target, epoch, logs)
        # 2. Backward and the optimiser step.
        self.backward(loss, logs)
        self.step_segmenter()
        return logs

    def source_losses(self, src: Batch, prototypes: torch.Tensor, epoch: int,
                      logs: Logs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The network on the source batch and its supervised loss; returns (loss, the network's outputs)."""
        x_s, y_s = self.images(src), self.labels(src)
        out_s = self.forward(self.model, x_s, prototypes, "source")
        # Classifier CE at H/4 and prototype NLL at the features' H/16, against nearest-downsampled labels.
        y_up = resize_labels(y_s, out_s["logits_up"].shape[-2:])
        y_feat = resize_labels(y_s, out_s["features"].shape[-2:])
        loss_ce = classifier_ce(out_s["logits_up"].float(), y_up)
        loss_proto = prototype_nll(out_s["proto_prob"].float(), y_feat, ignore_index=self.proto_ignore_index)
        loss = self.w_ce * loss_ce + self.w_proto * loss_proto
        logs.update(loss_ce=loss_ce.detach(), loss_proto=loss_proto.detach())
        # GNCE: neighbouring features agree where the prototype similarities do (§4.5).
        w_gnce = self.gnce_weight_at(epoch)
        if w_gnce > 0:
            loss_gnce = gnce_loss(out_s["proto_max"].float(), out_s["features"].float(), self.gnce_windows)
            logs["loss_gnce_src"] = loss_gnce.detach()
            loss = loss + w_gnce * loss_gnce
        return loss, out_s
