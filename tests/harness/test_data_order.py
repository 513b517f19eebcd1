"""harness.data_order: batches are a pure function of (seed, epoch, position), small datasets still fill batches,
and a stream restarted at a recorded position continues exactly."""
import random

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from harness.data_order import BatchStream, EpochBatches


class Items(Dataset):
    """Item i: (i, a random number drawn under the item's seed: what a random crop would draw)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, float]:
        return i, float(torch.rand(()))


class Stream(IterableDataset):
    """n items in an order shuffled by the epoch (as TokenDataset's set_epoch does)."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.n))
        random.Random(self.epoch).shuffle(order)
        yield from ((i, float(self.epoch)) for i in order)


def collate(items):
    return [tuple(item) for item in items]


def take(stream: BatchStream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def test_a_dataset_smaller_than_a_batch_repeats_with_new_seeds():
    plan = EpochBatches(size=7, batch_size=16, seed=3)
    (batch,) = plan.epoch(0)[:1]
    indices = [i for i, _ in batch]
    assert len(batch) == 16 and set(indices) == set(range(7))
    seeds = {}
    for i, seed in plan.epoch(0)[0]:
        seeds.setdefault(i, set()).add(seed)
    assert any(len(s) > 1 for s in seeds.values())  # a repeated file gets another crop
    with pytest.raises(ValueError, match="empty"):
        EpochBatches(size=0, batch_size=4, seed=0)


@pytest.mark.parametrize("dataset", [Items(7), Items(50), Stream(5), Stream(30)], ids=["map-small", "map",
                                                                                        "iterable-small", "iterable"])
def test_resume_at_a_recorded_position_continues_exactly(dataset):
    straight = BatchStream(dataset, batch_size=8, seed=1, rank=0, world=1, collate=collate)
    first = take(straight, 9)  # several epochs of the small ones
    position = straight.position()
    rest = take(straight, 7)
    resumed = BatchStream(dataset, batch_size=8, seed=1, rank=0, world=1, collate=collate, position=position)
    assert take(resumed, 7) == rest
    assert all(len(b) == 8 for b in first + rest)


def test_a_small_iterable_fills_its_batches_from_several_passes():
    stream = BatchStream(Stream(5), batch_size=8, seed=0, rank=0, world=1, collate=collate)
    batch = next(stream)
    assert len(batch) == 8 and {i for i, _ in batch} == set(range(5))
    assert len({epoch for _, epoch in batch}) == 2  # two passes, each with its own shuffle


def test_an_empty_stream_is_one_clear_error():
    with pytest.raises(ValueError, match="no full batch"):
        next(BatchStream(Stream(0), batch_size=4, seed=0, rank=0, world=1, collate=collate))
