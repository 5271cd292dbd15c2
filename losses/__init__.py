"""NAPG losses: supervised, adversarial (entropy maps), GNCE neighbourhood and step-3 distillation; and the
baselines' entropy minimisation and self-training."""

from losses.adversarial import (
    bce,
    d1_discriminator_loss,
    d1_generator_loss,
    discriminator_losses,
    generator_adv_losses,
    self_information,
)
from losses.distill import feature_kd_loss
from losses.gnce import gnce_loss, gnce_loss_reference
from losses.segmentation import classifier_ce, prototype_nll
from losses.self_training import (
    class_mix_masks,
    entropy_loss,
    mix,
    pseudo_labels_with_weight,
    weighted_pseudo_label_ce,
)

__all__ = [
    "bce",
    "class_mix_masks",
    "classifier_ce",
    "d1_discriminator_loss",
    "d1_generator_loss",
    "discriminator_losses",
    "entropy_loss",
    "feature_kd_loss",
    "generator_adv_losses",
    "gnce_loss",
    "gnce_loss_reference",
    "mix",
    "prototype_nll",
    "pseudo_labels_with_weight",
    "self_information",
    "weighted_pseudo_label_ce",
]
