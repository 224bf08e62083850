"""Export fine-tuned weights alone (no optimizer state) in the original layout, or a LoRA run's adapter: safetensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.checkpoint import EMA_PREFIX, CheckpointError, save_safetensors, use_ema_weights


def weights_for_export(state: Mapping[str, torch.Tensor], ema: bool | None = None) -> dict[str, torch.Tensor]:
    """The state dict to ship: EMA UNet weights copied into ``model.*`` when ``ema`` (None: when present); no EMA keys."""
    has_ema = any(k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates") for k in state)
    if ema and not has_ema:
        raise CheckpointError("EMA export requested but there are no EMA weights")
    chosen = use_ema_weights(dict(state), {}) if (has_ema if ema is None else ema) else dict(state)
    return {k: v for k, v in chosen.items() if not k.startswith(EMA_PREFIX)}


def export_weights(model: Any, path: str | os.PathLike[str], ema: bool | None = None, config: str | None = None) -> Path:
    """Write ``model``'s weights (EMA ones if ``ema``, default: when it keeps an EMA) to a safetensors file."""
    state = weights_for_export(model.state_dict(), ema if ema is not None else getattr(model, "use_ema", False))
    metadata = {"format": "instruct2dream", "global_step": str(getattr(model, "global_step", 0))}
    if config is not None:
        metadata["config"] = config
    return save_safetensors(state, path, metadata)


def export_lora(model: Any, path: str | os.PathLike[str], ema: bool | None = None) -> Path:
    """Write a LoRA run's adapter alone in the kohya/A1111 layout (`ldm.lora`), with its settings as metadata.

    ``ema`` picks the EMA of the adapter weights (default: when the model keeps an EMA).
    """
    from ldm.lora import lora_metadata, split_peft_state

    use_ema = bool(getattr(model, "use_ema", False)) if ema is None else ema
    _, adapter = split_peft_state(model.state_dict(), model.lora.lora_alpha, ema=use_ema)
    base = getattr(model, "base_checkpoint", {}) or {}
    metadata = lora_metadata(model.lora, base.get("path"), base.get("sha256"), base.get("ema"),
                             global_step=str(getattr(model, "global_step", 0)), ema=str(use_ema).lower())
    return save_safetensors(adapter, path, metadata)
