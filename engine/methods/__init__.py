"""UDA methods: the training iteration of each stage, one class per method (``Stage.method`` names it).

A method's ``__init__`` takes the options it uses from the :class:`utils.config.Config` once, and its
``train_step`` is one iteration read top to bottom in commented phases (DAFormer's ``dacs.py``);
``base.Method`` holds what every method shares. Adding a method is one class here and one entry of the
stage table (README, "Add a method"). A method names the options it reads (``Method.options``):
:func:`stage_options` derives from them what a stage reads, which is what its ``--help`` lists.
"""

from __future__ import annotations

import importlib

from engine.methods.base import Method
from utils.config import OPTIONS
from utils.stages import STAGES

# The options that engine/build.py reads to make the target views of a stage (Stage.target_view).
VIEW_OPTIONS: dict[str, tuple[str, ...]] = {
    "plain": (), "weak_strong": ("weak_scale", "hflip", "randaug_n", "randaug_m", "cutout_frac")}


def method_class(path: str) -> type[Method]:
    """The class that ``Stage.method`` names by its import path, e.g. ``"engine.methods.napg.NAPG"``."""
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"Stage.method {path!r} is not a Method class")
    return cls


def stage_options(stage: str) -> frozenset[str]:
    """The options that ``stage`` reads: its method's (``Method.read_options``) and its target view's
    (:data:`VIEW_OPTIONS`), ``bn_stats`` unless the stage table fixes it, and every option that no method and
    no view claims (read by the trainer, the builders, the refresh and the evaluation of every stage)."""
    claimed = {name for s in STAGES.values() for name in method_class(s.method).read_options()}
    claimed.update(name for names in VIEW_OPTIONS.values() for name in names)
    entry = STAGES[stage]
    names = (set(OPTIONS) - claimed) | method_class(entry.method).read_options() | set(VIEW_OPTIONS[entry.target_view])
    if entry.bn_stats is not None:  # the stage's own BatchNorm mode, whatever --bn-stats says
        names.discard("bn_stats")
    return frozenset(names)
