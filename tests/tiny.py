"""Tiny InstructPix2Pix-shaped models with random non-trivial weights, saved as checkpoints (built offline)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import save_checkpoint, save_safetensors
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny" / "ip2p-tiny.yaml"


def tiny_config(**params):
    """The tiny config as OmegaConf with model params overridden."""
    config = OmegaConf.load(TINY_CONFIG)
    for key, value in params.items():
        config.model.params[key] = value
    return config


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Fill zero-initialised weights with noise so every layer matters (outputs are non-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.abs().sum() == 0:
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return module


def build_tiny_model(seed: int = 0, **params):
    """A tiny LatentDiffusion (``ddpm_edit``) with seeded random weights; EMA differs from the training weights."""
    torch.manual_seed(seed)
    model = instantiate_from_config(tiny_config(**params).model)
    randomize_(model, seed)
    if getattr(model, "model_ema", None) is not None:
        with torch.no_grad():
            for name, buf in model.model_ema.named_buffers():
                if buf.is_floating_point() and buf.ndim > 0:
                    buf.add_(0.01)
    return model.eval()


def save_tiny_checkpoint(path: Path, seed: int = 0, **params) -> Path:
    """Save a tiny model in the original layout (``.ckpt`` Lightning-style or ``.safetensors`` by suffix)."""
    model = build_tiny_model(seed, **params)
    state = model.state_dict()
    if Path(path).suffix == ".safetensors":
        return save_safetensors(state, path)
    return save_checkpoint({"state_dict": state, "global_step": 1}, path)
