"""Optimizers by name (``model.params.optimizer``): AdamW, or AdamW with 8-bit states (Dettmers et al. 2022)."""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from ldm.errors import UsageError
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")


def check_optimizer_name(name: str) -> str:
    """The optimizer name, lower-cased; an unknown one is a `ConfigError` listing the choices."""
    name = str(name).lower()
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    return name


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW (β = 0.9, 0.999; ε = 1e-8; weight decay 0.01 in both) over ``params`` at ``lr``.

    ``adamw8bit`` is bitsandbytes' ``AdamW8bit``: both moments stored block-wise quantised in 8 bits (tensors of
    fewer than 4096 elements keep 32-bit states), 2 bytes per parameter instead of 8. It runs on CPU and CUDA.
    """
    name = check_optimizer_name(name)
    if name == "adamw":
        params = list(params)
        # torch's fused kernel (one pass over all tensors) when every parameter is a float on a CPU or CUDA device:
        # the same update, 3.4x faster than the per-tensor loop for the 8M-parameter ShapesWorld UNet on a CPU.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=lr, fused=fused or None)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # an optional-kernel notice at import
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise UsageError("optimizer adamw8bit needs bitsandbytes: pip install 'instruct2dream[lora]'") from err
    return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
