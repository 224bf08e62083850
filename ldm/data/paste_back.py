"""Paste-back: keep the real photo wherever a generated edit left it (almost) unchanged.

A pair made by InstructPix2Pix differs from its real photo not only where the instruction acts but, slightly,
everywhere (colour casts, texture noise). A fine-tune on such pairs learns to change backgrounds too. `paste_back`
keeps the generated pixels only in the *changed region* — where the blurred per-pixel difference exceeds a
threshold, grown and feathered — and the real photo elsewhere: a mask composite as in Blended Diffusion (Avrahami et
al. 2022), applied to the training data instead of during sampling. Edits meant to change the whole image ("make it
winter") have no unchanged region and are not for this option.
"""

from __future__ import annotations

import math

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def scales(height: int, width: int) -> tuple[float, int]:
    """Blur σ and growth (pixels) of the changed region for an image: 1/64 and 1/32 of its shorter side (≥ 1)."""
    short = min(height, width)
    return max(1.0, short / 64), max(1, round(short / 32))


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) with a kernel of ±3σ."""
    size = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(x, (size, size), (sigma, sigma), border_type="replicate")


def changed_region(generated: torch.Tensor, real: torch.Tensor, threshold: float) -> torch.Tensor:
    """Soft mask (H, W) in [0, 1] of where ``generated`` differs from ``real`` (both (3, H, W) in [0, 1]).

    1 where the blurred mean absolute difference exceeds ``threshold``, grown by `scales`' pixels, then feathered
    by the same blur, so the composite has no seam.
    """
    sigma, grow = scales(*generated.shape[-2:])
    difference = (generated - real).abs().mean(dim=0)[None, None]  # (1, 1, H, W)
    changed = (blur(difference, sigma) > threshold).float()
    changed = F.max_pool2d(changed, 2 * grow + 1, stride=1, padding=grow)
    return blur(changed, sigma)[0, 0]


def paste_back(generated: Image.Image, real: Image.Image, threshold: float) -> Image.Image:
    """``generated`` inside its changed region (`changed_region`), the ``real`` photo outside (same size, RGB)."""
    if generated.size != real.size:
        raise ValueError(f"paste_back: the edit is {generated.size}, the photo {real.size}")
    made, photo = (torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                   for im in (generated, real))  # (3, H, W)
    mask = changed_region(made, photo, threshold)
    mixed = mask * made + (1 - mask) * photo
    return Image.fromarray((mixed.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8))
