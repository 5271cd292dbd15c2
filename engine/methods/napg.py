"""Steps 1 and 2, NAPG: prototype groups, GNCE and entropy adversarial training (docs/method.md §4, §5).

One class for both stages: what differs between the warm-up (step 1) and the UDA training with
multi-prototype groups (step 2) are option values of the stage (``--clusters``, τ, the GNCE windows and
target weight, the legacy D2 update), set by the stage table and the presets.
"""

from __future__ import annotations

from torch import nn

from engine.methods.base import Batch, Logs
from engine.methods.source_only import SourceOnly
from engine.refresh import RefreshResult
from losses import gnce_loss
from utils.config import Config


class NAPG(SourceOnly):
    """Step 0's supervised losses on the source, plus on the target GNCE (paper step 2) and the entropy
    adversarial terms through D1 and D2; trains with the source + target prototypes P_ST (§5)."""

    uses_target = True
    discriminators = ("d1", "d2")
    options = ("gnce_target_weight", "gnce_target_mask", "legacy_d2_step1")

    def __init__(self, model: nn.Module, d1: nn.Module | None, d2: nn.Module | None, cfg: Config):
        super().__init__(model, d1, d2, cfg)
        self.gnce_target_weight = cfg.gnce_target_weight
        self.gnce_target_mask = cfg.gnce_target_mask
        self.tau_at = cfg.tau_at  # epoch -> confidence threshold τ, None before target pseudo-labels (§5)
        self.legacy_d2_step1 = cfg.legacy_d2_step1

    def train_step(self, src: Batch, tgt: Batch | None, protos: RefreshResult, epoch: int) -> Logs:
        """One iteration on a source batch (``img`` [B, 3, H, W] uint8 or float, ``label`` [B, H, W]) and a
        target batch (``img``)."""
        prototypes = protos.source_target
        logs: Logs = {}
        self.freeze_discriminators()

        # 1. Source: CE + prototype NLL (+ GNCE), as in step 0.
        loss, out_s = self.source_losses(src, prototypes, epoch, logs)

        # 2. Target: the network with the target's BatchNorm statistics; GNCE on it, optionally only at
        #    pixels the classifier is confident about (§4.5).
        out_t = self.forward(self.model, self.images(tgt), prototypes, "target")
        w_gnce = self.gnce_weight_at(epoch)
        if w_gnce > 0 and self.gnce_target_weight > 0:
            mask = None
            tau = self.tau_at(epoch)
            if self.gnce_target_mask and tau is not None:
                conf = out_t["logits"].detach().float().softmax(1).amax(1, keepdim=True)
                mask = (conf > tau).float()
            loss_gnce_t = gnce_loss(out_t["proto_max"].float(), out_t["features"].float(), self.gnce_windows,
                                    mask=mask)
            logs["loss_gnce_tgt"] = loss_gnce_t.detach()
            loss = loss + w_gnce * self.gnce_target_weight * loss_gnce_t

        # 3. Adversarial alignment: the target's classifier entropy through D1, both domains' prototype
        #    entropies through D2, the discriminators frozen (§4.3).
        ent = self.entropies(out_s, out_t)
        loss = loss + self.adversarial_loss(ent, logs)

        # 4. Generator backward, the discriminators' update on the detached maps (§4.4), then the
        #    generator's optimiser step: both are stepped together at the end of the iteration.
        self.backward(loss, logs)
        self.discriminator_step(ent, logs, legacy_step1=self.legacy_d2_step1)
        self.step_segmenter()
        return logs
