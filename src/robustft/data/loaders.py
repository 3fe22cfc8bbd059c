"""DataLoaders for training and evaluation, one code path for 1 process and N ranks.

Evaluation shards are contiguous and never padded: rank ``r`` of ``W`` reads items
``[r*n//W, (r+1)*n//W)``, so across ranks every image is read exactly once (a padded
``DistributedSampler`` would count some images twice). Training uses a seeded permutation,
the same on every rank for a given epoch, strided over ranks and truncated to a multiple
of the world size so every rank runs the same number of steps.

Training augmentation draws from PyTorch's global generator inside ``dataset[i]``. The
training loader reseeds it for every item from ``(seed, epoch, index)`` (see
:class:`EpochSeeded`), so the crop and flip of image ``i`` in epoch ``e`` do not depend on
which worker process loads it, what that (persistent) worker loaded before, the number of
workers or ranks, or whether the run was resumed.

This module takes ``rank`` and ``world_size`` as plain integers; it never imports
``torch.distributed`` (only ``robustft.distributed`` does).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from robustft.data.folder import collate_skip_bad
from robustft.errors import ConfigError

__all__ = [
    "default_workers",
    "shard_bounds",
    "EvalShardSampler",
    "TrainSampler",
    "EpochSeeded",
    "make_eval_loader",
    "make_train_loader",
]


def default_workers() -> int:
    """Loader workers when none are requested: one per spare CPU core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}"
        )


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous slice of ``n`` items (sizes differ by <= 1)."""
    _check_rank(rank, world_size)
    return rank * n // world_size, (rank + 1) * n // world_size


class EvalShardSampler(Sampler[int]):
    """Yields this rank's contiguous, unpadded slice of ``range(n)`` in order."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.stop = shard_bounds(n, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _mix(*values: int) -> int:
    """A 63-bit seed derived from integers, stable across Python runs and platforms."""
    digest = hashlib.sha256(":".join(str(v) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TrainSampler(Sampler[int]):
    """Seeded shuffled order of ``range(n)``, split over ranks without overlap.

    Each epoch draws one permutation from ``(seed, epoch)`` (identical on every rank),
    truncates it to a multiple of ``world_size`` and gives rank ``r`` every
    ``world_size``-th item starting at ``r``. Call :meth:`set_epoch` before each epoch.

    Args:
        n: Dataset size.
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of processes.
        seed: Run seed.
        shuffle: False keeps dataset order (still strided over ranks).
        generator: The DataLoader's generator; reseeded from ``(seed, rank, epoch)`` by
            :meth:`set_epoch` so that worker base seeds are reproducible.
        keyed: Yield ``(epoch, index)`` pairs instead of indices, for an :class:`EpochSeeded`
            dataset.
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 generator: torch.Generator | None = None, keyed: bool = False) -> None:
        _check_rank(rank, world_size)
        if n < world_size:
            raise ConfigError(f"a training set of {n} items cannot be split over {world_size} processes")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.shuffle, self.generator, self.keyed = int(seed), shuffle, generator, keyed
        self.epoch, self.skip = 0, 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int, *, skip: int = 0) -> None:
        """Select the epoch's order; ``skip`` drops this rank's first items (mid-epoch resume)."""
        self.epoch, self.skip = int(epoch), int(skip)
        if self.generator is not None:
            self.generator.manual_seed(_mix(self.seed, self.rank, self.epoch, self.skip))

    def _order(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        usable = self.n - self.n % self.world_size
        return order[self.rank : usable : self.world_size][self.skip :]

    def __iter__(self) -> Iterator[Any]:
        if self.keyed:
            epoch = self.epoch
            return ((epoch, i) for i in self._order())
        return iter(self._order())

    def __len__(self) -> int:
        return max(0, self.n // self.world_size - self.skip)


class EpochSeeded(Dataset):
    """A training dataset whose item randomness is a function of ``(seed, epoch, index)`` only.

    ``wrapped[(epoch, i)]`` seeds PyTorch's global generator from ``(seed, epoch, i)``,
    returns ``dataset[i]`` and restores the generator's previous state (so with
    ``workers=0`` the training process's own random stream is untouched). A plain index
    ``wrapped[i]`` is ``dataset[i]`` unseeded. Other attributes are the wrapped dataset's.

    Args:
        dataset: The training dataset (its transform draws from ``torch``'s global generator,
            as torchvision's random transforms do).
        seed: The run seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, index = key
        state = torch.get_rng_state()
        torch.manual_seed(_mix(self.seed, "augment", epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "dataset" not in self.__dict__:  # copies and unpickling (workers)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _loader_kwargs(workers: int | None, pin_memory: bool | None, persistent_workers: bool | None,
                   prefetch_factor: int | None) -> dict[str, Any]:
    n = default_workers() if workers is None else int(workers)
    if n < 0:
        raise ConfigError(f"workers must be >= 0 (0 loads in the main process), got {workers}")
    kwargs: dict[str, Any] = {
        "num_workers": n,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
    }
    if n > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        kwargs["prefetch_factor"] = prefetch_factor or 4
    return kwargs


def _check_batch(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


def make_eval_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    collate_fn: Callable[[list[Any]], Any] = collate_skip_bad,
) -> DataLoader:
    """A loader over this rank's unpadded shard, in dataset order.

    Args:
        dataset: Yields ``(image, label, index)`` or None for an unreadable file.
        batch_size: Images per batch on this rank.
        workers: Loader worker processes; None picks :func:`default_workers`, 0 loads in
            the main process.
        rank: This process's rank; ``world_size``: number of processes.
        pin_memory: Pin host memory; None means "when CUDA is available".
        persistent_workers: Keep workers between passes (default True when workers > 0).
        prefetch_factor: Batches prefetched per worker (default 4 when workers > 0).
        collate_fn: Batch builder; the default drops unreadable items and counts them.

    Returns:
        A DataLoader of ``{"image", "label", "index", "n_bad"}`` batches.
    """
    _check_batch(batch_size)
    sampler = EvalShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=False,
                      collate_fn=collate_fn, **_loader_kwargs(workers, pin_memory, persistent_workers, prefetch_factor))


def make_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    drop_last: bool = True,
    shuffle: bool = True,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    collate_fn: Callable[[list[Any]], Any] = collate_skip_bad,
) -> DataLoader:
    """A loader over this rank's share of a seeded shuffled order.

    Call ``loader.sampler.set_epoch(epoch)`` (a :class:`TrainSampler`) before each epoch.
    ``batch_size`` is per rank; the global batch is ``batch_size * world_size``. The
    dataset is wrapped in :class:`EpochSeeded`, so random augmentation of an item depends
    on ``(seed, epoch, index)`` only. Other arguments are as in :func:`make_eval_loader`.
    """
    _check_batch(batch_size)
    generator = torch.Generator()
    sampler = TrainSampler(len(dataset), rank=rank, world_size=world_size, seed=seed,  # type: ignore[arg-type]
                           shuffle=shuffle, generator=generator, keyed=True)
    return DataLoader(EpochSeeded(dataset, seed), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      generator=generator,
                      collate_fn=collate_fn, **_loader_kwargs(workers, pin_memory, persistent_workers, prefetch_factor))
