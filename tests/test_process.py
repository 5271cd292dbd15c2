"""utils/process.py: a command under a time cap dies with every process below it."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from utils.process import GroupRun, run_group

# Starts two sleeping grandchildren, one in the child's process group and one in a session of its own (as
# gpu_check's stages are), writes their ids, then hangs or exits.
TREE = """
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
kept = subprocess.Popen(sleep)
apart = subprocess.Popen(sleep, start_new_session=True)
open(sys.argv[1], "w").write(f"{kept.pid} {apart.pid}")
print("grandchildren started", flush=True)
if sys.argv[2] == "hang":
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by whoever adopted it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _wait_gone(pids: list[int]) -> list[int]:
    """The pids still running after a few seconds (a SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _grandchildren(tmp_path: Path, mode: str, timeout_s: float) -> tuple[GroupRun, list[int], str]:
    pids_file, log = tmp_path / "pids", tmp_path / "run.log"
    run = run_group([sys.executable, "-c", TREE, str(pids_file), mode], timeout_s=timeout_s, log=log)
    return run, [int(p) for p in pids_file.read_text().split()], log.read_text()


def test_a_command_that_overruns_its_cap_dies_with_its_grandchildren(tmp_path: Path) -> None:
    run, pids, log = _grandchildren(tmp_path, "hang", timeout_s=5)
    assert run.timed_out and run.returncode is None
    assert "grandchildren started" in log  # the full output is kept
    assert _wait_gone(pids) == []


def test_what_a_finished_command_leaves_running_in_its_group_is_killed(tmp_path: Path) -> None:
    run, (kept, apart), _ = _grandchildren(tmp_path, "exit", timeout_s=60)
    try:
        assert run.returncode == 0 and not run.timed_out
        assert _wait_gone([kept]) == []  # as a loader worker that outlived its process would be
    finally:
        # Once its parent has exited, a process that left the group is no longer below the command.
        os.kill(apart, signal.SIGKILL)
