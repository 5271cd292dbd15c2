"""Output paths checked before any work: a tool that would fail to write its results says so at once.

Every tool calls these on each folder or file it will write, right after parsing its flags: the path must
not be (or lie under) a file, its nearest existing folder must be writable, and where the tool promises to
keep earlier outputs, an existing one needs ``--overwrite``. Nothing is created here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from utils.errors import UserError


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``exists()`` is False below a file, so this stops at it)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_place(path: Path, flag: str) -> Path:
    """The nearest existing ancestor of ``path`` (excluding ``path``), which must be a writable folder."""
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise UserError(f"{flag} {path}: {anchor} is a file, not a folder; choose another path")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: permission denied in {anchor}; choose a folder you can write to")
    return anchor


def check_output_folder(path: str | Path, flag: str, overwrite: bool | None = None) -> Path:
    """A folder the tool writes into (created later if missing); returns it as a ``Path``.

    ``overwrite`` False: the tool replaces the folder as a whole, so one that holds files is refused
    (None: the tool writes into an existing folder freely, keeping what else it holds).
    """
    path = Path(path).expanduser()
    _check_place(path, flag)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {path} is a file; choose a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: permission denied; choose a folder you can write to")
        if overwrite is False and any(path.iterdir()):
            raise UserError(f"{flag} {path} already holds files; pass --overwrite to replace it or choose another "
                            f"{flag}")
    return path


def check_output_files(paths: Iterable[str | Path], flag: str, overwrite: bool | None = None) -> None:
    """Files the tool writes (``flag`` names the option they come from).

    ``overwrite`` False: the tool keeps earlier outputs, so an existing file is refused (None: the tool
    replaces its files freely).
    """
    paths = [Path(p).expanduser() for p in paths]
    existing = []
    for path in paths:
        _check_place(path, flag)
        if path.is_dir():
            raise UserError(f"{flag}: {path} is a folder, not a file; remove it or choose another {flag}")
        if path.exists():
            existing.append(path)
    if existing and overwrite is False:
        more = f" ({len(existing)} of the outputs exist)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} exists{more}; pass --overwrite to replace it or choose another {flag}")
