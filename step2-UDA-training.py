"""Step 2 of NAPG: UDA training with multi-prototype groups (MPG) and GNCE.

Run `python step2-UDA-training.py --help` for the options this step reads;
`--config configs/<pair>.yaml` sets a domain pair.
"""

from engine.cli import stage_main
from utils.errors import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(lambda argv: stage_main("step2", argv)))
