"""Lightning data module built from a config (CompVis ``main.DataModuleFromConfig``), with DreamBooth train+reg
pairing and seeded workers."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
from functools import partial
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data.sampler import ResumableSampler, SeededItems
from ldm.errors import UsageError
from ldm.util import instantiate_from_config, report_legacy_param

logger = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 4


def reg_pair_index(i: int, num_reg_pairs: int) -> int:
    """The regularization pair that accompanies training item ``i``.

    Indices are cut into consecutive blocks of ``num_reg_pairs``; block ``b`` visits the reg pairs in its own fixed
    shuffled order. Every block uses each reg pair exactly once, so over any epoch the pairs are used evenly (counts
    differ by at most one), and a training pair meets different reg pairs across its repeats.
    """
    if num_reg_pairs < 1:
        raise ValueError(f"num_reg_pairs must be positive, got {num_reg_pairs}")
    block, position = divmod(i, num_reg_pairs)
    order = list(range(num_reg_pairs))
    random.Random(f"reg-pairing:{block}").shuffle(order)  # a string seed is hashed stably (not PYTHONHASHSEED)
    return order[position]


class TrainWithRegularization(Dataset):
    """Item ``i`` = ``(train[i], reg[reg_pair_index(i, reg pairs)])``; the length is ``len(train)``.

    The pairing depends on the index only, so it is the same in every worker and on every DDP rank, and a
    DistributedSampler's split of the indices splits the (train, reg) couples without overlap.
    """

    def __init__(self, train: Dataset, reg: Dataset) -> None:
        self.train = train
        self.reg = reg
        self.num_reg_pairs = int(getattr(reg, "num_images", None) or len(reg))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.train[i], self.reg[reg_pair_index(i, self.num_reg_pairs)]


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: seed torch, ``random`` and numpy from the worker's torch seed and the DDP rank.

    The worker's torch seed is the loader's per-epoch base seed + ``worker_id``; mixing in the rank keeps the
    workers of different ranks (started from the same global seed) from drawing identical augmentations.
    """
    state = np.random.SeedSequence([torch.initial_seed(), rank]).generate_state(2, dtype=np.uint32)
    torch.manual_seed((int(state[0]) << 32) | int(state[1]))
    random.seed(torch.initial_seed())
    np.random.seed(int(state[0]))


def worker_start_method() -> str | None:
    """How DataLoader workers are started: ``forkserver`` where the platform has it, else the platform's default.

    A training process has threads (the DDP process group's, tqdm's monitor, the feeders of persistent loaders), and
    forking it can leave the child blocked forever on a lock another thread held at that moment: CPython 3.8-3.11
    deadlock in ``PyOS_AfterFork_Child`` on the interpreter's head lock (python/cpython#112275, seen here as a DDP
    rank whose worker never started). Workers forked from a fork server, which has no other threads, cannot inherit
    a held lock.
    """
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


def _resolve_num_workers(requested: int | None) -> int:
    """``None`` → min(4, CPUs); requests above the CPU count (the seed's 96) are lowered to it."""
    cpus = os.cpu_count() or 1
    if requested is None:
        return min(DEFAULT_MAX_WORKERS, cpus)
    if requested < 0:
        raise ValueError(f"num_workers must be ≥ 0, got {requested}")
    if requested > cpus:
        logger.warning("num_workers=%d exceeds the %d CPUs of this machine; using %d", requested, cpus, cpus)
        return cpus
    return requested


class DataModuleFromConfig(pl.LightningDataModule):
    """Datasets from ``target``/``params`` configs (CompVis constructor); DreamBooth batches ``[train, reg]``.

    Epoch: ``len(train)`` items, i.e. train pairs × train ``repeats``, each training pair equally often. With a
    ``reg`` dataset, item ``i`` couples training item ``i`` with regularization pair `reg_pair_index` ``(i, R)``
    (R = reg pairs): each run of R consecutive indices uses every reg pair once, so within an epoch every reg
    pair is used ⌊len/R⌋ or ⌈len/R⌉ times; the reg ``repeats`` do not change the epoch. The couples are a
    function of the index (not of worker or rank), so Lightning's DistributedSampler splits them across DDP
    ranks. Training batches are ``[train_dict, reg_dict]`` (a plain dict without reg), shuffled; validation,
    test and predict batches are plain dicts in order (unless ``shuffle_val_dataloader``/``shuffle_test_loader``).

    ``num_workers``: ``None`` → min(4, CPUs); values above the CPU count are lowered to it. Workers are seeded
    by `seed_worker`, persistent, and started from a fork server (`worker_start_method`). ``wrap`` and
    ``use_worker_init_fn`` are accepted for old configs and have no effect (the datasets are map-style torch
    datasets; workers are always seeded).

    Exact resumption (``seed``, from ``main.py --seed``): the training order is a `ResumableSampler` (epoch ``e``'s
    permutation drawn from ``(seed, e)``, split across ranks by the sampler itself, so the Trainer must run with
    ``use_distributed_sampler=False``) and each item's augmentation is drawn from ``(seed, epoch, index)``
    (`SeededItems`). A checkpoint stores the epoch and the batches already trained in it (`state_dict`); a run
    resumed from it continues the epoch where it stopped, with any number of workers.
    """

    def __init__(
        self,
        batch_size: int,
        train: Mapping[str, Any] | None = None,
        reg: Mapping[str, Any] | None = None,
        validation: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        predict: Mapping[str, Any] | None = None,
        wrap: bool = False,
        num_workers: int | None = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if reg is not None and train is None:
            raise ValueError("a 'reg' dataset needs a 'train' dataset to pair with")
        for name, value in (("wrap", wrap), ("use_worker_init_fn", use_worker_init_fn)):
            report_legacy_param("DataModuleFromConfig", name, value, "the loaders seed and wrap themselves", False)
        self.batch_size = batch_size
        self.seed = int(seed)
        self._resume_position: dict[str, int] | None = None
        self.num_workers = _resolve_num_workers(num_workers)
        self.shuffle_test_loader = shuffle_test_loader
        self.shuffle_val_dataloader = shuffle_val_dataloader
        configs = {"train": train, "reg": reg, "validation": validation, "test": test, "predict": predict}
        self.dataset_configs = {name: config for name, config in configs.items() if config is not None}
        self.datasets: dict[str, Dataset] = {}
        # Bind only the loaders that exist: Lightning runs validation/test only when the hook is overridden.
        if train is not None:
            self.train_dataloader = self._train_dataloader
        if validation is not None:
            self.val_dataloader = self._val_dataloader
        if test is not None:
            self.test_dataloader = self._test_dataloader
        if predict is not None:
            self.predict_dataloader = self._predict_dataloader

    def _instantiate(self) -> None:
        """Build every configured dataset once per process (their constructors validate the data)."""
        if not self.datasets:
            self.datasets = {name: instantiate_from_config(cfg) for name, cfg in self.dataset_configs.items()}

    def prepare_data(self) -> None:
        """Build (and so validate) the datasets before training starts."""
        self._instantiate()

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets in this process if `prepare_data` did not (other ranks)."""
        self._instantiate()

    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: where in the training order the run is (see the class docstring)."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"seed": self.seed, "world_size": self.trainer.world_size, "batch_size": self.batch_size,
                "epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Called by Lightning when a run resumes, before the training loader is built."""
        if not state_dict:
            logger.warning("the checkpoint has no data position (older version): the resumed epoch restarts")
            return
        for key, now in (("seed", self.seed), ("world_size", self._world_size()), ("batch_size", self.batch_size)):
            if state_dict[key] != now:
                raise UsageError(f"the checkpoint was trained with {key}={state_dict[key]}, this run has {now}: "
                                 "the data order could not continue exactly")
        self._resume_position = dict(state_dict)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, dataset: Dataset, shuffle: bool, sampler: ResumableSampler | None = None) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            num_workers=workers,
            worker_init_fn=partial(seed_worker, rank=self._rank()) if workers > 0 else None,
            persistent_workers=workers > 0,
            multiprocessing_context=worker_start_method() if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )

    def _train_dataloader(self) -> DataLoader:
        self._instantiate()
        train = self.datasets["train"]
        dataset = TrainWithRegularization(train, self.datasets["reg"]) if "reg" in self.datasets else train
        sampler = ResumableSampler(len(dataset), self.seed, shuffle=True, rank=self._rank(), world_size=self._world_size())
        if self._resume_position is not None:
            position, self._resume_position = self._resume_position, None
            items_done = min(position["batches_done"] * self.batch_size, len(sampler))
            if items_done < len(sampler):  # a finished epoch needs no skip: the next one starts afresh
                sampler.resume(position["epoch"], items_done)
                logger.info("resuming epoch %d after %d of its %d items", position["epoch"], items_done, len(sampler))
        return self._loader(SeededItems(dataset, self.seed), shuffle=True, sampler=sampler)

    def _val_dataloader(self) -> DataLoader:
        self._instantiate()
        return self._loader(self.datasets["validation"], shuffle=self.shuffle_val_dataloader)

    def _test_dataloader(self) -> DataLoader:
        self._instantiate()
        return self._loader(self.datasets["test"], shuffle=self.shuffle_test_loader)

    def _predict_dataloader(self) -> DataLoader:
        self._instantiate()
        return self._loader(self.datasets["predict"], shuffle=False)
