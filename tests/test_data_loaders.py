"""Eval shards count every item exactly once; train shards are seeded and disjoint."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from robustft.data.loaders import EvalShardSampler, TrainSampler, make_eval_loader, make_train_loader, shard_bounds
from robustft.errors import ConfigError


class _Toy(Dataset):
    def __init__(self, n: int, bad: tuple[int, ...] = ()) -> None:
        self.n, self.bad = n, set(bad)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return None if i in self.bad else (torch.full((3, 2, 2), float(i) / max(self.n, 1)), i % 3, i)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_eval_shards_cover_each_index_once(n: int, world: int) -> None:
    seen = [i for r in range(world) for i in EvalShardSampler(n, r, world)]
    assert seen == list(range(n))  # contiguous, in order, no padding, no duplicates
    sizes = [len(EvalShardSampler(n, r, world)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_loader_exactly_once_with_bad_items(world: int) -> None:
    ds = _Toy(11, bad=(4,))
    indices, n_bad = [], 0
    for rank in range(world):
        for batch in make_eval_loader(ds, batch_size=3, workers=0, rank=rank, world_size=world):
            indices += batch["index"].tolist()
            n_bad += batch["n_bad"]
    assert sorted(indices) == [i for i in range(11) if i != 4] and len(indices) == 10 and n_bad == 1


def test_train_sampler_disjoint_seeded_epochs() -> None:
    def shards(epoch: int, seed: int = 0) -> list[list[int]]:
        out = []
        for r in range(3):
            s = TrainSampler(20, rank=r, world_size=3, seed=seed)
            s.set_epoch(epoch)
            out.append(list(s))
        return out

    e0 = shards(0)
    assert [len(s) for s in e0] == [6, 6, 6]
    flat = [i for s in e0 for i in s]
    assert len(set(flat)) == 18 and set(flat) <= set(range(20))
    assert shards(0) == e0 and shards(1) != e0 and shards(0, seed=1) != e0
    s = TrainSampler(20, rank=1, world_size=3, seed=0)
    s.set_epoch(0, skip=2)
    assert list(s) == e0[1][2:] and len(s) == 4


def test_train_loader_batches_and_epochs() -> None:
    loader = make_train_loader(_Toy(10), batch_size=4, workers=0, seed=5)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [4, 4]  # drop_last
    first = torch.cat([b["index"] for b in batches]).tolist()
    loader.sampler.set_epoch(0)
    assert torch.cat([b["index"] for b in loader]).tolist() == first


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank(rank: int, world: int) -> None:
    with pytest.raises(ConfigError):
        shard_bounds(10, rank, world)


def test_bad_batch_size_and_workers() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        make_eval_loader(_Toy(3), batch_size=0, workers=0)
    with pytest.raises(ConfigError, match="workers"):
        make_train_loader(_Toy(3), batch_size=1, workers=-1)


class _Noisy(Dataset):
    """Each item draws from torch's global generator, as a random crop would."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.rand(3, 1, 1), i % 3, i


def _epoch(loader, epoch: int, skip: int = 0) -> list[tuple[int, list[float]]]:
    loader.sampler.set_epoch(epoch, skip=skip)
    return [(int(i), img.flatten().tolist()) for b in loader for i, img in zip(b["index"], b["image"])]


def test_augmentation_draws_depend_on_seed_epoch_and_index_only() -> None:
    plain = make_train_loader(_Noisy(), batch_size=2, workers=0, seed=3)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first, second = _epoch(plain, 0), _epoch(plain, 1)
    assert torch.equal(torch.get_rng_state(), before)  # the training process's own stream is untouched
    # Two persistent workers that already loaded epoch 0 draw what a fresh single process draws.
    pooled = make_train_loader(_Noisy(), batch_size=2, workers=2, seed=3, persistent_workers=True)
    assert _epoch(pooled, 0) == first and _epoch(pooled, 1) == second
    # A mid-epoch start (resume) in fresh workers: the same items get the same draws.
    fresh = make_train_loader(_Noisy(), batch_size=2, workers=2, seed=3)
    assert _epoch(fresh, 1, skip=4) == second[4:]
    assert dict(second) != dict(first)
    assert _epoch(make_train_loader(_Noisy(), batch_size=2, workers=0, seed=4), 0) != first
    assert plain.dataset.dataset.__class__ is _Noisy and len(plain.dataset) == 12
