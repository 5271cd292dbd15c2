"""torch.distributed set-up and helpers that are no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); return this rank's device.

    NCCL on CUDA (one GPU per local rank), gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


def identical_across_ranks(tensors: list[torch.Tensor]) -> bool:
    """Whether every rank holds bit-identical ``tensors`` (compared through per-tensor checksums: the sum,
    the sum of squares and a position-weighted sum, in float64). Every rank must call it."""
    local = torch.cat([torch.stack([t.double().sum(), (t.double() ** 2).sum(),
                                    (t.double().flatten() * torch.arange(t.numel(), device=t.device)).sum()])
                       for t in tensors])
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)
