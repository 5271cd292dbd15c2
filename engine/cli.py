"""The command line shared by the step scripts: flags -> resolved config -> ``run_stage``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from utils.config import add_config_arguments, config_from_args
from utils.paths import check_output_folder
from utils.stages import STAGES


def build_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=STAGES[stage].description,
        epilog="Options resolve as: built-in defaults < stage defaults < --preset < --config YAML "
               "(top level, then its '" + stage + ":' section) < flags.")
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def stage_main(stage: str, argv: Sequence[str] | None = None) -> int:
    args = build_parser(stage).parse_args(argv)
    cfg = config_from_args(stage, args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    # A folder that cannot be written fails the run now, not after its data were read and its network built.
    work_dir = check_output_folder(cfg.work_dir, "--work-dir")
    check_output_folder(work_dir / stage, "--work-dir")
    from engine.trainer import run_stage  # heavy imports only when training
    from utils import dist

    try:
        run_stage(cfg)
    finally:
        dist.shutdown()
    return 0
