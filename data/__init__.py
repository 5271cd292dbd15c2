"""Data side: domain registry, prepared-folder dataset, augmentations and loaders."""

from data.dataset import SegmentationFolder
from data.domains import CLASS_NAMES, DOMAINS, IGNORE_INDEX, NUM_CLASSES, Domain, get_domain, resolve_domain
from data.loaders import BatchStream, build_loader, eval_loader
from data.transforms import Resize, WeakAugment, WeakStrongAugment, warp_to_strong

__all__ = [
    "CLASS_NAMES",
    "DOMAINS",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "Resize",
    "Domain",
    "BatchStream",
    "SegmentationFolder",
    "WeakAugment",
    "WeakStrongAugment",
    "build_loader",
    "eval_loader",
    "get_domain",
    "resolve_domain",
    "warp_to_strong",
]
