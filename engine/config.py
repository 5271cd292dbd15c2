"""A stage's :class:`~utils.config.Config` resolved from every layer (later wins)::

    Config defaults -> STAGES[stage].defaults -> benchmark defaults -> PRESETS[preset] -> YAML top level
    -> YAML[stage] -> flags

The benchmark defaults (``num_classes`` and the per-class lists ``clusters`` and ``gnce_windows``) come from the
declaration (data/benchmarks.py) of the data's benchmark: the source's and target's meta.json, else the
declaration that registers their names, else ISPRS. A ``num_classes`` that contradicts the data's is refused.
The options, presets and checks are ``utils/config.py``'s; this module only adds what needs the data.
"""

from __future__ import annotations

import argparse
from typing import Any

from data.benchmarks import ISPRS
from data.domains import check_num_classes, run_benchmark
from utils.config import OPTIONS, PRESETS, Config, apply_values, load_yaml, overrides_from_args
from utils.errors import UserError
from utils.stages import STAGES


def resolve_config(stage: str, yaml_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                   preset: str | None = None, yaml_name: str = "config") -> Config:
    """The resolved :class:`Config` of ``stage`` (see the module docstring for the order)."""
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
    values: dict[str, Any] = {}
    apply_values(values, STAGES[stage].defaults, "stage defaults")
    apply_values(values, PRESETS[preset].for_stage(stage), f"preset {preset}")
    apply_values(values, yaml_data, yaml_name)
    apply_values(values, stage_sections.get(stage, {}), f"{yaml_name} [{stage}]")
    apply_values(values, overrides, "command line")
    data = {key: values.get(key, OPTIONS[key].default) for key in ("data_root", "source", "target")}
    benchmark = run_benchmark(data["data_root"], data["source"], data["target"])
    if benchmark is not None and "num_classes" in values:
        check_num_classes(values["num_classes"], benchmark)
    # The benchmark's values sit under everything but the stage defaults, which set none of them.
    benchmark_values: dict[str, Any] = {}
    apply_values(benchmark_values, (benchmark or ISPRS).defaults(stage), "benchmark defaults")
    return Config(stage=stage, preset=preset, **{**benchmark_values, **values})


def config_from_args(stage: str, args: argparse.Namespace) -> Config:
    """The stage's :class:`Config` from the flags of :func:`utils.config.add_config_arguments`."""
    yaml_data = load_yaml(args.config) if args.config else {}
    return resolve_config(stage, yaml_data, overrides_from_args(args),
                          yaml_name=str(args.config) if args.config else "config")
