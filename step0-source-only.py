"""Source-only baseline (what every gain is measured against).

Run `python step0-source-only.py --help` for the options this step reads;
`--config configs/<pair>.yaml` sets a domain pair.
"""

from engine.cli import stage_main
from utils.errors import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(lambda argv: stage_main("step0", argv)))
