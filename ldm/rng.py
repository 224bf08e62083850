"""Global RNG states (Python, NumPy, torch CPU and CUDA) as plain containers, for exact training resumption.

The states are stored with tensors, ints and tuples only, so a checkpoint that holds them still loads with the
restricted unpickler of `ldm.checkpoint` (no NumPy objects in the pickle).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def collect_states() -> dict[str, Any]:
    """Snapshot of every global RNG that data loading and augmentation may use."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_states(states: dict[str, Any]) -> None:
    """Put back a snapshot taken by `collect_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
