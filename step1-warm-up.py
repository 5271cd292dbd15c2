"""Step 1 of NAPG: warm-up with single-prototype groups and entropy adversarial training.

Run `python step1-warm-up.py --help` for the options this step reads;
`--config configs/<pair>.yaml` sets a domain pair.
"""

from engine.cli import stage_main
from utils.errors import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(lambda argv: stage_main("step1", argv)))
