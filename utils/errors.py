"""User-facing errors: one line, exit code 2, no traceback."""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Callable, Sequence

# What to do about the operating-system errors a run meets when it writes its outputs.
_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or choose another --work-dir",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another --work-dir",
    errno.EROFS: "the file system is read-only; choose another --work-dir",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "a file is in the way of a folder; choose another path",
    errno.EISDIR: "the path is a folder, not a file; choose another path",
}


class UserError(Exception):
    """A mistake in the user's input (paths, data, flags, checkpoints).

    The message says what is wrong and how to fix it; command-line entry points turn it into one
    line on stderr and exit code 2.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(_strip_worker_traceback(str(message)))


class NonFiniteError(UserError):
    """Training produced a NaN or infinite value; the message names the value (the trainer adds where)."""


class StageInterrupted(Exception):
    """A stage stopped on a signal after saving its checkpoint; the process exits with 128 + ``signum``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _strip_worker_traceback(text: str) -> str:
    # A DataLoader worker re-raises an error in the main process as ExceptionType("Caught ... in DataLoader
    # worker process N.\nOriginal Traceback ...\nmodule.ExceptionType: message"): keep the message.
    if text.startswith("Caught ") and "Original Traceback" in text:
        return re.sub(r"^[\w.]+: ", "", text.strip().splitlines()[-1], count=1)
    return text


def os_error_message(err: OSError) -> str:
    """``err`` as one line naming the path, the cause and what to do."""
    cause = err.strerror or str(err) or type(err).__name__
    where = f" at {err.filename}" if err.filename is not None else ""
    hint = _OS_HINTS.get(err.errno or 0)
    return f"{cause}{where}" + (f" ({hint})" if hint else "")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line ``main``: :class:`UserError` and OS errors -> ``error: ...`` and exit code 2,
    :class:`StageInterrupted` -> its line and 128 + the signal number."""
    try:
        return int(main(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except StageInterrupted as err:
        print(str(err), file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
