"""Publishing a folder: build it in a staging folder beside its destination, then rename it into place.

A reader therefore never sees a half-written folder, and a writer that fails leaves the previous one
whole. The run folder's ``<stage>.new``, the prepared data sets, the uint8 cache and the synthetic
data set are all written this way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: Path | str, folder: bool = False) -> None:
    """Give a file or folder made private by ``mkstemp``/``mkdtemp`` the mode a plain ``open``/``mkdir``
    would have given it (0o666 / 0o777 less the umask), so that labmates can read what the user can."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def replace_dir(staging: Path, final: Path, aside: Path | None = None) -> None:
    """Rename ``staging`` to ``final``. An existing ``final`` is first renamed to ``aside`` (default: a fresh
    hidden sibling; a given ``aside`` left by an earlier crash is removed first) and deleted once the new
    folder is in place. If the second rename fails, the old folder goes back, unless another writer put
    a folder there meanwhile, and the error propagates."""
    if aside is not None and aside.exists():
        _remove(aside)
    old = None
    if final.exists():
        if aside is None:
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            aside.rmdir()
        final.rename(aside)
        old = aside
    try:
        staging.rename(final)
    except OSError:
        if old is not None and not final.exists():
            old.rename(final)
            old = None
        raise
    finally:
        if old is not None:
            _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def publish_dir(final: Path, prefix: str | None = None) -> Iterator[Path]:
    """A fresh staging folder beside ``final`` (hidden, named ``prefix`` + random), renamed into place by
    :func:`replace_dir` when the block ends and removed when it raises. Creating the folder raises the
    ``OSError`` of a parent that cannot be written, before the block runs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.partial-", dir=final.parent))
    as_created(staging, folder=True)
    try:
        yield staging
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
