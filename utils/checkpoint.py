"""Atomic checkpoint writes and safe (``weights_only=True``) loads."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError, os_error_message
from utils.publish import as_created


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    Temporary files left by earlier writers of ``path`` that were killed mid-write are removed first;
    an OS error (disk full, read-only, a file in the way) is a :class:`UserError` naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        as_created(tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        err.filename = str(path)  # the file the user asked for, not its temporary sibling
        raise UserError(f"cannot write {os_error_message(err)}; the previous {path.name} is unchanged") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` into memory, then :func:`atomic_write_bytes` (so OS errors keep their cause)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


_DAMAGED = ("cannot read checkpoint {path}: the file is damaged, truncated or not a PyTorch checkpoint; point to "
            "a complete .pt file written by this project")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; unreadable files are user errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a refused object: bytes that are no pickle at all
            raise UserError(_DAMAGED.format(path=path)) from None
        raise UserError(f"checkpoint {path} holds Python objects that a safe load refuses, so it was not written "
                        f"by this project; original NAPG checkpoints are converted with "
                        f"tools/convert_original_checkpoint.py") from None
    except Exception:  # torch raises several types for truncated or foreign files
        raise UserError(_DAMAGED.format(path=path)) from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
