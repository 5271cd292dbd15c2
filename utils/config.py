"""Configuration: defaults in one place, a YAML file per experiment, flags override both.

Resolution order (later wins)::

    OPTIONS defaults -> STAGES[stage].defaults -> PRESETS[preset] -> YAML top level -> YAML[stage] -> flags

Every option is a command-line flag (``lr_d`` -> ``--lr-d``). Unknown keys in a YAML file, unknown
presets and values of the wrong type are user errors. ``paper`` is the method as the paper describes it
with the released code's bugs fixed; ``legacy`` reproduces the released code's arithmetic (docs/method.md
§8); a preset is only a set of option values.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data.isprs import NUM_CLASSES
from utils.errors import UserError
from utils.stages import STAGES


@dataclass(frozen=True)
class Option:
    default: Any
    type: type  # element type for lists
    help: str
    is_list: bool = False
    nullable: bool = False
    choices: tuple | None = None


def int_or_auto(value: Any) -> int | str:
    """A count >= 1, or "auto" (scikit-learn's ``n_init="auto"``: one run for k-means++ seeding)."""
    if str(value).lower() == "auto":
        return "auto"
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()) or int(value) < 1:
        raise ValueError(value)
    return int(value)


def _o(default, typ, help, *, is_list=False, nullable=False, choices=None) -> Option:
    return Option(default, typ, help, is_list, nullable, choices)


OPTIONS: dict[str, Option] = {
    # --- data ---
    "data_root": _o("data", str, "folder holding the prepared domain folders"),
    "source": _o("potsdam_irrg", str, "source domain (registered name, alias or path)"),
    "target": _o("vaihingen_irrg", str, "target domain (registered name, alias or path)"),
    "num_classes": _o(6, int, "number of classes (train ids 0..C-1, 255 = ignore)"),
    "img_size": _o(512, int, "training crop/input side in pixels (multiple of 32)"),
    "resize": _o(None, int, "resize every patch to this side before use (demo data only)", nullable=True),
    "batch_size": _o(10, int, "images per domain per iteration"),
    "eval_batch_size": _o(10, int, "images per batch in refresh and evaluation passes"),
    "num_workers": _o(2, int, "data-loader worker processes"),
    "normalize": _o("unit", str, "input normalisation", choices=("unit", "imagenet")),
    "label_format": _o(None, str, "label format of all domains (default: meta.json or scan)", nullable=True,
                       choices=("mmseg_raw", "train_ids")),
    "target_eval_split": _o("val", str, "target split used for evaluation", choices=("val", "train")),
    # --- model ---
    "backbone": _o("resnet50", str, "ResNet depth", choices=("resnet18", "resnet34", "resnet50", "resnet101")),
    "pretrained": _o(None, str, "'imagenet' (torchvision cache) or a path to ResNet weights", nullable=True),
    "shared_similarity": _o(True, bool, "one similarity conv for all classes (the original)"),
    "head_impl": _o("fast", str, "prototype head implementation", choices=("fast", "reference")),
    "bn_stats": _o("domain", str, "BatchNorm running statistics of the stages that see the target: one per "
                   "domain, or one shared mixture (the released code)", choices=("domain", "shared")),
    # --- optimisation ---
    "lr": _o(1e-4, float, "segmenter learning rate (Adam, constant)"),
    "lr_d": _o(1e-4, float, "discriminator learning rate (Adam, constant)"),
    "betas": _o([0.5, 0.999], float, "segmenter Adam betas", is_list=True),
    "betas_d": _o([0.9, 0.99], float, "discriminator Adam betas", is_list=True),
    "weight_decay": _o(0.0, float, "segmenter weight decay"),
    "epochs": _o(30, int, "epochs of this stage"),
    "iters_per_epoch": _o(None, int, "cap on iterations per epoch (smoke runs)", nullable=True),
    "legacy_epoch_length": _o(False, bool, "an epoch is one batch short of a pass over the data (released code)"),
    # --- prototypes ---
    "clusters": _o([1, 1, 1, 1, 1, 1], int, "k-means groups per class (K = max; K_c must divide K)",
                   is_list=True),
    "auto_k": _o(False, bool, "choose K per class from the centroid variance (k_min/k_max)"),
    "auto_k_max": _o(4, int, "K for high-variance classes with --auto-k"),
    "auto_k_threshold": _o(0.5, float, "normalised-variance threshold of --auto-k"),
    "kmeans_backend": _o("torch", str, "k-means implementation", choices=("torch", "sklearn")),
    "kmeans_n_init": _o(10, int_or_auto, "k-means restarts, or 'auto' (scikit-learn's default since 1.4: "
                        "1 run with k-means++)"),
    "kmeans_seed": _o(0, int, "k-means seed (scikit-learn's random_state)"),
    "tgt_proto_start": _o(1, int, "first epoch whose prototypes use target pseudo-labels (0 = never)"),
    "tau_start": _o(0.9, float, "confidence threshold at epoch tgt_proto_start"),
    "tau_step": _o(0.01, float, "decrease of the threshold per epoch"),
    "tau_min": _o(0.0, float, "lower bound of the threshold"),
    "refresh": _o("clean", str, "prototype refresh pass: every image once, or the released code's lock-step "
                  "loop over a shuffled source loader (seeded by --seed and the epoch)", choices=("clean", "legacy")),
    "refresh_max_batches": _o(None, int, "cap on refresh batches per role (smoke runs)", nullable=True),
    "refresh_balance": _o(True, bool, "weight source and target equally in each class's refresh pool"),
    # --- losses ---
    "w_ce": _o(1.0, float, "classifier cross-entropy weight"),
    "w_proto": _o(1.0, float, "prototype NLL weight"),
    "proto_ignore_index": _o(True, bool, "prototype NLL ignores label 255 (legacy: no ignore index)"),
    "w_adv_d1": _o(0.001, float, "adversarial weight through D1"),
    "w_adv_d2": _o(0.001, float, "adversarial weight through D2"),
    "legacy_d2_gen": _o(False, bool, "D2 generator term uses the source map twice (released code)"),
    "legacy_d2_step1": _o(False, bool, "step-1 D2 update uses the source map twice (released code)"),
    "w_gnce": _o(0.0, float, "GNCE neighbourhood-loss weight"),
    "gnce_start_epoch": _o(1, int, "first epoch with the GNCE term"),
    "gnce_windows": _o([1, 1, 1, 1, 1, 1], int, "GNCE window per class (0 skips the class)", is_list=True),
    "gnce_target_weight": _o(0.0, float, "relative weight of the GNCE term on target images"),
    "gnce_target_mask": _o(False, bool, "restrict target GNCE to confident pixels (tau)"),
    # --- step 3 ---
    "w_kd": _o(1.0, float, "feature distillation weight"),
    "kd_temperature": _o(2.0, float, "distillation temperature"),
    "kd_normalize": _o("valid", str, "distillation normaliser", choices=("valid", "all")),
    "w_ce_src": _o(0.0, float, "source cross-entropy weight in step 3"),
    "ema_momentum": _o(None, float, "teacher EMA momentum (default: frozen teacher)", nullable=True),
    "weak_scale": _o([1.0, 2.0], float, "random scale range of the weak view", is_list=True),
    "hflip": _o(0.5, float, "horizontal-flip probability of the weak view"),
    "randaug_n": _o(2, int, "RandAugment ops per strong view"),
    "randaug_m": _o(3, int, "RandAugment magnitude"),
    "cutout_frac": _o(1 / 3, float, "cutout side as a fraction of the crop"),
    "legacy_geometry": _o(False, bool, "strong-view geometry at the released code's scale 1 (4x off)"),
    # --- evaluation ---
    "eval_every": _o(0, int, "evaluate every N iterations instead of at the end of each epoch (0); the "
                   "finished stage is always evaluated"),
    "eval_max_batches": _o(None, int, "cap on evaluation batches (smoke runs)", nullable=True),
    "select_on_target_val": _o(False, bool, "also keep the best checkpoint by target-val mIoU (oracle)"),
    # --- speed ---
    "amp": _o("off", str, "mixed precision (losses, softmax and entropies stay float32)",
              choices=("off", "bf16", "fp16")),
    "channels_last": _o(False, bool, "channels-last memory format for the network"),
    "compile": _o(False, bool, "torch.compile the network"),
    "sync_bn": _o(False, bool, "SyncBatchNorm under torchrun"),
    "cache": _o(False, bool, "decode each split once into a memory-mapped uint8 cache"),
    # --- run ---
    "work_dir": _o("runs/default", str, "run folder of the pipeline; each stage writes <work_dir>/<stage>"),
    "init": _o(None, str, "run folder or checkpoint of the previous stage", nullable=True),
    "resume": _o(False, bool, "continue this stage from <work_dir>/<stage>/last.pt"),
    "overwrite": _o(False, bool, "replace an existing finished stage folder"),
    "seed": _o(1240, int, "seed of python, numpy and torch"),
    "deterministic": _o(False, bool, "deterministic algorithms (CPU runs repeat bit for bit)"),
    "device": _o("auto", str, "cpu, cuda, cuda:N or auto"),
    "stop_after": _o(None, int, "stop (with a checkpoint) after N iterations of this invocation; --resume "
                     "continues", nullable=True),
    "checkpoint_every": _o(0, int, "also write last.pt every N iterations (0 = end of epoch only)"),
    "log_every": _o(10, int, "scalar logging period in iterations"),
    "progress": _o(True, bool, "tqdm progress bars"),
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "legacy": {"legacy_d2_gen": True, "legacy_d2_step1@step1": True, "w_gnce@step2": 0.0,
               "proto_ignore_index": False, "refresh": "legacy", "legacy_geometry": True,
               "kd_normalize": "all", "legacy_epoch_length": True, "kmeans_backend": "sklearn",
               "kmeans_n_init": "auto", "bn_stats": "shared", "refresh_balance": False},
}


INF = float("inf")
# Allowed range (inclusive) of every numeric option, checked for each value of a list; None passes.
RANGES: dict[str, tuple[float, float]] = {
    "num_classes": (1, INF), "img_size": (32, INF), "resize": (32, INF), "batch_size": (2, INF),
    "eval_batch_size": (1, INF), "num_workers": (0, INF), "lr": (1e-12, INF), "lr_d": (1e-12, INF),
    "betas": (0.0, 0.999999), "betas_d": (0.0, 0.999999), "weight_decay": (0.0, INF), "epochs": (1, INF),
    "iters_per_epoch": (1, INF), "clusters": (1, INF), "auto_k_max": (1, INF), "auto_k_threshold": (0.0, INF),
    "kmeans_n_init": (1, INF), "kmeans_seed": (0, 2**32 - 1), "tgt_proto_start": (0, INF),
    "tau_start": (0.0, 1.0), "tau_step": (0.0, 1.0), "tau_min": (0.0, 1.0), "refresh_max_batches": (1, INF),
    "w_ce": (0.0, INF), "w_proto": (0.0, INF), "w_adv_d1": (0.0, INF), "w_adv_d2": (0.0, INF),
    "w_gnce": (0.0, INF), "gnce_start_epoch": (0, INF), "gnce_windows": (0, INF), "gnce_target_weight": (0.0, INF),
    "w_kd": (0.0, INF), "kd_temperature": (1e-6, INF), "w_ce_src": (0.0, INF), "ema_momentum": (0.0, 1.0),
    "weak_scale": (1e-3, INF), "hflip": (0.0, 1.0), "randaug_n": (0, INF), "randaug_m": (2, 10),
    "cutout_frac": (0.0, 1.0), "eval_every": (0, INF), "eval_max_batches": (1, INF), "seed": (0, 2**32 - 1),
    "stop_after": (1, INF), "checkpoint_every": (0, INF), "log_every": (1, INF),
}
# Options that hold a fixed number of values.
LENGTHS = {"betas": 2, "betas_d": 2, "weak_scale": 2}


def _coerce(key: str, value: Any, where: str) -> Any:
    opt = OPTIONS[key]
    if opt.nullable and isinstance(value, str) and value.lower() in ("null", "none"):
        value = None  # how a flag says "unset", e.g. --pretrained null
    if value is None:
        if opt.nullable:
            return None
        raise UserError(f"{where}: '{key}' may not be empty")
    if opt.is_list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce_scalar(key, v, opt, where) for v in value]
    return _coerce_scalar(key, value, opt, where)


def _coerce_scalar(key: str, value: Any, opt: Option, where: str) -> Any:
    try:
        if opt.type is bool:
            if isinstance(value, bool):
                out = value
            elif str(value).lower() in ("1", "true", "yes", "on"):
                out = True
            elif str(value).lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError(value)
        elif opt.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            out = int(value)
        elif opt.type is float:
            if isinstance(value, bool):
                raise ValueError(value)
            out = float(value)
        else:
            out = opt.type(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: '{key}' must be {opt.type.__name__}, got {value!r}") from None
    if opt.choices is not None and out not in opt.choices:
        raise UserError(f"{where}: '{key}' must be one of {', '.join(map(str, opt.choices))}, got {out!r}")
    return out


def _apply(cfg: dict[str, Any], values: dict[str, Any], stage: str, where: str) -> None:
    for key, value in values.items():
        if "@" in key:  # preset entries that apply to one stage only
            key, only = key.split("@")
            if only != stage:
                continue
        if key not in OPTIONS:
            raise UserError(f"{where}: unknown key '{key}' (see `--help` for the valid options)")
        cfg[key] = _coerce(key, value, where)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found (the shipped ones are in configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    return data


def resolve_config(stage: str, yaml_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                   preset: str | None = None, yaml_name: str = "config") -> dict[str, Any]:
    """The resolved option dict of ``stage`` (see the module docstring for the order)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage}")
    yaml_data = dict(yaml_data or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    stage_sections = {s: yaml_data.pop(s) for s in STAGES if s in yaml_data}
    for s, section in stage_sections.items():
        if not isinstance(section, dict):
            raise UserError(f"{yaml_name}: section '{s}' must be a mapping")
    preset = preset or overrides.pop("preset", None) or yaml_data.pop("preset", None) or "paper"
    yaml_data.pop("preset", None)
    overrides.pop("preset", None)
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    cfg = {k: opt.default for k, opt in OPTIONS.items()}
    _apply(cfg, STAGES[stage].defaults, stage, "stage defaults")
    _apply(cfg, PRESETS[preset], stage, f"preset {preset}")
    _apply(cfg, yaml_data, stage, yaml_name)
    _apply(cfg, stage_sections.get(stage, {}), stage, f"{yaml_name} [{stage}]")
    _apply(cfg, overrides, stage, "command line")
    cfg["preset"] = preset
    cfg["stage"] = stage
    validate(cfg)
    return cfg


def validate(cfg: dict[str, Any]) -> None:
    """Ranges, list lengths and cross-option checks: each mistake is one :class:`UserError`."""
    _check_ranges(cfg)
    c = cfg["num_classes"]
    if c != NUM_CLASSES:
        raise UserError(f"'num_classes' must be {NUM_CLASSES}: the data's labels are the {NUM_CLASSES} ISPRS classes "
                        f"(train ids 0..{NUM_CLASSES - 1}), got {c}")
    for key in ("clusters", "gnce_windows"):
        if len(cfg[key]) != c:
            raise UserError(f"'{key}' needs {c} values (one per class), got {len(cfg[key])}")
    if any(k < 1 for k in cfg["clusters"]):
        raise UserError("'clusters' values must be >= 1")
    k_max = max(cfg["clusters"])
    if any(k_max % k for k in cfg["clusters"]):
        raise UserError(f"every value of 'clusters' must divide the largest ({k_max}), got {cfg['clusters']}")
    side = cfg["resize"] or cfg["img_size"]
    if cfg["img_size"] % 32 or side % 32:
        raise UserError(f"image sides must be multiples of 32, got img_size={cfg['img_size']}, resize={cfg['resize']}")
    if cfg["batch_size"] < 2:
        raise UserError("'batch_size' must be >= 2 per process: the ASPP image-pooling branch's BatchNorm "
                        "needs two samples in training mode")
    if cfg["weak_scale"][0] > cfg["weak_scale"][1]:
        raise UserError(f"'weak_scale' is a range low high, got {cfg['weak_scale']}")
    if cfg["tau_min"] > cfg["tau_start"]:
        raise UserError(f"'tau_min' ({cfg['tau_min']}) must not exceed 'tau_start' ({cfg['tau_start']})")
    device = cfg["device"]
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise UserError(f"'device' must be auto, cpu, cuda or cuda:N, got {device!r}")


def _check_ranges(cfg: dict[str, Any]) -> None:
    for key, length in LENGTHS.items():
        if len(cfg[key]) != length:
            raise UserError(f"'{key}' needs {length} values, got {len(cfg[key])}: {cfg[key]}")
    for key, (low, high) in RANGES.items():
        values = cfg[key] if OPTIONS[key].is_list else [cfg[key]]
        for value in values:
            if value is None or value == "auto":  # unset, or kmeans_n_init's scikit-learn choice
                continue
            # Written so that NaN fails too.
            if not (low <= value <= high and math.isfinite(value)):
                span = f">= {low:g}" if high == INF else f"in {low:g}..{high:g}"
                raise UserError(f"'{key}' must be {span}, got {value}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option, plus ``--config`` and ``--preset``; flag defaults are None (= not given)."""
    parser.add_argument("--config", help="YAML file with option: value pairs (see configs/)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="paper (default) or legacy")
    for key, opt in OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        metavar = opt.type.__name__.upper()
        if opt.type is bool:
            parser.add_argument(flag, dest=key, nargs="?", const="true", default=None, metavar="BOOL",
                                help=f"{opt.help} (default {opt.default})")
        elif opt.is_list:
            parser.add_argument(flag, dest=key, nargs="+", default=None, metavar=metavar,
                                help=f"{opt.help} (default {opt.default})")
        else:
            parser.add_argument(flag, dest=key, default=None, metavar=metavar,
                                choices=None, help=f"{opt.help} (default {opt.default})")


def config_from_args(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    yaml_data = load_yaml(args.config) if args.config else {}
    overrides = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
    return resolve_config(stage, yaml_data, overrides, preset=args.preset,
                          yaml_name=str(args.config) if args.config else "config")


def dump_config(cfg: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
