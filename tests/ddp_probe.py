"""A callback the DDP test adds through the config: records, per rank, what each step saw and the final weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Callback


def _digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


class DDPProbe(Callback):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.seen: list[list[str]] = []  # per step: the digests of the training images of this rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        train_half = batch[0]
        self.seen.append([_digest([image]) for image in train_half["image"]])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "seen": self.seen,
            "weights": _digest(p for p in pl_module.parameters()),
            "threads": torch.get_num_threads(),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
