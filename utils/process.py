"""A command run under a time cap as a group: on timeout it dies with every process it started.

``subprocess.run(timeout=...)`` kills only its direct child; the stage processes and loader workers below
it would go on holding the GPU while the next measurement runs. Here the child leads a session of its
own, and at the cap everything below it is killed: its process group, and every descendant found in
``/proc`` (those that started sessions of their own, as ``tools/gpu_check.py``'s stages do).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GroupRun:
    """How a command ended: its exit code (None when it was stopped at its cap) and its wall time."""

    returncode: int | None
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_group(cmd: Sequence[str], *, timeout_s: float, log: Path, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> GroupRun:
    """Run ``cmd`` with its stdout and stderr in ``log`` (the full text), for at most ``timeout_s`` seconds.

    Whatever the command leaves running when it ends, is stopped or when this process is interrupted
    (an exception, Ctrl-C, a SIGTERM turned into ``SystemExit``) is killed with it.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _stop(proc)
    return GroupRun(returncode, time.perf_counter() - start)


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of ``proc``'s tree, then reap ``proc``."""
    # A process not yet reaped keeps its id, so its tree can be walked and killed safely; once reaped
    # (it exited) only its process group is left to sweep: loader workers it did not end.
    targets = [proc.pid, *_descendants(proc.pid)] if proc.returncode is None else []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for target in targets:
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; none elsewhere, where the group kill must do)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (command) state ppid ...": the command may hold spaces and parentheses, so split after it.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
