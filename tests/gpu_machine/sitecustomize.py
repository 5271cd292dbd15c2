"""Makes this Python import only what the GPU machine's ``python3`` has (``utils/gpu_machine.py``).

Put this folder first on ``PYTHONPATH`` (``tests/test_gpu_machine.py`` does): Python imports this module at
start-up, in the process and in every process it starts. From then on the project's own code can import
the standard library, the project's packages and the packages on the list, and nothing else; matplotlib
and rasterio cannot be imported by anyone (on the GPU machine they are not installed at all). The
packages on the list keep their own dependencies (torch's sympy, scikit-learn's scipy), which the GPU
machine has with them; so a module one of them has already imported is found for the project too.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from utils.gpu_machine import GPU_MACHINE_PACKAGES  # noqa: E402

sys.path.remove(REPO)  # the tools put the repository on sys.path themselves, as on the GPU machine

ABSENT = ("matplotlib", "rasterio")
PROJECT = {name for name in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, name, "__init__.py"))}
ALLOWED = set(GPU_MACHINE_PACKAGES) | PROJECT | set(sys.stdlib_module_names)
HERE = os.path.abspath(__file__)


def _importer() -> str:
    """The file of the frame that asked for the import (past the import machinery and this finder)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith("<frozen") or os.sep + "importlib" + os.sep in name or name == HERE):
            return os.path.abspath(name)
        frame = frame.f_back
    return ""


def _from_project(path: str) -> bool:
    inside = path.startswith(REPO + os.sep)
    return inside and "site-packages" not in path and os.sep + ".venv" + os.sep not in path


class GpuMachineFinder(importlib.abc.MetaPathFinder):
    """Refuses what the GPU machine does not have; finds nothing itself."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 (the importlib protocol)
        top = fullname.partition(".")[0]
        if top in ABSENT or (top not in ALLOWED and _from_project(_importer())):
            raise ModuleNotFoundError(f"No module named {top!r} (not on the GPU machine: utils/gpu_machine.py)",
                                      name=top)
        return None


sys.meta_path.insert(0, GpuMachineFinder())
