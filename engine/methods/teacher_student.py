"""Step 3, teacher-student: a frozen (or EMA) teacher, weak/strong target views and masked feature
distillation (docs/method.md §4.6, §6)."""

from __future__ import annotations

import torch
from torch import nn

from data.transforms import warp_to_strong
from engine.methods.base import Batch, Logs, TeacherMethod
from engine.refresh import RefreshResult
from losses import feature_kd_loss
from utils.config import Config


class TeacherStudent(TeacherMethod):
    """w_kd·L_kd of the teacher's full-tile features warped into the student's strong view, plus the D1/D2
    adversarial terms of the student's target maps against the teacher's source maps (and, with
    ``--w-ce-src``, a source cross-entropy). The teacher uses P_ST, the student P_T (§5)."""

    uses_target = True
    discriminators = ("d1", "d2")
    options = ("w_kd", "kd_temperature", "kd_normalize", "w_ce_src", "legacy_geometry")

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        super().__init__(model, d1, d2, cfg)
        self.w_kd, self.kd_temperature, self.kd_normalize = cfg.w_kd, cfg.kd_temperature, cfg.kd_normalize
        self.w_ce_src = cfg.w_ce_src
        # The released code applied the strong view's geometry at scale 1, a quarter of the right one.
        self.legacy_geometry_scale = 1.0 if cfg.legacy_geometry else None
        # The teacher (TeacherMethod) starts as the network handed over by step 2, frozen by default.

    def train_step(self, src: Batch, tgt: Batch | None, protos: RefreshResult, epoch: int) -> Logs:
        """One iteration on a source batch (``img``, ``label``) and a target batch of step 3's views: the full
        tile ``img``, the strong view ``img_strong`` and the views' ``weak_params`` / ``strong_params``."""
        proto_teacher, proto_student = protos.source_target, protos.for_target
        x_s, x_t, x_strong = self.images(src), self.images(tgt), self.images(tgt, "img_strong")
        self.freeze_discriminators()
        logs: Logs = {}

        # 1. Teacher on the source and on the full target tile, without gradients.
        with torch.no_grad():
            t_src = self.forward(self.teacher, x_s, proto_teacher, "source")
            t_tgt = self.forward(self.teacher, x_t, proto_teacher, "target")

        # 2. Student on the full tile: the adversarial terms, its target maps against the teacher's source
        #    maps (§4.3).
        out_t = self.forward(self.model, x_t, proto_student, "target")
        ent = self.entropies(t_src, out_t)
        loss = self.adversarial_loss(ent, logs)

        # 3. Student on the strong view: distil the teacher's features of the full tile, warped into the
        #    strong view's frame, where they are valid (inside both crops, outside the cutout) (§4.6).
        out_strong = self.forward(self.model, x_strong, proto_student, "target")
        f_student = out_strong["features"].float()
        f_teacher, valid = warp_to_strong(t_tgt["features"].float(), tgt["weak_params"], tgt["strong_params"],
                                          f_student.shape[-2:], source="full",
                                          legacy_geometry_scale=self.legacy_geometry_scale)
        loss_kd = feature_kd_loss(f_student, f_teacher, valid, T=self.kd_temperature, normalize=self.kd_normalize)
        loss = loss + self.w_kd * loss_kd
        logs["loss_kd"] = loss_kd.detach()
        logs["kd_valid_fraction"] = valid.float().mean()

        # 4. Optionally keep the source: the student's classifier CE on it.
        if self.w_ce_src > 0:
            loss_ce, _ = self.source_ce(x_s, self.labels(src), proto_student, logs)
            loss = loss + self.w_ce_src * loss_ce
        # Keeps every parameter in the graph (the legacy D2 term gives the similarity conv no gradient).
        loss = loss + self.all_parameters_term(out_strong)

        # 5. Generator backward, the discriminators' update (§4.4), the generator's step; then the EMA
        #    teacher follows the student (--ema-momentum).
        self.backward(loss, logs)
        self.discriminator_step(ent, logs, legacy_step1=False)
        self.step_segmenter()
        self.update_teacher()
        return logs
