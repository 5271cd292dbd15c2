"""MinEnt baseline: the source CE plus the entropy of the target predictions (Vu et al., ADVENT, CVPR 2019,
"direct entropy minimisation"; docs/method.md, "Baselines")."""

from __future__ import annotations

from torch import nn

from engine.methods.base import Batch, Logs, Method
from engine.refresh import RefreshResult
from losses import entropy_loss
from utils.config import Config


class MinEnt(Method):
    """w_ce·L_ce(source) + w_ent·L_ent(target): L_ent is the normalised entropy of the classifier's softmax
    on the target, averaged over the pixels (ADVENT's Eq. 5). No prototype loss, no discriminator."""

    uses_target = True
    refreshes_prototypes = False
    options = ("w_ce", "w_ent")

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        super().__init__(model, d1, d2, cfg)
        self.w_ce, self.w_ent = cfg.w_ce, cfg.w_ent

    def train_step(self, src: Batch, tgt: Batch | None, protos: RefreshResult, epoch: int) -> Logs:
        """One iteration on a source batch (``img`` [B, 3, H, W], ``label`` [B, H, W]) and a target batch
        (``img``); the network takes the stage's prototypes P_ST, which no loss reads."""
        prototypes = protos.source_target
        logs: Logs = {}

        # 1. Source: the classifier's CE.
        loss_ce, _ = self.source_ce(self.images(src), self.labels(src), prototypes, logs)

        # 2. Target, with the target's BatchNorm statistics: the entropy of the classifier's prediction.
        out_t = self.forward(self.model, self.images(tgt), prototypes, "target")
        loss_ent = entropy_loss(out_t["logits_up"].float().softmax(1))
        logs["loss_ent"] = loss_ent.detach()
        # Neither loss reaches the prototype head.
        loss = self.w_ce * loss_ce + self.w_ent * loss_ent + self.all_parameters_term(out_t)

        # 3. Backward and the optimiser step.
        self.backward(loss, logs)
        self.step_segmenter()
        return logs
