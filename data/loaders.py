"""Seeded DataLoaders, sharded evaluation loaders and the resumable endless training stream."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils.dist import is_dist
from utils.errors import UserError


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch already seeds each worker (base seed + id); numpy and
    ``random`` get the same seed so any use of them in a dataset is reproducible too. Workers ignore
    SIGINT."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # Ctrl-C reaches every process of the terminal's group: the main process decides when to stop
    # (engine/safety.py) and shuts its workers down itself, and a worker stopped by it would fail the batch
    # being loaded. SIGTERM keeps its default, which multiprocessing uses to end workers at exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardSampler(Sampler[int]):
    """Indices ``rank::world_size`` in order, without padding: every sample is evaluated exactly once
    across ranks (DistributedSampler pads with repeats, which would double-count in metrics)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int = 0,
    seed: int = 0,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader with a seeded generator (shuffling and worker seeds follow ``seed``).

    With a ``sampler`` the sampler owns the order and ``shuffle`` is not passed on.
    """
    count = len(sampler) if sampler is not None else len(dataset)
    if drop_last and count < batch_size:
        raise UserError(
            f"{count} samples cannot fill one batch of {batch_size} (training drops the last partial batch); "
            "lower the batch size or add data"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )


class BatchStream:
    """Endless training batches over successive passes of a dataset, resumable mid-pass.

    Pass ``p`` visits the dataset in a permutation seeded by ``(seed, p)``, so a pass never repeats a
    batch and a stale batch is never reused; under torch.distributed each rank takes its own shard of
    that permutation (the tail that does not divide evenly is dropped, so all ranks step together).
    ``state_dict()`` is ``{"pass", "batch"}``; after ``load_state_dict`` the stream continues with the
    very next batch (the skipped batches are not loaded). Augmentations drawn from torch's global RNG
    repeat exactly on resume with ``num_workers=0`` (the global RNG state is checkpointed too).
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.loader_kw = {"num_workers": num_workers, "pin_memory": pin_memory,
                          "persistent_workers": persistent_workers}
        world = _distributed() or (1, 0)
        self.world_size, self.rank = world
        self.per_rank = len(dataset) // self.world_size
        self.batches_per_pass = self.per_rank // batch_size
        if self.batches_per_pass == 0:
            raise UserError(f"{len(dataset)} samples cannot fill one batch of {batch_size} per process "
                            f"({self.world_size} processes); lower the batch size or add data")
        self.pass_index = 0
        self.batch_index = 0
        self._sampler = _ListSampler([])
        self._loader: DataLoader | None = None
        self._iterator: Iterator | None = None

    def indices(self, pass_index: int) -> list[int]:
        """This rank's sample order in pass ``pass_index``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        else:
            order = list(range(len(self.dataset)))
        order = order[: self.per_rank * self.world_size]
        return order[self.rank :: self.world_size][: self.batches_per_pass * self.batch_size]

    def _start(self) -> None:
        # One DataLoader for the whole stream: each pass only swaps the sampler's indices, so persistent
        # workers survive from pass to pass.
        self._sampler.indices = self.indices(self.pass_index)[self.batch_index * self.batch_size :]
        if self._loader is None:
            self._loader = build_loader(self.dataset, self.batch_size, shuffle=False, drop_last=True,
                                        seed=self.seed, sampler=self._sampler, **self.loader_kw)
        self._iterator = iter(self._loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.pass_index, self.batch_index = self.pass_index + 1, 0
            self._start()
            batch = next(self._iterator)
        self.batch_index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"pass": self.pass_index, "batch": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_index, self.batch_index = int(state["pass"]), int(state["batch"])
        if self.batch_index >= self.batches_per_pass:
            # Saved right after the last batch of a pass: the next batch is the first of the next pass,
            # as it would have been without the interruption (and an empty remainder fills no loader).
            self.pass_index, self.batch_index = self.pass_index + 1, 0
        self._iterator = None


class _ListSampler(Sampler[int]):
    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _distributed() -> tuple[int, int] | None:
    if is_dist():
        return dist.get_world_size(), dist.get_rank()
    return None


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                persistent_workers: bool = False) -> DataLoader:
    """In order, every sample exactly once; under torch.distributed each rank gets its own shard."""
    world = _distributed()
    sampler = ShardSampler(dataset, *world) if world is not None else None
    return build_loader(dataset, batch_size, shuffle=False, drop_last=False, sampler=sampler,
                        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers)


def shuffled_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False,
                    persistent_workers: bool = False) -> DataLoader:
    """Full batches in an order drawn from ``seed`` and the epoch (``loader.sampler.set_epoch(epoch)``), each
    rank its own shard: the shuffled training loader that the released code's prototype refresh walks."""
    world, rank = _distributed() or (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return build_loader(dataset, batch_size, shuffle=False, drop_last=True, seed=seed, sampler=sampler,
                        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers)
