"""Configuration: one typed, frozen :class:`Config`, a YAML file per experiment, flags override both.

Every option is one field of :class:`Config`: its annotation is the type, and :func:`option` holds the
default, the help text, the allowed range and the list length. The command line (one flag per field,
``lr_d`` -> ``--lr-d``), the YAML loader and the validation are all derived from those rows, so an
option is described in exactly one place. Resolution order (later wins)::

    Config defaults -> STAGES[stage].defaults -> benchmark defaults -> PRESETS[preset] -> YAML top level
    -> YAML[stage] -> flags

The resolution itself is ``engine/config.py:resolve_config``: the benchmark defaults come from the data.

Unknown keys in a YAML file, unknown presets and values of the wrong type are user errors, and a
``Config`` cannot be built (or ``dataclasses.replace``-d) with a value out of range. ``paper`` is the
method as the paper describes it with the released code's bugs fixed; ``legacy`` reproduces the
released code's arithmetic (docs/method.md §8); a preset is only a set of option values.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from utils.errors import UserError
from utils.flags import format_value
from utils.stages import STAGES

INF = float("inf")


def int_or_auto(value: Any) -> int | str:
    """A count >= 1, or "auto" (scikit-learn's ``n_init="auto"``: one run for k-means++ seeding)."""
    if str(value).lower() == "auto":
        return "auto"
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()) or int(value) < 1:
        raise ValueError(value)
    return int(value)


def option(default: Any, help: str, *, range: tuple[float, float] | None = None, length: int | None = None,
           parse: Callable[[Any], Any] | None = None) -> Any:
    """One option's row: its default, help text, allowed range (inclusive, for each value of a list),
    fixed number of values, and a parser for a type that is not a plain int/float/str/bool."""
    return field(default=default, metadata={"help": help, "range": range, "length": length, "parse": parse})


@dataclass(frozen=True)
class Config:
    """The resolved options of one stage. Build it with :func:`resolve_config`; it never changes."""

    stage: str  # a name of utils/stages.py's table: "step0".."step3" or a baseline
    preset: str = "paper"
    # --- data ---
    data_root: str = option("data", "folder holding the prepared domain folders")
    source: str = option("potsdam_irrg", "source domain (registered name, alias or path)")
    target: str = option("vaihingen_irrg", "target domain (registered name, alias or path)")
    # num_classes, clusters, gnce_windows: the ISPRS values here; resolve_config sets the data's benchmark's.
    num_classes: int = option(6, "number of classes (train ids 0..C-1, 255 = ignore; default: the "
                              "data's benchmark, from meta.json)", range=(1, INF))
    img_size: int = option(512, "training crop/input side in pixels (multiple of 32)", range=(32, INF))
    resize: int | None = option(None, "resize every patch to this side before use (demo data only)",
                                range=(32, INF))
    batch_size: int = option(10, "images per domain per iteration", range=(2, INF))
    eval_batch_size: int = option(10, "images per batch in refresh and evaluation passes", range=(1, INF))
    num_workers: int = option(2, "data-loader worker processes", range=(0, INF))
    normalize: Literal["unit", "imagenet"] = option("unit", "input normalisation")
    label_format: Literal["mmseg_raw", "train_ids"] | None = option(
        None, "label format of all domains (none: from meta.json, else a scan of the labels)")
    target_eval_split: Literal["val", "train"] = option("val", "target split used for evaluation")
    # --- model ---
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = option("resnet50", "ResNet depth")
    pretrained: str | None = option(None, "'imagenet' (torchvision cache) or a path to ResNet weights")
    shared_similarity: bool = option(True, "one similarity conv for all classes (the original)")
    head_impl: Literal["fast", "reference"] = option("fast", "prototype head implementation")
    bn_stats: Literal["domain", "shared"] = option(
        "domain", "BatchNorm running statistics of the stages that see the target: one per domain, or one "
        "shared mixture (the released code)")
    window: int | None = option(
        None, "segment inputs larger than WINDOW px in non-overlapping WINDOW-px windows (evaluation, refresh, "
        "BatchNorm re-estimation); set it to img_size to evaluate larger patches as the network was trained "
        "(none: inputs whole)", range=(32, INF))
    # --- optimisation ---
    lr: float = option(1e-4, "segmenter learning rate (Adam, constant)", range=(1e-12, INF))
    lr_d: float = option(1e-4, "discriminator learning rate (Adam, constant)", range=(1e-12, INF))
    betas: tuple[float, ...] = option((0.5, 0.999), "segmenter Adam betas", range=(0.0, 0.999999), length=2)
    betas_d: tuple[float, ...] = option((0.9, 0.99), "discriminator Adam betas", range=(0.0, 0.999999), length=2)
    weight_decay: float = option(0.0, "segmenter weight decay", range=(0.0, INF))
    weight_ema: float | None = option(
        None, "momentum of an exponential moving average of the segmenter's weights that evaluation, the "
        "pictures and the hand-off use (a stabiliser, e.g. 0.99; none: the weights as trained, as the paper)",
        range=(0.0, 0.999999))
    epochs: int = option(30, "epochs of this stage", range=(1, INF))
    iters_per_epoch: int | None = option(None, "cap on iterations per epoch (smoke runs)", range=(1, INF))
    legacy_epoch_length: bool = option(False, "an epoch is one batch short of a pass over the data (released code)")
    # --- prototypes ---
    clusters: tuple[int, ...] = option((1,) * 6, "k-means groups per class (K = max; K_c must divide K; "
                                       "default: the data's benchmark's for the stage)", range=(1, INF))
    auto_k: bool = option(False, "choose K per class from the centroid variance (k_min/k_max)")
    auto_k_max: int = option(4, "K for high-variance classes with --auto-k", range=(1, INF))
    auto_k_threshold: float = option(0.5, "normalised-variance threshold of --auto-k", range=(0.0, INF))
    kmeans_backend: Literal["torch", "sklearn"] = option("torch", "k-means implementation")
    kmeans_n_init: int | str = option(10, "k-means restarts, or 'auto' (what scikit-learn uses since 1.4: 1 run "
                                      "with k-means++)", range=(1, INF), parse=int_or_auto)
    kmeans_seed: int = option(0, "k-means seed (scikit-learn's random_state)", range=(0, 2**32 - 1))
    tgt_proto_start: int = option(1, "first epoch whose prototypes use target pseudo-labels (0 = never)",
                                  range=(0, INF))
    tau_start: float = option(0.9, "confidence threshold at epoch tgt_proto_start", range=(0.0, 1.0))
    tau_step: float = option(0.01, "decrease of the threshold per epoch", range=(0.0, 1.0))
    tau_min: float = option(0.0, "lower bound of the threshold", range=(0.0, 1.0))
    refresh: Literal["clean", "legacy"] = option(
        "clean", "prototype refresh pass: every image once, or the released code's lock-step loop over a "
        "shuffled source loader (seeded by --seed and the epoch)")
    refresh_max_batches: int | None = option(None, "cap on refresh batches per role (smoke runs)", range=(1, INF))
    refresh_balance: bool = option(True, "weight source and target equally in each class's refresh pool")
    # --- losses ---
    w_ce: float = option(1.0, "classifier cross-entropy weight", range=(0.0, INF))
    w_proto: float = option(1.0, "prototype NLL weight", range=(0.0, INF))
    proto_ignore_index: bool = option(True, "prototype NLL ignores label 255 (legacy: no ignore index)")
    w_adv_d1: float = option(0.001, "adversarial weight through D1", range=(0.0, INF))
    w_adv_d2: float = option(0.001, "adversarial weight through D2", range=(0.0, INF))
    legacy_d2_gen: bool = option(False, "D2 generator term uses the source map twice (released code)")
    legacy_d2_step1: bool = option(False, "step-1 D2 update uses the source map twice (released code)")
    w_gnce: float = option(0.0, "GNCE neighbourhood-loss weight", range=(0.0, INF))
    gnce_start_epoch: int = option(1, "first epoch with the GNCE term", range=(0, INF))
    gnce_windows: tuple[int, ...] = option((1,) * 6, "GNCE window per class (0 skips the class; "
                                           "default: the data's benchmark's for the stage)", range=(0, INF))
    gnce_target_weight: float = option(0.0, "relative weight of the GNCE term on target images", range=(0.0, INF))
    gnce_target_mask: bool = option(False, "restrict target GNCE to confident pixels (tau)")
    # --- step 3 ---
    w_kd: float = option(1.0, "feature distillation weight", range=(0.0, INF))
    kd_temperature: float = option(2.0, "distillation temperature", range=(1e-6, INF))
    kd_normalize: Literal["valid", "all"] = option("valid", "distillation normaliser")
    w_ce_src: float = option(0.0, "source cross-entropy weight in step 3", range=(0.0, INF))
    ema_momentum: float | None = option(None, "teacher EMA momentum (none: a frozen teacher; DACS uses 0.99)",
                                        range=(0.0, 1.0))
    weak_scale: tuple[float, ...] = option((1.0, 2.0), "random scale range of the weak view", range=(1e-3, INF),
                                           length=2)
    hflip: float = option(0.5, "horizontal-flip probability of the weak view", range=(0.0, 1.0))
    randaug_n: int = option(2, "RandAugment ops per strong view", range=(0, INF))
    randaug_m: int = option(3, "RandAugment magnitude", range=(2, 10))
    cutout_frac: float = option(1 / 3, "cutout side as a fraction of the crop", range=(0.0, 1.0))
    legacy_geometry: bool = option(False, "strong-view geometry at the released code's scale 1 (4x off)")
    # --- baselines (docs/method.md, "Baselines") ---
    # ADVENT's lambda_ent (with SGD). Kept under this project's Adam: what the weight sets is the entropy
    # term's share of the gradient beside the CE of weight 1, which Adam's per-parameter step size does not
    # rescale; the project keeps ADVENT's 0.001 for its adversarial weights under Adam in the same way.
    w_ent: float = option(0.001, "target entropy weight (minent; ADVENT's 0.001)", range=(0.0, INF))
    pseudo_threshold: float = option(0.968, "teacher confidence from which a pseudo-label counts toward the "
                                     "self-training weight (dacs; DACS/DAFormer's 0.968)", range=(0.0, 1.0))
    # --- evaluation ---
    eval_every: int = option(0, "evaluate every N iterations instead of at the end of each epoch (0); the "
                             "finished stage is always evaluated", range=(0, INF))
    eval_max_batches: int | None = option(None, "cap on evaluation batches (smoke runs)", range=(1, INF))
    select_on_target_val: bool = option(False, "also keep the best checkpoint by target-val mIoU (oracle)")
    # --- speed ---
    amp: Literal["off", "bf16", "fp16"] = option("off", "mixed precision (losses, softmax and entropies stay "
                                                 "float32)")
    channels_last: bool = option(False, "channels-last memory format for the network")
    compile: bool = option(False, "torch.compile the network")
    sync_bn: bool = option(False, "SyncBatchNorm under torchrun")
    cache: bool = option(False, "decode each split once into a memory-mapped uint8 cache")
    # --- run ---
    work_dir: str = option("runs/default", "run folder of the pipeline; each stage writes <work_dir>/<stage>")
    init: str | None = option(None, "run folder or checkpoint of the previous stage")
    resume: bool = option(False, "continue this stage from <work_dir>/<stage>/last.pt")
    overwrite: bool = option(False, "replace an existing finished stage folder")
    seed: int = option(1240, "seed of python, numpy and torch", range=(0, 2**32 - 1))
    deterministic: bool = option(False, "deterministic algorithms (CPU runs repeat bit for bit)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    stop_after: int | None = option(None, "stop (with a checkpoint) after N iterations of this invocation; "
                                    "--resume continues", range=(1, INF))
    checkpoint_every: int = option(0, "also write last.pt every N iterations (0 = end of epoch only)",
                                   range=(0, INF))
    log_every: int = option(10, "scalar logging period in iterations", range=(1, INF))
    progress: bool = option(True, "tqdm progress bars")

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ schedules (1-based stage epochs)
    def tau_at(self, epoch: int) -> float | None:
        """Confidence threshold of the target pseudo-labels at ``epoch``, None before target use."""
        start = self.tgt_proto_start
        if start < 1 or epoch < start:
            return None
        return max(self.tau_min, self.tau_start - self.tau_step * (epoch - start))

    def gnce_weight_at(self, epoch: int) -> float:
        """Weight of the GNCE term at ``epoch`` (0 before ``gnce_start_epoch``)."""
        return self.w_gnce if epoch >= self.gnce_start_epoch else 0.0

    def steady_epoch(self) -> int:
        """The first epoch at which every schedule of the stage has reached its steady form (target
        prototypes on, GNCE on): what a throughput measurement should time."""
        return max(1, self.tgt_proto_start, self.gnce_start_epoch if self.w_gnce > 0 else 1)

    def to_dict(self) -> dict[str, Any]:
        """The options as plain YAML/JSON values (lists for tuples), in the order of ``config.yaml``."""
        values = {name: list(v) if isinstance(v, tuple) else v
                  for name, v in ((n, getattr(self, n)) for n in OPTIONS)}
        return {**values, "preset": self.preset, "stage": self.stage}


@dataclass(frozen=True)
class Option:
    """One option's row, derived from its :class:`Config` field."""

    name: str
    default: Any
    type: type  # int, float, str or bool; the element type of a list
    help: str
    is_list: bool = False
    nullable: bool = False
    choices: tuple | None = None
    range: tuple[float, float] | None = None
    length: int | None = None  # fixed number of values of a list
    parse: Callable[[Any], Any] | None = None


def _row(f: dataclasses.Field, annotation: Any) -> Option:
    """The :class:`Option` of one field from its annotation (``X | None``, ``Literal``, ``tuple[X, ...]``)."""
    args = typing.get_args(annotation)
    nullable = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if nullable:
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    is_list = typing.get_origin(annotation) is tuple
    if is_list:
        annotation = typing.get_args(annotation)[0]
    choices = None
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        annotation = type(choices[0])
    meta = f.metadata
    if meta["parse"] is not None:
        annotation = meta["parse"]
    return Option(f.name, f.default, annotation, meta["help"], is_list, nullable, choices, meta["range"],
                  meta["length"], meta["parse"])


_HINTS = typing.get_type_hints(Config)
# name -> row, in the order of the fields; ``stage`` and ``preset`` are set by resolve_config, not options.
OPTIONS: dict[str, Option] = {f.name: _row(f, _HINTS[f.name]) for f in dataclasses.fields(Config)
                              if f.name not in ("stage", "preset")}

# The groups of a step script's --help, in order. A group runs from its first option in field order, except
# the schedules (kept beside their subjects in Config, looked up together) and the released code's switches.
HELP_GROUPS = ("presets and legacy switches", "data", "network", "optimisation", "schedules", "prototypes",
               "losses", "teacher-student and self-training", "evaluation", "speed", "run folder and resume")
_GROUP_STARTS = {"data_root": "data", "backbone": "network", "lr": "optimisation", "clusters": "prototypes",
                 "w_ce": "losses", "w_kd": "teacher-student and self-training", "w_ent": "losses",
                 "pseudo_threshold": "teacher-student and self-training", "eval_every": "evaluation",
                 "amp": "speed", "work_dir": "run folder and resume"}
_SCHEDULES = ("epochs", "iters_per_epoch", "tgt_proto_start", "tau_start", "tau_step", "tau_min",
              "gnce_start_epoch")


def _option_groups() -> dict[str, str]:
    groups, current = {}, "data"
    for name in OPTIONS:
        current = _GROUP_STARTS.get(name, current)
        groups[name] = ("schedules" if name in _SCHEDULES else
                        "presets and legacy switches" if name.startswith("legacy_") else current)
    return groups


OPTION_GROUPS: dict[str, str] = _option_groups()  # option name -> its --help group


@dataclass(frozen=True)
class Preset:
    """A named set of option values: ``values`` for every stage, ``stages[stage]`` for one stage only."""

    help: str
    values: Mapping[str, Any] = field(default_factory=dict)
    stages: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_stage(self, stage: str) -> dict[str, Any]:
        return {**self.values, **self.stages.get(stage, {})}


PRESETS: dict[str, Preset] = {
    "paper": Preset("the method as the paper describes it, the released code's bugs fixed"),
    "legacy": Preset(
        "the released code's arithmetic, bug for bug (docs/method.md §8)",
        values={"legacy_d2_gen": True, "proto_ignore_index": False, "refresh": "legacy", "legacy_geometry": True,
                "kd_normalize": "all", "legacy_epoch_length": True, "kmeans_backend": "sklearn",
                "kmeans_n_init": "auto", "bn_stats": "shared", "refresh_balance": False},
        stages={"step1": {"legacy_d2_step1": True}, "step2": {"w_gnce": 0.0}}),
}


# ---------------------------------------------------------------------------------------------- values
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
        return tuple(_coerce_scalar(key, v, opt, where) for v in value)
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


def apply_values(values: dict[str, Any], changes: Mapping[str, Any], where: str) -> None:
    for key, value in changes.items():
        if key not in OPTIONS:
            raise UserError(f"{where}: unknown key '{key}' (see `--help` for the valid options)")
        values[key] = _coerce(key, value, where)


def _validate(cfg: Config) -> None:
    """Types, ranges, list lengths and cross-option checks: each mistake is one :class:`UserError`."""
    for key, opt in OPTIONS.items():
        value = getattr(cfg, key)
        if value is None and opt.nullable:
            continue
        items = value if opt.is_list else (value,)
        if opt.is_list and not isinstance(value, tuple):
            raise UserError(f"'{key}' must be a tuple of {opt.type.__name__}, got {value!r}")
        if opt.length is not None and len(items) != opt.length:
            raise UserError(f"'{key}' needs {opt.length} values, got {len(items)}: {list(items)}")
        for item in items:
            if opt.parse is None and not (isinstance(item, opt.type) or opt.type is float and type(item) is int):
                raise UserError(f"'{key}' must be {opt.type.__name__}, got {item!r}")
            if opt.range is None or item == "auto":  # kmeans_n_init's scikit-learn choice
                continue
            low, high = opt.range
            if not (low <= item <= high and math.isfinite(item)):  # written so that NaN fails too
                span = f">= {low:g}" if high == INF else f"in {low:g}..{high:g}"
                raise UserError(f"'{key}' must be {span}, got {item}")
    c = cfg.num_classes
    for key in ("clusters", "gnce_windows"):
        if len(getattr(cfg, key)) != c:
            raise UserError(f"'{key}' needs {c} values (one per class), got {len(getattr(cfg, key))}")
    k_max = max(cfg.clusters)
    if any(k_max % k for k in cfg.clusters):
        raise UserError(f"every value of 'clusters' must divide the largest ({k_max}), got {list(cfg.clusters)}")
    side = cfg.resize or cfg.img_size
    if cfg.img_size % 32 or side % 32:
        raise UserError(f"image sides must be multiples of 32, got img_size={cfg.img_size}, resize={cfg.resize}")
    if cfg.window is not None and (cfg.img_size % cfg.window or side % cfg.window or cfg.window % 32):
        raise UserError(f"'window' must be a multiple of 32 that divides img_size and resize, got window="
                        f"{cfg.window}, img_size={cfg.img_size}, resize={cfg.resize}")
    if cfg.batch_size < 2:
        raise UserError("'batch_size' must be >= 2 per process: the ASPP image-pooling branch's BatchNorm "
                        "needs two samples in training mode")
    if cfg.weak_scale[0] > cfg.weak_scale[1]:
        raise UserError(f"'weak_scale' is a range low high, got {list(cfg.weak_scale)}")
    if cfg.tau_min > cfg.tau_start:
        raise UserError(f"'tau_min' ({cfg.tau_min}) must not exceed 'tau_start' ({cfg.tau_start})")
    if cfg.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", cfg.device):
        raise UserError(f"'device' must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage '{cfg.stage}' (choose from {', '.join(STAGES)})")
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown preset '{cfg.preset}' (choose from {', '.join(PRESETS)})")


# ---------------------------------------------------------------------------------------------- resolution
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


def load_config(path: Path) -> Config:
    """The :class:`Config` of a run folder's ``config.yaml`` (options added since it was written take their
    defaults)."""
    data = load_yaml(path)
    stage, preset = data.pop("stage", None), data.pop("preset", "paper")
    if stage not in STAGES:
        raise UserError(f"{path} names no stage; it is not a run folder's config.yaml")
    values: dict[str, Any] = {}
    apply_values(values, data, str(path))
    return Config(stage=stage, preset=preset, **values)


def add_config_arguments(parser: argparse.ArgumentParser, stage_values: Mapping[str, Any] | None = None,
                         listed: Collection[str] | None = None) -> dict[str, Any]:
    """One flag per option, plus ``--config`` and ``--preset``; flag defaults are None (= not given).

    With ``stage_values`` (a stage's resolved config as a dict), the flags sit in :data:`HELP_GROUPS` and
    each help text ends with the value that stage runs when neither YAML nor flags set it (its stage
    defaults and the ``paper`` preset applied): what ``--print-config`` prints. ``--help`` lists only the
    options in ``listed`` (None: all); the flags of the others are still accepted, so that one YAML file or
    command line serves every stage. Returns the argument groups by name (empty without ``stage_values``)."""
    stage = stage_values is not None
    groups = {name: parser.add_argument_group(name) for name in HELP_GROUPS} if stage else {}
    first = groups.get("presets and legacy switches", parser)
    first.add_argument("--config", metavar="YAML", help="YAML file with option: value pairs (see configs/)")
    first.add_argument("--preset", choices=sorted(PRESETS), help="; ".join(f"{name}: {p.help}"
                                                                         for name, p in PRESETS.items())
                       + " (default: paper)")
    for key, opt in OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        help = f"{opt.help} (default: {format_value(stage_values[key])})" if stage else opt.help
        help = help if listed is None or key in listed else argparse.SUPPRESS
        metavar = ("{" + ",".join(map(str, opt.choices)) + "}" if opt.choices else "BOOL" if opt.type is bool
                   else "INT|auto" if opt.parse is int_or_auto else opt.type.__name__.upper())
        target = groups.get(OPTION_GROUPS[key], parser)
        if opt.type is bool:
            target.add_argument(flag, dest=key, nargs="?", const="true", default=None, metavar=metavar, help=help)
        elif opt.is_list:
            target.add_argument(flag, dest=key, nargs="+", default=None, metavar=metavar, help=help)
        else:
            target.add_argument(flag, dest=key, default=None, metavar=metavar, help=help)
    return groups


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options (and ``preset``) that the flags of :func:`add_config_arguments` set: the ``overrides``
    of :func:`engine.config.resolve_config`."""
    overrides = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
    return {**overrides, "preset": args.preset} if args.preset else overrides


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
