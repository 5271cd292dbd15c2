"""The command line shared by the step scripts: flags -> resolved config -> ``run_stage``; and what the tools
that run stages (tools/run_pipeline.py, tools/validity.py) use instead of command lines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.config import config_from_args, resolve_config
from utils.config import Config, add_config_arguments, overrides_from_args
from utils.flags import FlagParser
from utils.paths import check_output_folder
from utils.stages import STAGES


def build_parser(stage: str) -> FlagParser:
    """The step script's parser: the options the stage reads, in groups, each with the stage's own default;
    the flags of the other options are accepted and not listed."""
    from engine.methods import stage_options  # the method classes: torch, only for a stage's parser

    parser = FlagParser(
        description=STAGES[stage].description,
        usage="%(prog)s [--config YAML] [--preset {legacy,paper}] [--OPTION VALUE ...]",
        epilog="Options resolve as: built-in defaults < stage defaults < --preset < --config YAML "
               "(top level, then its '" + stage + ":' section) < flags. The defaults shown are this stage's "
               "without YAML; --print-config shows what a command line resolves to. Only the options this stage "
               "reads are listed; the other stages' flags are accepted (and ignored here), so one config serves "
               "them all.")
    groups = add_config_arguments(parser, resolve_config(stage).to_dict(), stage_options(stage))
    groups["presets and legacy switches"].add_argument("--print-config", action="store_true",
                                                       help="print the resolved config and exit")
    return parser


def stage_main(stage: str, argv: Sequence[str] | None = None) -> int:
    args = build_parser(stage).parse_args(argv)
    cfg = config_from_args(stage, args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    train_stage(cfg)
    return 0


def train_stage(cfg: Config) -> dict[str, Any]:
    """``run_stage(cfg)`` in this process, then leave the process group it joined under torchrun."""
    # A folder that cannot be written fails the run now, not after its data were read and its network built.
    work_dir = check_output_folder(cfg.work_dir, "--work-dir")
    check_output_folder(work_dir / cfg.stage, "--work-dir")
    from engine.trainer import run_stage  # heavy imports only when training
    from utils import dist

    try:
        return run_stage(cfg)
    finally:
        dist.shutdown()


def flag_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """The options that stage flags in ``argv`` set, as ``resolve_config`` overrides: how a tool parses once
    the extra flags its user passes on to every stage it runs."""
    parser = FlagParser(description="options passed on to every stage")
    add_config_arguments(parser)
    return overrides_from_args(parser.parse_args(argv))
