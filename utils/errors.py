"""User-facing errors: one line, exit code 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake in the user's input (paths, data, flags, checkpoints).

    The message says what is wrong and how to fix it; command-line entry points turn it into one
    line on stderr and exit code 2.
    """


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line ``main`` and map :class:`UserError` to ``error: ...`` and exit code 2."""
    try:
        return int(main(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
