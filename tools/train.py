"""Train any stage of the stage table by name: the runner of the stages without a step script (the baselines).

    python tools/train.py STAGE [flags]     e.g. python tools/train.py dacs --config configs/<pair>.yaml

``python tools/train.py STAGE --help`` lists the options that stage reads. The pipeline's steps also run here
(``tools/train.py step1`` is ``step1-warm-up.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cli import stage_main
from utils.errors import UserError, run_cli
from utils.stages import STAGES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in STAGES:
        given = f"got {argv[0]!r}" if argv else "none given"
        raise UserError(f"the first argument names the stage: one of {', '.join(STAGES)} ({given})")
    return stage_main(argv[0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
