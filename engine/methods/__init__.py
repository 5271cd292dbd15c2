"""UDA methods: the training iteration of each stage, one class per method (``Stage.method`` names it).

A method's ``__init__`` takes the options it uses from the :class:`utils.config.Config` once, and its
``train_step`` is one iteration read top to bottom in commented phases (DAFormer's ``dacs.py``);
``base.Method`` holds what every method shares. Adding a method is one class here and one entry of the
stage table (README, "Add a method").
"""

from __future__ import annotations

import importlib

from engine.methods.base import Method


def method_class(path: str) -> type[Method]:
    """The class that ``Stage.method`` names by its import path, e.g. ``"engine.methods.napg.NAPG"``."""
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"Stage.method {path!r} is not a Method class")
    return cls
