"""What every UDA method holds and does: the segmenter with its optimiser and AMP scaler, the
discriminators its class names (D1 and D2, D1 alone, or none) with theirs, and the pieces their training
iterations share.

A step never waits for the device: its losses and monitored values come back as detached 0-dim tensors
(:data:`Logs`), which the trainer reads (and checks for NaN, :func:`require_finite`) once every
``--log-every`` iterations. Images may arrive as uint8 and are converted and normalised on the device
(``data.preprocess.to_model_input``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from data.preprocess import to_model_input
from engine.device import amp_dtype, autocast, unwrap
from engine.refresh import RefreshResult
from losses import classifier_ce, discriminator_losses, generator_adv_losses, self_information
from models.labels import resize_labels
from utils.config import Config
from utils.errors import NonFiniteError

Batch = dict[str, Any]  # a collated batch: "img" [B, 3, H, W] uint8 or float, "label" [B, H, W], ...
Logs = dict[str, torch.Tensor]  # name -> detached 0-dim tensor on the training device

# The options that a method with each discriminator reads (Method.read_options).
DISCRIMINATOR_OPTIONS: dict[str, tuple[str, ...]] = {"d1": ("lr_d", "betas_d", "w_adv_d1"),
                                                     "d2": ("lr_d", "betas_d", "w_adv_d2", "legacy_d2_gen")}


def adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float],
         weight_decay: float = 0.0) -> torch.optim.Adam:
    """torch's Adam with its fused kernel: the per-parameter loop's update up to float rounding (a test checks
    it), and on a CPU, where torch's default is that loop, the optimiser step about 8x faster."""
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def set_requires_grad(module: nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


class Method:
    """The training state of a stage and the iteration that changes it.

    ``model`` is the segmenter (possibly wrapped by DDP / ``torch.compile``), ``d1``/``d2`` the
    discriminators (None where the class's ``discriminators`` do not name them). Subclasses set the class
    attributes below, take their own options in ``__init__`` and write :meth:`train_step`.
    """

    uses_target: bool = False  # train_step takes a target batch each iteration
    # The discriminators that engine/build.py makes for it: ("d1", "d2"), ("d1",) or none.
    discriminators: tuple[str, ...] = ()
    # The trainer rebuilds the prototypes before every epoch (docs/method.md §3). A method whose losses read
    # no prototype leaves this False: its network still takes prototypes, and it gets those the stage
    # started with (the hand-off's), refreshed only when there are none, so no epoch spends a refresh pass.
    refreshes_prototypes: bool = True
    # Its loss reads the prototype NLL at the source labels, whose ignored pixels the legacy preset's NLL
    # (no ignore index) cannot take: the source crops are checked for them (data.transforms.RejectIgnored).
    prototype_nll: bool = False
    # The options this class's __init__ reads beyond those every stage reads (engine.methods.stage_options);
    # a stage's --help lists only its method's. A subclass names its own: its bases' and its discriminators'
    # (DISCRIMINATOR_OPTIONS) are added by read_options.
    options: tuple[str, ...] = ()

    @classmethod
    def read_options(cls) -> frozenset[str]:
        """The options the method reads beyond the common ones: its classes' ``options`` and its
        discriminators'."""
        names = {name for klass in cls.__mro__ for name in vars(klass).get("options", ())}
        names.update(name for d in cls.discriminators for name in DISCRIMINATOR_OPTIONS[d])
        return frozenset(names)

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        # --- the segmenter: Adam at a constant learning rate (docs/method.md §5)
        self.model = model
        self.device = next(model.parameters()).device
        self.opt_g = adam(model.parameters(), cfg.lr, tuple(cfg.betas), cfg.weight_decay)
        self.normalize = cfg.normalize
        self.channels_last = cfg.channels_last
        self.amp_dtype = amp_dtype(cfg.amp)
        # fp16 needs loss scaling; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype is torch.float16)
        # --- the discriminators and the adversarial weights (§4.3-4.4)
        self.d1, self.d2 = d1, d2
        self.opt_d1, self.opt_d2 = (adam(d.parameters(), cfg.lr_d, tuple(cfg.betas_d)) if d is not None else None
                                    for d in (d1, d2))
        # A discriminator's options are read only where the method has it (DISCRIMINATOR_OPTIONS).
        self.w_adv_d1 = cfg.w_adv_d1 if d1 is not None else 0.0
        self.w_adv_d2 = cfg.w_adv_d2 if d2 is not None else 0.0
        self.legacy_d2_gen = d2 is not None and cfg.legacy_d2_gen
        # --- an optional stabiliser: the weights' EMA (Polyak averaging; the mean teacher of Tarvainen &
        #     Valpola, NeurIPS 2017), which evaluation and the hand-off use while training goes on undisturbed
        self.weight_ema = cfg.weight_ema
        self.averaged = None if cfg.weight_ema is None else copy.deepcopy(unwrap(model)).eval()
        if self.averaged is not None:
            set_requires_grad(self.averaged, False)

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

    def source_ce(self, x_s: torch.Tensor, y_s: torch.Tensor, prototypes: torch.Tensor,
                  logs: Logs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The segmenter on source images x_s [B, 3, H, W] and its classifier CE at H/4 against the
        nearest-downsampled labels y_s [B, H, W] (logged as ``loss_ce``); returns (CE, the outputs)."""
        out_s = self.forward(self.model, x_s, prototypes, "source")
        y_up = resize_labels(y_s, out_s["logits_up"].shape[-2:])
        loss_ce = classifier_ce(out_s["logits_up"].float(), y_up)
        logs["loss_ce"] = loss_ce.detach()
        return loss_ce, out_s

    @staticmethod
    def all_parameters_term(out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Exactly zero, with every parameter of the segmenter in its graph: added to a loss that leaves the
        prototype head without gradient (the classifier's CE, the legacy D2 term), as
        DistributedDataParallel requires of every iteration."""
        return 0.0 * out["proto_logits"].float().sum()

    # ------------------------------------------------------------------ segmenter update
    def backward(self, loss: torch.Tensor, logs: Logs) -> None:
        """Log the generator's total loss and leave its (scaled) gradients."""
        logs["loss_total"] = loss.detach()
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step_segmenter(self) -> None:
        self.scaler.step(self.opt_g)
        self.scaler.update()
        if self.averaged is not None:
            ema_update(self.averaged, unwrap(self.model), self.weight_ema)

    @property
    def scored_model(self) -> nn.Module:
        """The bare network that evaluation, the pictures and the hand-off use: the weights' EMA with
        ``--weight-ema``, else the network being trained."""
        return unwrap(self.model) if self.averaged is None else self.averaged

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
        logs["entropy_maps_finite"] = maps_finite(ent.values())
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
    def _discriminators(self) -> list[tuple[str, nn.Module, torch.optim.Optimizer]]:
        """(name, discriminator, its optimiser) of each discriminator the method has."""
        return [(name, d, opt) for name, d, opt in (("d1", self.d1, self.opt_d1), ("d2", self.d2, self.opt_d2))
                if d is not None]

    def state_dict(self) -> dict[str, Any]:
        state = {"model": unwrap(self.model).state_dict(), "opt_g": self.opt_g.state_dict(),
                 "scaler": self.scaler.state_dict()}
        discs = self._discriminators()
        state.update({name: unwrap(d).state_dict() for name, d, _ in discs})
        state.update({f"opt_{name}": opt.state_dict() for name, _, opt in discs})
        if self.averaged is not None:
            state["averaged"] = self.averaged.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        if self.averaged is not None:  # a last.pt without it (the option turned on at resume): start it here
            self.averaged.load_state_dict(state.get("averaged", state["model"]))
        optimisers = [(self.opt_g, state["opt_g"])]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for name, d, opt in self._discriminators():
            unwrap(d).load_state_dict(state[name])
            optimisers.append((opt, state[f"opt_{name}"]))
        for opt, saved in optimisers:
            # A last.pt written before the fused kernel holds the loop's flags; set them before loading, so that
            # torch places each restored step counter where the fused kernel reads it (on the parameter's device).
            groups = [{**group, "fused": True, "foreach": None} for group in saved["param_groups"]]
            opt.load_state_dict({**saved, "param_groups": groups})


class TeacherMethod(Method):
    """A method with a teacher: a copy of the network the stage starts from, never trained directly and in
    eval mode (it reads, never updates, the BatchNorm statistics), following the student by an EMA of
    momentum ``--ema-momentum`` (None: it stays the initial network). It is part of ``last.pt``."""

    options = ("ema_momentum",)

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        super().__init__(model, d1, d2, cfg)
        self.ema_momentum = cfg.ema_momentum
        self.teacher = copy.deepcopy(unwrap(model)).eval()
        set_requires_grad(self.teacher, False)

    def update_teacher(self) -> None:
        """After the student's step: the EMA update (:func:`ema_update`), if the teacher follows."""
        if self.ema_momentum is not None:
            ema_update(self.teacher, unwrap(self.model), self.ema_momentum)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])


def maps_finite(maps: Iterable[torch.Tensor]) -> torch.Tensor:
    """1 while every entropy map fed to a discriminator is finite, else 0 (a float 0-dim tensor, not waited
    for): checked with the losses (:func:`require_finite`), since the BCE itself tolerates NaN."""
    return torch.stack([m.detach().isfinite().all() for m in maps]).all().float()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """The teacher follows the bare student: θ_t <- m·θ_t + (1 - m)·θ_s for every parameter; the buffers
    (BatchNorm statistics of every domain) are copied, as the released step 3 does."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        p_t.mul_(momentum).add_(p_s.detach(), alpha=1 - momentum)
    for b_t, b_s in zip(teacher.buffers(), student.buffers()):
        b_t.copy_(b_s)


def require_finite(values: dict[str, float]) -> None:
    """Raise :class:`NonFiniteError` naming the first NaN/infinite loss term of read-back ``values``."""
    for name, value in values.items():
        if name.startswith("loss") and not math.isfinite(value):
            raise NonFiniteError(f"{name} = {value}")
    if values.get("entropy_maps_finite", 1.0) != 1.0:
        raise NonFiniteError("the entropy maps fed to the discriminators")
