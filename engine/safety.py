"""Guards of the training loop: a graceful stop on SIGTERM/SIGINT and a check for diverged weights.

Schedulers (Slurm, Kubernetes) send SIGTERM some time before they kill a job, and Ctrl-C sends SIGINT.
Instead of dying mid-iteration, the stage records the signal, finishes the current iteration, writes
``last.pt`` and exits with 128 + the signal number. A second signal of either kind acts at once, for
an impatient user. Under torchrun every rank learns of a signal any rank received, so they all stop
after the same iteration.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from engine.device import unwrap
from engine.methods.base import Logs, Method, require_finite
from utils import dist
from utils.errors import NonFiniteError

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records SIGTERM/SIGINT while installed; :meth:`poll` says whether (and which) one arrived."""

    def __init__(self) -> None:
        self._received = 0
        self._agreed = 0
        self._previous: dict[int, Any] = {}
        # Python only lets the main thread install handlers (a stage run from another thread keeps the defaults).
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the handler may run in the middle of a checkpoint write, which must complete.
        self._received = self._received or signum
        self.restore()  # a second signal gets the default behaviour: stop at once

    def poll(self) -> int:
        """The signal number that stops the stage (0: none); the same on every rank."""
        if not self._agreed:
            flag = self._received
            if dist.is_dist():
                tensor = torch.tensor([flag], dtype=torch.int64)
                if torch.distributed.get_backend() == "nccl":
                    tensor = tensor.cuda()
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
                flag = int(tensor.item())
            self._agreed = flag
        return self._agreed

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _peaks(method: Method, protos: Any = None) -> torch.Tensor:
    """The largest magnitude of every weight (and prototype) tensor, [N] float32 on the device: NaN or
    infinite exactly when one of its values is. One reduction per tensor, nothing read back."""
    tensors = [p for m in (method.model, method.d1, method.d2) if m is not None for p in unwrap(m).parameters()]
    if protos is not None:
        tensors += [t for t in (protos.source_target, protos.target) if t is not None]
    return torch.stack([t.detach().abs().amax().float() for t in tensors])


@torch.no_grad()
def require_finite_weights(method: Method, protos: Any = None) -> None:
    """Raise :class:`NonFiniteError` when a network weight (or a prototype) is NaN or infinite."""
    if not bool(_peaks(method, protos).isfinite().all()):
        raise NonFiniteError("the final weights or prototypes")


@torch.no_grad()
def read_back(method: Method, logs: Logs) -> dict[str, float]:
    """A step's ``logs`` as floats, read from the device in one transfer together with the weights' check.

    Raises :class:`NonFiniteError` naming a NaN/infinite loss term, or the weights when one of them is.
    """
    names = list(logs)
    values = torch.cat([torch.stack([logs[k].float() for k in names]), _peaks(method).isfinite().all()[None].float()])
    *numbers, weights_finite = values.tolist()
    out = dict(zip(names, numbers))
    require_finite(out)
    if weights_finite != 1.0:
        raise NonFiniteError("the weights after the update (an exploding gradient)")
    return out
