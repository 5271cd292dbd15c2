"""Builders of a stage: its method (``Stage.method``) with the network, discriminators and optimisers, the
sample transforms, the datasets and loaders of every role, and the epoch length. The trainer and the
measuring tools (``tools/benchmark.py``, ``tools/gpu_report.py``) build from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from data.checks import SplitUse, check_data
from data.dataset import SegmentationFolder
from data.domains import resolve_domain
from data.loaders import BatchStream, eval_loader, shuffled_loader
from data.transforms import Compose, RejectIgnored, Resize, WeakAugment, WeakStrongAugment
from engine.methods import Method, method_class
from models import FCDiscriminatorHighMask, NAPGNet
from models.napg import FEATURE_STRIDE
from utils import dist
from utils.config import Config
from utils.errors import UserError
from utils.stages import STAGES


def build_method(cfg: Config, device: torch.device, init_state: dict[str, Any] | None = None) -> Method:
    """The stage's method (``Stage.method``) with its network, the discriminators its class names
    (``Method.discriminators``) and optimisers, ready on ``device``; ``init_state`` is the hand-off the
    stage starts from."""
    cls = method_class(STAGES[cfg.stage].method)
    model = NAPGNet(num_classes=cfg.num_classes,
                    backbone=cfg.backbone, pretrained=cfg.pretrained if init_state is None else None,
                    shared_similarity=cfg.shared_similarity, head_impl=cfg.head_impl,
                    bn_stats=bn_stats_of(cfg), window=cfg.window).to(device)
    d1, d2 = (FCDiscriminatorHighMask(cfg.num_classes).to(device) if name in cls.discriminators else None
              for name in ("d1", "d2"))
    if init_state is not None:
        model.load_state_dict(init_state["model"])
        for disc, key in ((d1, "d1"), (d2, "d2")):
            if disc is not None and key in init_state:
                disc.load_state_dict(init_state[key])
    model, d1, d2 = prepare_modules(model, d1, d2, cfg, device)
    return cls(model, d1, d2, cfg)


def bn_stats_of(cfg: Config) -> str:
    """The stage's BatchNorm statistics: its own fixed mode (step 0 never sees a target image), else the flag."""
    return STAGES[cfg.stage].bn_stats or cfg.bn_stats


def build_data(cfg: Config, device: torch.device) -> dict[str, Any]:
    """Datasets and loaders of every role; the target's labels are read only for evaluation."""
    root = Path(cfg.data_root)
    src_dir = resolve_domain(root, cfg.source)
    stage = STAGES[cfg.stage]
    tgt_dir = resolve_domain(root, cfg.target) if method_class(stage.method).uses_target or cfg.target else None
    check_stage_data(cfg, src_dir, tgt_dir)
    common = {"label_format": cfg.label_format, "normalize": cfg.normalize, "cache": cfg.cache}
    train_tf, eval_tf, strong_tf = build_transforms(cfg)
    # Batches travel to the device as uint8 and are normalised there (data.preprocess.to_model_input); a
    # resize and step 3's strong views compute in float on the workers, so their samples stay float.
    uint8 = not cfg.resize
    src_train = SegmentationFolder(src_dir, "train", transform=train_tf, uint8=uint8, **common)
    if not cfg.proto_ignore_index and src_train.meta.get("labels") == "eroded":
        raise UserError(f"the legacy prototype NLL has no ignore index (as released), but {src_dir} holds eroded "
                        f"labels whose class borders are ignored pixels; prepare the source with "
                        f"tools/prepare_isprs.py --labels full, or pass --proto-ignore-index true")
    src_refresh = SegmentationFolder(src_dir, "train", transform=eval_tf, uint8=uint8, **common)
    src_val = SegmentationFolder(src_dir, "val", transform=eval_tf, uint8=uint8, **common)
    seed, bs, ebs = cfg.seed, cfg.batch_size, cfg.eval_batch_size
    # Workers stay alive between passes (the refresh and evaluation loaders are read every epoch).
    loader_kw = {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda",
                 "persistent_workers": cfg.num_workers > 0}
    data: dict[str, Any] = {
        "source": BatchStream(src_train, bs, seed=seed, **loader_kw),
        "source_refresh": shuffled_loader(src_refresh, ebs, seed, **loader_kw) if cfg.refresh == "legacy"
        else eval_loader(src_refresh, ebs, **loader_kw),
        "source_val": eval_loader(src_val, ebs, **loader_kw),
        "target": None, "target_refresh": None, "target_val": None,
    }
    if tgt_dir is not None:
        strong = stage.target_view == "weak_strong"  # the strong views are augmented in float on the workers
        tgt_tf = strong_tf if strong else train_tf
        tgt_train = SegmentationFolder(tgt_dir, "train", transform=tgt_tf, with_labels=False,
                                       uint8=uint8 and not strong, **common)
        tgt_refresh = SegmentationFolder(tgt_dir, "train", transform=eval_tf, with_labels=False, uint8=uint8,
                                         **common)
        tgt_val = SegmentationFolder(tgt_dir, cfg.target_eval_split, transform=eval_tf, uint8=uint8, **common)
        data["target"] = BatchStream(tgt_train, bs, seed=seed + 1, **loader_kw)
        data["target_refresh"] = eval_loader(tgt_refresh, ebs, **loader_kw)
        data["target_val"] = eval_loader(tgt_val, ebs, **loader_kw)
    return data


def check_stage_data(cfg: Config, src_dir: Path, tgt_dir: Path | None) -> None:
    """The data checks of ``data/checks.py`` for every split the stage reads, before anything is loaded."""
    uses = [SplitUse(src_dir, "train", cropped=True), SplitUse(src_dir, "val")]
    if tgt_dir is not None:  # the target's train labels are never read
        uses += [SplitUse(tgt_dir, "train", labels=False, cropped=True), SplitUse(tgt_dir, cfg.target_eval_split)]
    check_data(uses, label_format=cfg.label_format, resize=cfg.resize, batch_size=cfg.eval_batch_size,
               batch_flag="--eval-batch-size", crop=cfg.img_size, window=cfg.window)


def iters_per_epoch(cfg: Config, data: dict[str, Any]) -> int:
    """Iterations in one epoch: a pass over the stage's epoch role (``Stage.epoch_role``), capped by
    ``--iters-per-epoch``."""
    role = STAGES[cfg.stage].epoch_role
    n = data[role].batches_per_pass - int(cfg.legacy_epoch_length)  # the released loops: len(loader) - 1
    if n < 1:
        raise UserError(f"--legacy-epoch-length leaves no iteration: the {role} data fill only one batch of "
                        f"{cfg.batch_size}; lower --batch-size or pass --legacy-epoch-length false")
    return min(n, cfg.iters_per_epoch) if cfg.iters_per_epoch else n


def prepare_modules(model, d1, d2, cfg: Config, device: torch.device):
    """Memory format, SyncBatchNorm, DistributedDataParallel and torch.compile, as configured."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.is_dist():
        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
        d1, d2 = (None if d is None else DistributedDataParallel(d, device_ids=ids) for d in (d1, d2))
    if cfg.compile:
        model = torch.compile(model)
    return model, d1, d2


def build_transforms(cfg: Config) -> tuple[Any, Any, Any]:
    """(train, eval, strong) sample transforms of a resolved config.

    Steps 0-2 use no augmentation, as the paper's scripts: training only takes a random crop of
    ``img_size`` when patches are larger. ``resize`` (the demo's small images) resizes every patch
    first. Step 3's target samples get the weak/strong views of ``WeakStrongAugment``. Without
    ``proto_ignore_index`` (legacy) the pixels that the prototype NLL reads must not be ignored ones
    (where the stage's method has that loss, ``Method.prototype_nll``).
    """
    resize = [Resize(cfg.resize)] if cfg.resize else []
    crop = [WeakAugment(cfg.img_size, scale_range=(1.0, 1.0), hflip=0.0)]
    if not cfg.proto_ignore_index and method_class(STAGES[cfg.stage].method).prototype_nll:
        crop.append(RejectIgnored(FEATURE_STRIDE))
    strong = WeakStrongAugment(cfg.img_size, scale_range=tuple(cfg.weak_scale), hflip=cfg.hflip,
                               n_ops=cfg.randaug_n, magnitude=cfg.randaug_m, cutout_frac=cfg.cutout_frac)
    eval_tf = Compose(resize) if resize else None
    return Compose([*resize, *crop]), eval_tf, Compose([*resize, strong])
