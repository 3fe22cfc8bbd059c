"""FLYP's training rows: (image, class-name caption from one template) pairs, drawn at random.

FLYP trains on a table with one row per (training image, template) pair, ``N * T`` rows
(ImageNet: 1.28 M images x 80 templates = 102 M rows), read in a random order by one
persistent iterator that reshuffles only when the table is exhausted. An "epoch" is as
many global batches as the image dataset has (``N // global_batch``, the last partial batch
dropped as :class:`robustft.data.loaders.TrainSampler` does), not a pass over the rows.

Here the table is never built. Row ``r`` means image ``r // T`` with template ``r % T``:

- :class:`FeistelPermutation` is a seeded bijection of ``[0, M)`` evaluated per position
  (a balanced Feistel network on the next even power of two, cycle-walking back into
  range), so "the rows shuffled once" costs no memory;
- :class:`CaptionRowSampler` reads the endless stream ``row(p) = perm_c(p mod M)`` with
  ``c = p // M`` (a fresh permutation per pass ``c`` over the table): epoch ``e`` is stream
  positions ``[e * K * G, (e + 1) * K * G)`` with ``K`` batches of ``G`` rows. Rank ``r`` of
  ``W`` takes every ``W``-th position starting at ``r``, so whatever the per-rank loader
  batch ``b`` (dividing ``G / W``), the union over ranks of step ``s`` is exactly stream
  positions ``[s * b * W, (s + 1) * b * W)`` of the epoch: the single-process batch
  (gathered in rank order it is a permutation of it, which the contrastive loss ignores);
- :class:`CaptionDataset` turns a row into ``(image, label, image index, template index)``
  and :func:`collate_caption_rows` batches those (dropping unreadable images);
  :func:`captions` gives each row's caption text.

Typical loader (per-rank batch ``G // W``)::

    rows = CaptionDataset(train_set, len(templates))
    sampler = CaptionRowSampler(len(train_set), len(templates), rank=r, world_size=W, seed=seed,
                                global_batch=G, keyed=True, generator=gen)
    loader = DataLoader(EpochSeeded(rows, seed), batch_size=G // W, sampler=sampler, generator=gen,
                        collate_fn=collate_caption_rows, drop_last=True)
    for batch in loader:
        text = captions(batch["label"], batch["template"], classnames, templates)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from robustft.data.folder import collate_skip_bad
from robustft.errors import ConfigError

__all__ = ["FeistelPermutation", "CaptionRowSampler", "CaptionDataset", "collate_caption_rows", "captions",
           "make_caption_loader"]

_ROUNDS = 6
_CHUNK = 1 << 16  # positions permuted per vectorised call while iterating


def _key(*values: Any) -> int:
    """A 64-bit integer from the values, stable across runs and platforms."""
    digest = hashlib.blake2b(":".join(str(v) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class FeistelPermutation:
    """A seeded pseudo-random bijection of ``[0, size)``, computed position by position.

    ``perm(x)`` for an array of positions is vectorised (numpy ``uint64``). A 6-round
    balanced Feistel network permutes ``[0, 4**h)`` with ``4**h`` the smallest such power
    ``>= size`` (so at most ``4 * size``); values that land outside ``[0, size)`` are sent
    through the network again until they land inside (cycle-walking), which keeps it a
    bijection of ``[0, size)``. Different ``key`` values give unrelated orders.

    Args:
        size: ``M >= 1``, the number of items permuted.
        key: Any integer; the round keys are derived from it.
    """

    def __init__(self, size: int, key: int) -> None:
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ConfigError(f"a permutation needs a size >= 1, got {size!r}")
        self.size = int(size)
        self.half_bits = max(1, ((self.size - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half_bits) - 1)
        self._shift = np.uint64(self.half_bits)
        self._keys = [np.uint64(_key("feistel", key, i)) for i in range(_ROUNDS)]

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        x = right ^ key  # splitmix64-style mixing, wrapping uint64 arithmetic
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & self._mask

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._shift, x & self._mask
        for key in self._keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self._shift) | right

    def __call__(self, positions: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """The images of ``positions`` (each in ``[0, size)``), as an int64 array of the same shape."""
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.size):
            raise ConfigError(f"permutation positions must be in [0, {self.size}), got {x.min()}..{x.max()}")
        # 1-d arrays throughout: numpy warns on overflow for scalars, not for arrays (here it is intended).
        y = self._network(x.reshape(-1).astype(np.uint64))
        outside = y >= np.uint64(self.size)
        while outside.any():
            y[outside] = self._network(y[outside])
            outside = y >= np.uint64(self.size)
        return y.astype(np.int64).reshape(x.shape)


class CaptionRowSampler(Sampler[Any]):
    """This rank's share of FLYP's endless shuffled stream of (image, template) rows.

    Row ``i * n_templates + t`` is image ``i`` with template ``t``. Pass ``c`` over the
    ``M = n_images * n_templates`` rows reads them in the order of
    ``FeistelPermutation(M, key(seed, c))``; the stream is the passes back to back, and
    epoch ``e`` is its positions ``[e * L, (e + 1) * L)`` with ``L = num_batches *
    global_batch`` and ``num_batches = n_images // global_batch`` (as many steps as an
    epoch over the images with the last partial batch dropped). Rank ``r`` yields
    positions ``e * L + r + world_size * k``; the union over ranks of their ``s``-th
    loader batches is the single-process ``s``-th batch whatever the per-rank batch size.
    Call :meth:`set_epoch` before each epoch (the same epoch and skip on every rank).

    Args:
        n_images: Training images ``N``.
        n_templates: Templates ``T``.
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of processes; must divide ``global_batch``.
        seed: Run seed (the same on every rank).
        global_batch: Rows per optimizer step over all ranks (and accumulation micro-steps).
        keyed: Yield ``(epoch, row)`` pairs (for an :class:`~robustft.data.loaders.EpochSeeded`
            dataset, so augmentation depends on ``(seed, epoch, row)`` only) instead of rows.
        generator: The DataLoader's generator, reseeded from ``(seed, rank, epoch, skip)`` by
            :meth:`set_epoch` so that worker base seeds are reproducible.
    """

    def __init__(self, n_images: int, n_templates: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 global_batch: int, keyed: bool = False, generator: torch.Generator | None = None) -> None:
        for name, value in (("n_images", n_images), ("n_templates", n_templates), ("global_batch", global_batch),
                            ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch % world_size:
            raise ConfigError(
                f"global batch {global_batch} is not divisible by {world_size} processes; use a multiple of "
                f"{world_size}"
            )
        if n_images < global_batch:
            raise ConfigError(
                f"{n_images} training images give no full global batch of {global_batch}; lower the batch size "
                f"to at most {n_images}"
            )
        self.n_images, self.n_templates = n_images, n_templates
        self.n_rows = n_images * n_templates
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.global_batch = global_batch
        self.num_batches = n_images // global_batch
        self.keyed, self.generator = keyed, generator
        self._perms: dict[int, FeistelPermutation] = {}
        self.epoch, self.skip = 0, 0
        self.set_epoch(0)

    @property
    def rows_per_epoch(self) -> int:
        """Rows of one epoch over all ranks: ``num_batches * global_batch``."""
        return self.num_batches * self.global_batch

    def set_epoch(self, epoch: int, *, skip: int = 0) -> None:
        """Select the epoch; ``skip`` drops this rank's first ``skip`` items (mid-epoch resume)."""
        if epoch < 0 or not 0 <= skip <= self.rows_per_epoch // self.world_size:
            raise ConfigError(
                f"set_epoch needs epoch >= 0 and 0 <= skip <= {self.rows_per_epoch // self.world_size}, "
                f"got epoch={epoch}, skip={skip}"
            )
        self.epoch, self.skip = int(epoch), int(skip)
        if self.generator is not None:
            self.generator.manual_seed(_key("caption-loader", self.seed, self.rank, self.epoch, self.skip) >> 1)

    def _permutation(self, cycle: int) -> FeistelPermutation:
        perm = self._perms.get(cycle)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = self._perms[cycle] = FeistelPermutation(self.n_rows, _key("caption-rows", self.seed, cycle))
        return perm

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Rows at stream ``positions`` (int64 array, any non-negative values)."""
        positions = np.asarray(positions, dtype=np.int64)
        cycles, offsets = np.divmod(positions, self.n_rows)
        rows = np.empty_like(positions)
        for cycle in np.unique(cycles):
            where = cycles == cycle
            rows[where] = self._permutation(int(cycle))(offsets[where])
        return rows

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.epoch, self.epoch * self.rows_per_epoch
        for k0 in range(self.skip, len(self) + self.skip, _CHUNK):
            k = np.arange(k0, min(k0 + _CHUNK, len(self) + self.skip), dtype=np.int64)
            rows = self.rows_at(start + self.rank + self.world_size * k).tolist()
            if self.keyed:
                yield from ((epoch, row) for row in rows)
            else:
                yield from rows

    def __len__(self) -> int:
        return self.rows_per_epoch // self.world_size - self.skip


class CaptionDataset(Dataset):
    """Rows of FLYP's (image, template) table over an image dataset.

    ``rows[r]`` is ``(image, label, index, template)`` for image ``index = r // n_templates``
    of ``base`` and template ``r % n_templates``, or ``None`` when the image is unreadable
    (see :func:`robustft.data.folder.collate_skip_bad`). ``len(rows) = len(base) * n_templates``.

    Args:
        base: Yields ``(image, label, index)`` or ``None`` (an ``ImageFolderDataset``).
        n_templates: Templates ``T`` per image.
    """

    def __init__(self, base: Dataset, n_templates: int) -> None:
        if isinstance(n_templates, bool) or not isinstance(n_templates, int) or n_templates < 1:
            raise ConfigError(f"n_templates must be a positive integer, got {n_templates!r}")
        self.base, self.n_templates = base, n_templates

    def __len__(self) -> int:
        return len(self.base) * self.n_templates  # type: ignore[arg-type]

    def __getitem__(self, row: int) -> tuple[Tensor, int, int, int] | None:
        index, template = divmod(int(row), self.n_templates)
        item = self.base[index]
        if item is None:
            return None
        return item[0], int(item[1]), index, template


def collate_caption_rows(batch: Sequence[tuple[Tensor, int, int, int] | None]) -> dict[str, Any]:
    """Stack :class:`CaptionDataset` rows, dropping ``None`` (unreadable) ones.

    Returns:
        :func:`~robustft.data.folder.collate_skip_bad`'s ``{"image", "label", "index",
        "n_bad"}`` (``index`` = image index) plus ``"template"``: [B] long template indices.
    """
    out = collate_skip_bad(batch)  # type: ignore[arg-type]
    out["template"] = torch.tensor([int(item[3]) for item in batch if item is not None], dtype=torch.long)
    return out


def captions(labels: Tensor | Sequence[int], template_idx: Tensor | Sequence[int], classnames: Sequence[str],
             templates: Sequence[str]) -> list[str]:
    """Caption text of each row: ``templates[template_idx[i]].format(classnames[labels[i]])``."""
    labels_list = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    temps = [int(v) for v in (template_idx.tolist() if isinstance(template_idx, Tensor) else template_idx)]
    if len(labels_list) != len(temps):
        raise ConfigError(f"captions: {len(labels_list)} labels but {len(temps)} template indices")
    bad_label = next((v for v in labels_list if not 0 <= v < len(classnames)), None)
    if bad_label is not None:
        raise ConfigError(f"captions: label {bad_label} out of range for {len(classnames)} class names")
    bad_template = next((t for t in temps if not 0 <= t < len(templates)), None)
    if bad_template is not None:
        raise ConfigError(f"captions: template index {bad_template} out of range for {len(templates)} templates")
    return [templates[t].format(classnames[v]) for v, t in zip(labels_list, temps)]


def make_caption_loader(
    dataset: Dataset,
    n_templates: int,
    *,
    batch_size: int,
    global_batch: int,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> DataLoader:
    """This rank's loader of FLYP's (image, template) rows over ``dataset``.

    Batches are ``collate_caption_rows`` dicts of ``batch_size`` rows (the per-rank
    micro-batch); ``global_batch`` is the rows of one optimizer step over every rank and
    accumulation micro-step, which fixes the epoch length (:class:`CaptionRowSampler`).
    Random augmentation of a row depends on ``(seed, epoch, row)`` only, as for
    :func:`robustft.data.loaders.make_train_loader`, so resume is exact.
    """
    from robustft.data.loaders import EpochSeeded, _check_batch, _loader_kwargs

    _check_batch(batch_size)
    generator = torch.Generator()
    sampler = CaptionRowSampler(len(dataset), n_templates, rank=rank, world_size=world_size,  # type: ignore[arg-type]
                                seed=seed, global_batch=global_batch, keyed=True, generator=generator)
    return DataLoader(EpochSeeded(CaptionDataset(dataset, n_templates), seed), batch_size=batch_size, sampler=sampler,
                      drop_last=True, generator=generator, collate_fn=collate_caption_rows,
                      **_loader_kwargs(workers, None, None, None))
