"""One NAPG training iteration, as a reader holds it in one head.

``NAPG.train_step`` is steps 0-2: forward source, forward target, segmentation / prototype / GNCE /
adversarial losses, discriminator losses, optimiser steps. ``NAPG.distill_step`` is step 3: a frozen
(or EMA) teacher, weak/strong target views and masked feature distillation.

A step never waits for the device: its losses and monitored values come back as detached 0-dim tensors,
which the trainer reads (and checks for NaN) once every ``--log-every`` iterations. Images may arrive as
uint8 and are converted and normalised on the device (``data.preprocess.to_model_input``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from data.preprocess import to_model_input
from data.transforms import warp_to_strong
from engine.device import amp_dtype, autocast, unwrap
from losses import (
    classifier_ce,
    discriminator_losses,
    feature_kd_loss,
    generator_adv_losses,
    gnce_loss,
    prototype_nll,
    self_information,
)
from models.labels import resize_labels
from utils.config import Config
from utils.errors import NonFiniteError
from utils.stages import STAGES

Logs = dict[str, torch.Tensor]  # name -> detached 0-dim tensor on the training device


def set_requires_grad(module: nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


class NAPG:
    """The segmenter, its two discriminators, their optimisers and the step-3 teacher.

    ``cfg`` is the resolved option dict (utils/config.py); ``stage`` one of step0..step3.
    """

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        self.cfg = cfg
        self.stage = cfg.stage
        self.model = model
        self.d1, self.d2 = d1, d2
        self.opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                      weight_decay=cfg.weight_decay)
        self.opt_d1 = self.opt_d2 = None
        if d1 is not None:
            self.opt_d1 = torch.optim.Adam(d1.parameters(), lr=cfg.lr_d, betas=tuple(cfg.betas_d))
            self.opt_d2 = torch.optim.Adam(d2.parameters(), lr=cfg.lr_d, betas=tuple(cfg.betas_d))
        self.amp_dtype = amp_dtype(cfg.amp)
        # fp16 needs loss scaling; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype is torch.float16)
        self.teacher: nn.Module | None = None
        if STAGES[self.stage].teacher:
            self.teacher = copy.deepcopy(unwrap(model)).eval()
            set_requires_grad(self.teacher, False)

    @property
    def uses_target(self) -> bool:
        return self.d1 is not None

    def forward(self, model: nn.Module, x: torch.Tensor, prototypes: torch.Tensor,
                domain: str) -> dict[str, torch.Tensor]:
        """The segmenter on a batch of one ``domain`` under the configured precision and memory format.

        Only the network runs in reduced precision: losses, softmaxes, entropies and the discriminators
        (whose BCE is unsafe under autocast) take float32 copies of its outputs. With ``--bn-stats domain``
        BatchNorm uses (and updates) that domain's running statistics.
        """
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with unwrap(model).domain(domain), autocast(x.device, self.amp_dtype):
            return model(x, prototypes)

    # ------------------------------------------------------------------ steps 0-2
    def train_step(self, src: dict[str, Any], tgt: dict[str, Any] | None, prototypes: torch.Tensor,
                   epoch: int, tau: float | None) -> Logs:
        """One iteration on a source batch (``img`` [B, 3, H, W] uint8 or float, ``label`` [B, H, W]) and a
        target batch (``img``; None in step 0); returns the detached losses and monitored values."""
        cfg, model = self.cfg, self.model
        device = prototypes.device
        x_s = to_model_input(src["img"], device, cfg.normalize)
        y_s = src["label"].to(device, non_blocking=True)
        set_requires_grad(self.d1, False)
        set_requires_grad(self.d2, False)

        out_s = self.forward(model, x_s, prototypes, "source")
        y_up = resize_labels(y_s, out_s["logits_up"].shape[-2:])
        y_feat = resize_labels(y_s, out_s["features"].shape[-2:])
        logs: Logs = {}
        loss_ce = classifier_ce(out_s["logits_up"].float(), y_up)
        # Without an ignore index a 255 label would index out of range: the data pipeline rejects such
        # labels (data.transforms.RejectIgnored), so the step need not look at them.
        loss_proto = prototype_nll(out_s["proto_prob"].float(), y_feat,
                                   ignore_index=255 if cfg.proto_ignore_index else None)
        loss = cfg.w_ce * loss_ce + cfg.w_proto * loss_proto
        logs.update(loss_ce=loss_ce.detach(), loss_proto=loss_proto.detach())

        w_gnce = cfg.gnce_weight_at(epoch)
        if w_gnce > 0:
            loss_gnce = gnce_loss(out_s["proto_max"].float(), out_s["features"].float(), cfg.gnce_windows)
            logs["loss_gnce_src"] = loss_gnce.detach()
            loss = loss + w_gnce * loss_gnce

        if self.uses_target and tgt is not None:
            x_t = to_model_input(tgt["img"], device, cfg.normalize)
            out_t = self.forward(model, x_t, prototypes, "target")
            if w_gnce > 0 and cfg.gnce_target_weight > 0:
                mask = None
                if cfg.gnce_target_mask and tau is not None:
                    conf = out_t["logits"].detach().float().softmax(1).amax(1, keepdim=True)
                    mask = (conf > tau).float()
                loss_gnce_t = gnce_loss(out_t["proto_max"].float(), out_t["features"].float(),
                                        cfg.gnce_windows, mask=mask)
                logs["loss_gnce_tgt"] = loss_gnce_t.detach()
                loss = loss + w_gnce * cfg.gnce_target_weight * loss_gnce_t
            ent = self._entropies(out_s["logits_up"], out_s["proto_prob"], out_t["logits_up"], out_t["proto_prob"])
            loss = loss + self._generator_adversarial(ent, logs)
            self._backward_generator(loss, logs)
            self._discriminator_step(ent, logs, legacy_step1=cfg.legacy_d2_step1)
        else:
            self._backward_generator(loss, logs)
        self._step_generator()
        return logs

    # ------------------------------------------------------------------ step 3
    def distill_step(self, src: dict[str, Any], tgt: dict[str, Any], proto_teacher: torch.Tensor,
                     proto_student: torch.Tensor) -> Logs:
        """Frozen teacher on the source and the full target tile, student on the full and strong views."""
        cfg, model, teacher = self.cfg, self.model, self.teacher
        device = proto_student.device
        x_s = to_model_input(src["img"], device, cfg.normalize)
        x_t = to_model_input(tgt["img"], device, cfg.normalize)
        x_strong = to_model_input(tgt["img_strong"], device, cfg.normalize)
        set_requires_grad(self.d1, False)
        set_requires_grad(self.d2, False)
        logs: Logs = {}

        with torch.no_grad():
            t_src = self.forward(teacher, x_s, proto_teacher, "source")
            t_tgt = self.forward(teacher, x_t, proto_teacher, "target")
        out_t = self.forward(model, x_t, proto_student, "target")
        ent = self._entropies(t_src["logits_up"], t_src["proto_prob"], out_t["logits_up"], out_t["proto_prob"])
        loss = self._generator_adversarial(ent, logs)

        # Teacher features of the full tile, warped into the strong view's frame with their validity.
        out_strong = self.forward(model, x_strong, proto_student, "target")
        f_student = out_strong["features"].float()
        f_teacher, valid = warp_to_strong(t_tgt["features"].float(), tgt["weak_params"], tgt["strong_params"],
                                          f_student.shape[-2:], source="full",
                                          legacy_geometry_scale=1.0 if cfg.legacy_geometry else None)
        loss_kd = feature_kd_loss(f_student, f_teacher, valid, T=cfg.kd_temperature,
                                  normalize=cfg.kd_normalize)
        loss = loss + cfg.w_kd * loss_kd
        logs["loss_kd"] = loss_kd.detach()
        logs["kd_valid_fraction"] = valid.float().mean()
        if cfg.w_ce_src > 0:
            out_s = self.forward(model, x_s, proto_student, "source")
            y_up = resize_labels(src["label"].to(device, non_blocking=True), out_s["logits_up"].shape[-2:])
            loss_ce = classifier_ce(out_s["logits_up"].float(), y_up)
            loss = loss + cfg.w_ce_src * loss_ce
            logs["loss_ce"] = loss_ce.detach()
        # Keeps every parameter in the graph (the legacy D2 term gives the similarity conv no gradient),
        # which DistributedDataParallel requires; adds exactly zero.
        loss = loss + 0.0 * out_strong["proto_logits"].float().sum()
        self._backward_generator(loss, logs)
        self._discriminator_step(ent, logs, legacy_step1=False)
        self._step_generator()
        if cfg.ema_momentum is not None:
            self._update_teacher(cfg.ema_momentum)
        return logs

    # ------------------------------------------------------------------ shared pieces
    @staticmethod
    def _entropies(logits_up_s, proto_prob_s, logits_up_t, proto_prob_t) -> dict[str, torch.Tensor]:
        """Self-information maps I(p) of both branches and domains, in float32."""
        return {
            "s_cls": self_information(logits_up_s.float().softmax(1)),
            "t_cls": self_information(logits_up_t.float().softmax(1)),
            "s_proto": self_information(proto_prob_s.float()),
            "t_proto": self_information(proto_prob_t.float()),
        }

    def _backward_generator(self, loss: torch.Tensor, logs: Logs) -> None:
        logs["loss_total"] = loss.detach()
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def _step_generator(self) -> None:
        self.scaler.step(self.opt_g)
        self.scaler.update()

    def _generator_adversarial(self, ent: dict[str, torch.Tensor], logs: Logs) -> torch.Tensor:
        cfg = self.cfg
        # 1 while every entropy map is finite; checked with the losses (the BCE itself tolerates NaN).
        logs["entropy_maps_finite"] = torch.stack([m.detach().isfinite().all() for m in ent.values()]).all().float()
        # The frozen discriminators are called unwrapped: under DDP a wrapped call whose parameters get no
        # gradient would leave its reducer waiting.
        l_d1, l_d2 = generator_adv_losses(unwrap(self.d1), unwrap(self.d2), ent["t_cls"], ent["s_proto"],
                                          ent["t_proto"], legacy_d2_gen=cfg.legacy_d2_gen)
        logs.update(loss_adv_d1=l_d1.detach(), loss_adv_d2=l_d2.detach())
        return cfg.w_adv_d1 * l_d1 + cfg.w_adv_d2 * l_d2

    def _discriminator_step(self, ent: dict[str, torch.Tensor], logs: Logs, legacy_step1: bool) -> None:
        set_requires_grad(self.d1, True)
        set_requires_grad(self.d2, True)
        detached = {k: v.detach() for k, v in ent.items()}
        # ``means``: the mean "target" probability of each discriminator call (before this update), logged.
        l_D1, l_D2, means = discriminator_losses(self.d1, self.d2, detached["s_cls"], detached["t_cls"],
                                          detached["s_proto"], detached["t_proto"],
                                          legacy_d2_step1=legacy_step1)
        self.opt_d1.zero_grad(set_to_none=True)
        self.opt_d2.zero_grad(set_to_none=True)
        (l_D1 + l_D2).backward()
        self.opt_d1.step()
        self.opt_d2.step()
        logs.update(loss_d1=l_D1.detach(), loss_d2=l_D2.detach(), **means)

    @torch.no_grad()
    def _update_teacher(self, momentum: float) -> None:
        student = unwrap(self.model)
        for p_t, p_s in zip(self.teacher.parameters(), student.parameters()):
            p_t.mul_(momentum).add_(p_s.detach(), alpha=1 - momentum)
        for b_t, b_s in zip(self.teacher.buffers(), student.buffers()):
            b_t.copy_(b_s)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {"model": unwrap(self.model).state_dict(), "opt_g": self.opt_g.state_dict(),
                 "scaler": self.scaler.state_dict()}
        if self.d1 is not None:
            state.update(d1=unwrap(self.d1).state_dict(), d2=unwrap(self.d2).state_dict(),
                         opt_d1=self.opt_d1.state_dict(), opt_d2=self.opt_d2.state_dict())
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["opt_g"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.d1 is not None:
            unwrap(self.d1).load_state_dict(state["d1"])
            unwrap(self.d2).load_state_dict(state["d2"])
            self.opt_d1.load_state_dict(state["opt_d1"])
            self.opt_d2.load_state_dict(state["opt_d2"])
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])


def require_finite(values: dict[str, float]) -> None:
    """Raise :class:`NonFiniteError` naming the first NaN/infinite loss term of read-back ``values``."""
    for name, value in values.items():
        if name.startswith("loss") and not math.isfinite(value):
            raise NonFiniteError(f"{name} = {value}")
    if values.get("entropy_maps_finite", 1.0) != 1.0:
        raise NonFiniteError("the entropy maps fed to the discriminators")
