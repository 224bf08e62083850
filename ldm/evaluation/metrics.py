"""Metric math on embeddings and pixels: cosine similarity, and L1 / PSNR / SSIM restricted to a background mask.

Pixel metrics take float images (H, W, 3) in [0, 1] and a boolean ``keep`` mask (H, W) of the pixels to compare
(the background: everything outside the subject mask). SSIM is kornia's Gaussian SSIM (11×11 window, σ = 1.5,
data range 1, the constants of Wang et al. 2004), averaged over the window centres whose whole window lies in
``keep`` — without a mask that is scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``.
"""

from __future__ import annotations

import math
import re

import kornia
import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB: the value reported for identical pixels (MSE 0), so means over images stay finite
SSIM_WINDOW = 11


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` (N, D) with every row of ``b`` (M, D) → (N, M)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_similarity(a: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per row of ``a`` (N, D): the mean cosine similarity to the reference embeddings (M, D) → (N,)."""
    return cosine_matrix(a, references).mean(dim=1)


def _check(edited: np.ndarray, source: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    if edited.shape != source.shape or edited.ndim != 3:
        raise ValueError(f"images must be (H, W, C) of one shape, got {edited.shape} and {source.shape}")
    if keep is None:
        return np.ones(edited.shape[:2], dtype=bool)
    if keep.shape != edited.shape[:2]:
        raise ValueError(f"mask {keep.shape} does not match the image {edited.shape[:2]}")
    return keep.astype(bool)


def masked_l1(edited: np.ndarray, source: np.ndarray, keep: np.ndarray | None = None) -> float:
    """Mean absolute difference over the ``keep`` pixels (and channels); NaN when ``keep`` is empty."""
    keep = _check(edited, source, keep)
    if not keep.any():
        return math.nan
    return float(np.abs(edited.astype(np.float64) - source.astype(np.float64))[keep].mean())


def masked_psnr(edited: np.ndarray, source: np.ndarray, keep: np.ndarray | None = None, cap: float = PSNR_CAP) -> float:
    """PSNR (dB, data range 1) of the ``keep`` pixels: 10·log10(1 / MSE), at most ``cap``; NaN when empty."""
    keep = _check(edited, source, keep)
    if not keep.any():
        return math.nan
    mse = float(((edited.astype(np.float64) - source.astype(np.float64)) ** 2)[keep].mean())
    return cap if mse == 0.0 else min(cap, 10.0 * math.log10(1.0 / mse))


def ssim_centres(keep: np.ndarray, window: int = SSIM_WINDOW) -> np.ndarray:
    """(H - w + 1, W - w + 1) mask of the window centres (valid positions) whose whole window lies in ``keep``."""
    outside = torch.from_numpy(~keep.astype(bool)).float()[None, None]  # (1, 1, H, W)
    touched = F.max_pool2d(outside, kernel_size=window, stride=1)  # 1 where a window holds a masked-out pixel
    return (touched[0, 0] == 0).numpy()


def masked_ssim(edited: np.ndarray, source: np.ndarray, keep: np.ndarray | None = None,
                window: int = SSIM_WINDOW) -> float:
    """Mean SSIM over the window centres whose window lies in ``keep`` (see the module doc); NaN when none does."""
    keep = _check(edited, source, keep)
    if min(keep.shape) < window:
        return math.nan
    centres = ssim_centres(keep, window)
    if not centres.any():
        return math.nan
    a = torch.from_numpy(np.ascontiguousarray(edited, dtype=np.float32)).permute(2, 0, 1)[None].contiguous()
    b = torch.from_numpy(np.ascontiguousarray(source, dtype=np.float32)).permute(2, 0, 1)[None].contiguous()
    ssim_map = kornia.metrics.ssim(a, b, window, max_val=1.0, eps=0.0, padding="valid")  # (1, C, H-w+1, W-w+1)
    per_pixel = ssim_map[0].double().mean(dim=0).numpy()
    return float(per_pixel[centres].mean())


_REPLACE = re.compile(r"^(?:replace|swap|change|substitute)\s+(?:the\s+|a\s+|an\s+)?(.+?)\s+(?:with|for|by|to|into)\s+(.+)$")
_TURN = re.compile(r"^(?:turn|transform|convert|make|change)\s+(?:the\s+|a\s+|an\s+)?(.+?)\s+into\s+(.+)$")
_MAKE = re.compile(r"^(?:make|paint|colou?r)\s+(?:the\s+)(\w+)\s+(\w+)$")
_ARTICLE = re.compile(r"^(?:a|an|the|one)\s+")


def target_caption(instruction: str, identifier: str | None = "sks") -> str:
    """The caption of an edit's intended result, for CLIP-T, with the identifier token removed.

    "replace the wolf with a sks dog" → "a photo of a dog"; "turn the cat into a tiger" → "a photo of a tiger";
    "make the square red" → "a photo of a red square". Other instructions are used as they are (minus the
    identifier). CLIP has never seen the identifier, which would only add noise to the text embedding.
    """
    text = " ".join(instruction.strip().rstrip(".!").split())
    if identifier:
        text = " ".join(word for word in text.split(" ") if word.lower() != identifier.lower())
    lowered = text.lower()
    for pattern in (_REPLACE, _TURN):
        match = pattern.match(lowered)
        if match:
            return _photo_of(_ARTICLE.sub("", match.group(2)))
    match = _MAKE.match(lowered)
    if match:
        return _photo_of(f"{match.group(2)} {match.group(1)}")
    return text


def _photo_of(noun_phrase: str) -> str:
    """"a photo of a/an <noun phrase>"."""
    article = "an" if noun_phrase[:1] in "aeiou" else "a"
    return f"a photo of {article} {noun_phrase}"
