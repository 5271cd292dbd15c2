"""AdvEnt baseline: the source CE plus adversarial alignment of the target's entropy maps through one
discriminator (Vu et al., ADVENT, CVPR 2019; docs/method.md, "Baselines").

The discriminator is NAPG's D1 with its losses (docs/method.md §4.3-4.4): it tells the classifier's
self-information maps of source images (label 0) from target ones (label 1); the segmenter is trained to make
the target's pass for source ones. There is no prototype loss and no D2.
"""

from __future__ import annotations

from torch import nn

from engine.device import unwrap
from engine.methods.base import Batch, Logs, Method, maps_finite, set_requires_grad
from engine.refresh import RefreshResult
from losses import d1_discriminator_loss, d1_generator_loss, self_information
from utils.config import Config


class AdvEnt(Method):
    """w_ce·L_ce(source) + λ_adv·BCE(D1(I_t), 0), λ_adv = ``--w-adv-d1`` (ADVENT's 0.001); D1 is updated on the
    detached maps I_s, I_t of the same iteration."""

    uses_target = True
    discriminators = ("d1",)
    refreshes_prototypes = False
    options = ("w_ce",)

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        super().__init__(model, d1, d2, cfg)
        self.w_ce = cfg.w_ce

    def train_step(self, src: Batch, tgt: Batch | None, protos: RefreshResult, epoch: int) -> Logs:
        """One iteration on a source batch (``img`` [B, 3, H, W], ``label`` [B, H, W]) and a target batch
        (``img``); the network takes the stage's prototypes P_ST, which no loss reads."""
        prototypes = protos.source_target
        logs: Logs = {}
        self.freeze_discriminators()

        # 1. Source: the classifier's CE.
        loss_ce, out_s = self.source_ce(self.images(src), self.labels(src), prototypes, logs)

        # 2. Target, with the target's BatchNorm statistics; both domains' classifier self-information maps
        #    I = -p·log p / log C [B, C, H/4, W/4], in float32.
        out_t = self.forward(self.model, self.images(tgt), prototypes, "target")
        ent_s = self_information(out_s["logits_up"].float().softmax(1))
        ent_t = self_information(out_t["logits_up"].float().softmax(1))
        logs["entropy_maps_finite"] = maps_finite((ent_s, ent_t))

        # 3. Adversarial term through the frozen D1, called unwrapped (under DDP a wrapped call whose
        #    parameters get no gradient would leave its reducer waiting).
        loss_adv = d1_generator_loss(unwrap(self.d1), ent_t)
        logs["loss_adv_d1"] = loss_adv.detach()
        # Neither loss reaches the prototype head.
        loss = self.w_ce * loss_ce + self.w_adv_d1 * loss_adv + self.all_parameters_term(out_t)

        # 4. Generator backward, D1's update on the detached maps, then the generator's step: both are
        #    stepped together at the end of the iteration, as NAPG's are (§4.4).
        self.backward(loss, logs)
        set_requires_grad(self.d1, True)
        loss_d1, means = d1_discriminator_loss(self.d1, ent_s.detach(), ent_t.detach())
        self.opt_d1.zero_grad(set_to_none=True)
        loss_d1.backward()
        self.opt_d1.step()
        logs.update(loss_d1=loss_d1.detach(), **means)
        self.step_segmenter()
        return logs
