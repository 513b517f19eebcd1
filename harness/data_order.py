"""A data order that is a pure function of (seed, epoch, position), so that resume is exact.

``EpochBatches`` draws each epoch's permutation from its own generator and gives every sample its own seed;
``SeededDataset`` loads each sample under that seed, so neither data-loader workers nor a restart in
mid-epoch can change what a step sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset


class SeededDataset(Dataset):
    """Wraps a map-style dataset; item (index, seed) runs ``dataset[index]`` under its own torch seed.

    Random crops and flips then depend only on the sample's seed, not on which worker loads it or on
    where a resumed run restarted.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue CUDA seeding, which costs
            # ~0.2 ms per item on CUDA builds and is not restored by fork_rng(devices=[]).
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


@dataclass
class EpochBatches:
    """Batches of (index, seed) for one rank: epoch e is a permutation seeded by (seed, e).

    A dataset smaller than one batch on every rank is repeated within the epoch (each repeat with its own
    seeds: other random crops of the same files), so a folder of seven photos trains with a batch of 16.
    """

    size: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.size < 1:
            raise ValueError("the dataset is empty: nothing to train on")
        self.repeats = max(1, math.ceil(self.batch_size * self.world / self.size))

    def __len__(self) -> int:
        return (self.size * self.repeats // self.world) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.cat([torch.randperm(self.size, generator=g) for _ in range(self.repeats)])
        seeds = torch.randint(0, 2**62, (self.size * self.repeats,), generator=g)
        mine = torch.arange(len(order))[self.rank :: self.world][: len(self) * self.batch_size]
        pairs = [(int(order[k]), int(seeds[k if self.repeats > 1 else order[k]])) for k in mine]
        batches = [pairs[b : b + self.batch_size] for b in range(0, len(pairs), self.batch_size)]
        return batches[start:]


class RepeatedStream(IterableDataset):
    """An iterable dataset read ``times`` times per epoch, each pass with its own shuffle (``set_epoch``): a token
    split smaller than one batch still fills batches, as ``EpochBatches`` repeats a small map-style dataset."""

    def __init__(self, dataset: IterableDataset, times: int):
        self.dataset, self.times, self.epoch = dataset, times, 0

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for r in range(self.times):
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch * self.times + r)
            yield from self.dataset


class BatchStream:
    """Endless batches for one rank, from a position a checkpoint recorded (``position()``), exactly.

    Map-style datasets follow ``EpochBatches``. Iterable ones (token or WebDataset shards) are re-read each epoch,
    told the epoch first when they can be (``set_epoch``: a new seeded shuffle each epoch), and a resume skips the
    batches of the current epoch that were already consumed by reading past them.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int, world: int, collate,
                 num_workers: int = 0, position: dict | None = None):
        self.dataset, self.batch_size, self.seed, self.collate = dataset, batch_size, seed, collate
        self.num_workers = num_workers
        self.iterable = isinstance(dataset, IterableDataset)
        if self.iterable and hasattr(dataset, "__len__") and 0 < len(dataset) < batch_size:
            self.dataset = RepeatedStream(dataset, math.ceil(batch_size / len(dataset)))
        self.plan = None if self.iterable else EpochBatches(len(dataset), batch_size, seed, rank, world)
        self.epoch, self.batch = self._start(position or {})
        self._batches = self._stream()

    def _start(self, position: dict) -> tuple[int, int]:
        if "epoch" in position:
            epoch, batch = int(position["epoch"]), int(position["batch"])
            if not self.iterable and batch >= len(self.plan):  # recorded just after an epoch's last batch
                return epoch + 1, 0
            return epoch, batch
        consumed = int(position.get("batches", 0))  # checkpoints of tokgen 0.1 count batches only
        if self.iterable:
            return 0, consumed
        return divmod(consumed, len(self.plan))

    def position(self) -> dict:
        """Where the stream is: the epoch and the batches of it consumed."""
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._batches)

    def _loader(self) -> DataLoader:
        # A generator of its own for every loader: without one, a DataLoader draws its workers' base seed from
        # torch's global RNG, which a resumed run has restored to another point than where the straight run drew.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.iterable:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate,
                              num_workers=self.num_workers, drop_last=True, generator=generator)
        return DataLoader(SeededDataset(self.dataset), batch_sampler=self.plan.epoch(self.epoch, self.batch),
                          collate_fn=self.collate, num_workers=self.num_workers, generator=generator)

    def _stream(self) -> Iterator[dict]:
        while True:
            seen = 0
            skip = self.batch if self.iterable else 0  # map-style epochs start at the position already
            for batch in self._loader():
                seen += 1
                if seen > skip:
                    self.batch += 1
                    yield batch
            if seen == 0:
                raise ValueError("the dataset yielded no full batch: too few samples or unreadable shards")
            if self.iterable and seen < skip:  # an epoch shorter than where a resumed run stood (another reader)
                self.batch -= seen
                continue
            self.epoch, self.batch = self.epoch + 1, 0
