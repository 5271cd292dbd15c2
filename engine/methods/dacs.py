"""DACS baseline: self-training on ClassMix images with an EMA teacher's pseudo-labels (Tranheden et al.,
WACV 2021), as DAFormer's ``dacs.py`` trains it, without the transformer (docs/method.md, "Baselines")."""

from __future__ import annotations

import torch
from torch import nn

from engine.methods.base import Batch, Logs, TeacherMethod
from engine.refresh import RefreshResult
from losses import class_mix_masks, mix, pseudo_labels_with_weight, weighted_pseudo_label_ce
from models.labels import resize_labels
from utils.config import Config


class DACS(TeacherMethod):
    """w_ce·L_ce(source) + L_mix: the student's CE on a ClassMix image (half of the source image's classes
    pasted into the target image) against the mixed labels (the source's ground truth where pasted, else
    the EMA teacher's pseudo-labels), each pseudo-labelled pixel weighted by the teacher's batch confidence
    (``--pseudo-threshold``), each pasted pixel by 1. The teacher follows the student (``--ema-momentum``)."""

    uses_target = True
    refreshes_prototypes = False
    options = ("w_ce", "pseudo_threshold")

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        super().__init__(model, d1, d2, cfg)
        self.w_ce, self.pseudo_threshold = cfg.w_ce, cfg.pseudo_threshold
        self.num_classes = cfg.num_classes
        # The teacher (TeacherMethod) starts as the step-0 network and follows at --ema-momentum (0.99).

    def train_step(self, src: Batch, tgt: Batch | None, protos: RefreshResult, epoch: int) -> Logs:
        """One iteration on a source batch (``img`` [B, 3, H, W], ``label`` [B, H, W]) and a target batch
        (``img``); the networks take the stage's prototypes P_ST, which no loss reads."""
        prototypes = protos.source_target
        x_s, y_s, x_t = self.images(src), self.labels(src), self.images(tgt)
        logs: Logs = {}

        # 1. Source: the student's classifier CE.
        loss_ce, _ = self.source_ce(x_s, y_s, prototypes, logs)

        # 2. Teacher on the target image (target BatchNorm statistics), without gradients: pseudo-labels
        #    [B, H/4, W/4] and their confidence weight, one number for the batch.
        with torch.no_grad():
            t_tgt = self.forward(self.teacher, x_t, prototypes, "target")
            pseudo, confidence = pseudo_labels_with_weight(t_tgt["logits_up"].float().softmax(1),
                                                           self.pseudo_threshold)
        logs["pseudo_weight"] = confidence

        # 3. ClassMix: half of each source image's classes pasted into its target image, at full resolution;
        #    the mixed labels and weights at the logits' H/4, the mask nearest-downsampled like the labels.
        mask = class_mix_masks(y_s, self.num_classes)  # [B, H, W]
        x_mix = mix(mask, x_s, x_t)
        size = pseudo.shape[-2:]
        mask_low = resize_labels(mask.to(torch.uint8), size).bool()
        y_mix = mix(mask_low, resize_labels(y_s, size).long(), pseudo)
        w_mix = mix(mask_low, torch.ones_like(confidence).expand_as(pseudo), confidence.expand_as(pseudo))
        logs["mix_fraction"] = mask.float().mean()

        # 4. Student on the mixed image, with the target's BatchNorm statistics (the image the source pixels
        #    are pasted into); the weighted CE on the mixed labels.
        out_mix = self.forward(self.model, x_mix, prototypes, "target")
        loss_mix = weighted_pseudo_label_ce(out_mix["logits_up"].float(), y_mix, w_mix)
        logs["loss_mix"] = loss_mix.detach()
        # Neither loss reaches the prototype head.
        loss = self.w_ce * loss_ce + loss_mix + self.all_parameters_term(out_mix)

        # 5. Backward, the optimiser step, then the teacher follows the student.
        self.backward(loss, logs)
        self.step_segmenter()
        self.update_teacher()
        return logs
