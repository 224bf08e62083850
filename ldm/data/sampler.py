"""Training order that resumes exactly at any step: a seeded, rank-aware sampler and per-item seeded augmentation.

A run stopped mid-epoch and resumed must see the same items, with the same random crops and flips, as a run that
never stopped. Two things make that true whatever the worker count or the DDP world size:

* `ResumableSampler` draws epoch ``e``'s permutation from ``(seed, e)`` alone and can skip the items a checkpoint
  says were already trained on in that epoch (``resume``), instead of restarting the epoch;
* it yields ``(index, epoch)`` keys, and `SeededItems` draws each item's augmentation from ``(seed, epoch, index)``
  instead of from a worker's running RNG, whose state a resumed (new) worker could not reproduce.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (a fixed polynomial hash, independent of PYTHONHASHSEED)."""
    seed = 0x5EED
    for value in values:
        seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
    return seed


class ResumableSampler(Sampler[tuple[int, int]]):
    """Seeded (optionally shuffled) order over ``num_items``, split across ``world_size`` ranks; resumable.

    Like `torch.utils.data.DistributedSampler` without ``drop_last``: the order is padded with its own first items
    to a multiple of ``world_size`` and rank ``r`` takes every ``world_size``-th item from ``r``. The permutation of
    epoch ``e`` is a function of ``(seed, e)``; `set_epoch` is called by Lightning before each epoch. `resume`
    makes the next pass over epoch ``e`` start after its first ``items_done`` items of this rank.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_items, self.seed, self.shuffle = num_items, int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, items to skip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, items_done: int) -> None:
        """Skip the first ``items_done`` items of this rank the next time epoch ``epoch`` is iterated."""
        if not 0 <= items_done <= len(self):
            raise ValueError(f"cannot resume after {items_done} items of an epoch of {len(self)}")
        self._resume = (int(epoch), int(items_done))

    def __len__(self) -> int:
        return -(-self.num_items // self.world_size)

    def order(self, epoch: int) -> list[int]:
        """This rank's item indices of ``epoch``, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
            indices = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            indices = list(range(self.num_items))
        total = len(self) * self.world_size
        indices += indices[: total - len(indices)]  # pad so every rank gets the same count
        return indices[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip = 0
        if self._resume is not None:
            resume_epoch, skip = self._resume
            self._resume = None
            if resume_epoch != self.epoch:
                logger.warning("resume position is for epoch %d but epoch %d starts: not skipping", resume_epoch, self.epoch)
                skip = 0
        for index in self.order(self.epoch)[skip:]:
            yield index, self.epoch


class SeededItems(Dataset):
    """``dataset[index]`` with torch's default generator seeded from ``(seed, epoch, index)`` for the call.

    Keys are the ``(index, epoch)`` pairs of `ResumableSampler`. The caller's RNG state is restored afterwards, so
    with ``num_workers=0`` the main process's generator is untouched. Datasets that draw their augmentation from
    torch's default generator (`ldm.data.personalized_edit.PersonalizedBase`) become a function of the key.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, index))
            return self.dataset[index]
