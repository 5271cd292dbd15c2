"""What every UDA method holds and does: the segmenter with its optimiser and AMP scaler, the optional
discriminators D1 and D2 with theirs, and the pieces their training iterations share.

A step never waits for the device: its losses and monitored values come back as detached 0-dim tensors
(:data:`Logs`), which the trainer reads (and checks for NaN, :func:`require_finite`) once every
``--log-every`` iterations. Images may arrive as uint8 and are converted and normalised on the device
(``data.preprocess.to_model_input``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from data.preprocess import to_model_input
from engine.device import amp_dtype, autocast, unwrap
from engine.refresh import RefreshResult
from losses import discriminator_losses, generator_adv_losses, self_information
from utils.config import Config
from utils.errors import NonFiniteError

Batch = dict[str, Any]  # a collated batch: "img" [B, 3, H, W] uint8 or float, "label" [B, H, W], ...
Logs = dict[str, torch.Tensor]  # name -> detached 0-dim tensor on the training device


def set_requires_grad(module: nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


class Method:
    """The training state of a stage and the iteration that changes it.

    ``model`` is the segmenter (possibly wrapped by DDP / ``torch.compile``), ``d1``/``d2`` the
    discriminators (None where the stage has none, ``Stage.adversarial``). Subclasses set the class
    attributes below, take their own options in ``__init__`` and write :meth:`train_step`.
    """

    uses_target: bool = False  # train_step takes a target batch each iteration
    # Its loss reads the prototype NLL at the source labels, whose ignored pixels the legacy preset's NLL
    # (no ignore index) cannot take: the source crops are checked for them (data.transforms.RejectIgnored).
    prototype_nll: bool = False

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        # --- the segmenter: Adam at a constant learning rate (docs/method.md §5)
        self.model = model
        self.device = next(model.parameters()).device
        self.opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                      weight_decay=cfg.weight_decay)
        self.normalize = cfg.normalize
        self.channels_last = cfg.channels_last
        self.amp_dtype = amp_dtype(cfg.amp)
        # fp16 needs loss scaling; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype is torch.float16)
        # --- the discriminators and the adversarial weights (§4.3-4.4)
        self.d1, self.d2 = d1, d2
        self.opt_d1 = self.opt_d2 = None
        if d1 is not None:
            self.opt_d1 = torch.optim.Adam(d1.parameters(), lr=cfg.lr_d, betas=tuple(cfg.betas_d))
            self.opt_d2 = torch.optim.Adam(d2.parameters(), lr=cfg.lr_d, betas=tuple(cfg.betas_d))
        self.w_adv_d1, self.w_adv_d2 = cfg.w_adv_d1, cfg.w_adv_d2
        self.legacy_d2_gen = cfg.legacy_d2_gen

    def train_step(self, src: Batch, tgt: Batch | None, protos: RefreshResult, epoch: int) -> Logs:
        """One iteration on a source batch and (``uses_target``) a target batch at 1-based ``epoch`` of the
        stage, with this epoch's prototypes; returns the detached losses and monitored values."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inputs and forward passes
    def images(self, batch: Batch, key: str = "img") -> torch.Tensor:
        """``batch[key]`` [B, 3, H, W] as network input on the training device."""
        return to_model_input(batch[key], self.device, self.normalize)

    def labels(self, batch: Batch) -> torch.Tensor:
        """``batch["label"]`` [B, H, W] on the training device."""
        return batch["label"].to(self.device, non_blocking=True)

    def forward(self, model: nn.Module, x: torch.Tensor, prototypes: torch.Tensor,
                domain: str) -> dict[str, torch.Tensor]:
        """A network on a batch of one ``domain`` under the configured precision and memory format.

        Only the network runs in reduced precision: losses, softmaxes, entropies and the discriminators
        (whose BCE is unsafe under autocast) take float32 copies of its outputs. With ``--bn-stats domain``
        BatchNorm uses (and updates) that domain's running statistics.
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with unwrap(model).domain(domain), autocast(x.device, self.amp_dtype):
            return model(x, prototypes)

    # ------------------------------------------------------------------ segmenter update
    def backward(self, loss: torch.Tensor, logs: Logs) -> None:
        """Log the generator's total loss and leave its (scaled) gradients."""
        logs["loss_total"] = loss.detach()
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step_segmenter(self) -> None:
        self.scaler.step(self.opt_g)
        self.scaler.update()

    # ------------------------------------------------------------------ adversarial pieces (§4.3-4.4)
    def freeze_discriminators(self) -> None:
        """The generator's losses give the discriminators no gradient."""
        set_requires_grad(self.d1, False)
        set_requires_grad(self.d2, False)

    @staticmethod
    def entropies(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Self-information maps I(p) of both branches of a source and a target forward pass, in float32."""
        return {
            "s_cls": self_information(source["logits_up"].float().softmax(1)),
            "t_cls": self_information(target["logits_up"].float().softmax(1)),
            "s_proto": self_information(source["proto_prob"].float()),
            "t_proto": self_information(target["proto_prob"].float()),
        }

    def adversarial_loss(self, ent: dict[str, torch.Tensor], logs: Logs) -> torch.Tensor:
        """λ1·L_adv(D1) + λ2·L_adv(D2) through the frozen discriminators (§4.3)."""
        # 1 while every entropy map is finite; checked with the losses (the BCE itself tolerates NaN).
        logs["entropy_maps_finite"] = torch.stack([m.detach().isfinite().all() for m in ent.values()]).all().float()
        # The frozen discriminators are called unwrapped: under DDP a wrapped call whose parameters get no
        # gradient would leave its reducer waiting.
        l_d1, l_d2 = generator_adv_losses(unwrap(self.d1), unwrap(self.d2), ent["t_cls"], ent["s_proto"],
                                          ent["t_proto"], legacy_d2_gen=self.legacy_d2_gen)
        logs.update(loss_adv_d1=l_d1.detach(), loss_adv_d2=l_d2.detach())
        return self.w_adv_d1 * l_d1 + self.w_adv_d2 * l_d2

    def discriminator_step(self, ent: dict[str, torch.Tensor], logs: Logs, legacy_step1: bool) -> None:
        """Update D1 and D2 on the detached entropy maps (§4.4)."""
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

    # ------------------------------------------------------------------ state (last.pt keys)
    def state_dict(self) -> dict[str, Any]:
        state = {"model": unwrap(self.model).state_dict(), "opt_g": self.opt_g.state_dict(),
                 "scaler": self.scaler.state_dict()}
        if self.d1 is not None:
            state.update(d1=unwrap(self.d1).state_dict(), d2=unwrap(self.d2).state_dict(),
                         opt_d1=self.opt_d1.state_dict(), opt_d2=self.opt_d2.state_dict())
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


def require_finite(values: dict[str, float]) -> None:
    """Raise :class:`NonFiniteError` naming the first NaN/infinite loss term of read-back ``values``."""
    for name, value in values.items():
        if name.startswith("loss") and not math.isfinite(value):
            raise NonFiniteError(f"{name} = {value}")
    if values.get("entropy_maps_finite", 1.0) != 1.0:
        raise NonFiniteError("the entropy maps fed to the discriminators")
