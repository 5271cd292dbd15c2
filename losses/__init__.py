"""NAPG losses: supervised, adversarial (entropy maps), GNCE neighbourhood and step-3 distillation."""

from losses.adversarial import bce, discriminator_losses, generator_adv_losses, self_information
from losses.distill import feature_kd_loss
from losses.gnce import gnce_loss, gnce_loss_reference
from losses.segmentation import classifier_ce, prototype_nll

__all__ = [
    "bce",
    "classifier_ce",
    "discriminator_losses",
    "feature_kd_loss",
    "generator_adv_losses",
    "gnce_loss",
    "gnce_loss_reference",
    "prototype_nll",
    "self_information",
]
