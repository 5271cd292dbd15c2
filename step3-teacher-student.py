"""Step 3 (not in the paper): teacher-student feature distillation on target views.

Run `python step3-teacher-student.py --help` for the options this step reads;
`--config configs/<pair>.yaml` sets a domain pair.
"""

from engine.cli import stage_main
from utils.errors import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(lambda argv: stage_main("step3", argv)))
