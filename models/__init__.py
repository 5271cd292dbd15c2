"""NAPG network, prototype head, discriminator and original-checkpoint conversion."""

from models.discriminator import FCDiscriminatorHighMask
from models.head import PrototypeHead, group_max, group_prob
from models.napg import NAPGNet
from models.original import load_original_checkpoint, to_original_state_dict

__all__ = [
    "FCDiscriminatorHighMask",
    "NAPGNet",
    "PrototypeHead",
    "group_max",
    "group_prob",
    "load_original_checkpoint",
    "to_original_state_dict",
]
