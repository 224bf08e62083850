"""Classifier-free guidance: single scale (text) and InstructPix2Pix's dual scale (text + image), optionally with a
contrast prompt.

Conditionings are CompVis hybrid dicts ``{"c_crossattn": [emb (B, 77, D)], "c_concat": [latent (B, 4, h, w)]}``.
The guidance combinations are affine with weights summing to one, so they apply equally to eps and to denoised
outputs.
"""

from __future__ import annotations

from typing import Callable

import torch

Conditioning = dict[str, list[torch.Tensor]]
# a guidance scale: one number, or per-sample scales shaped to broadcast, e.g. (B, 1, 1, 1)
Scale = float | torch.Tensor


def single_guidance(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale: Scale) -> torch.Tensor:
    """Classifier-free guidance ``d_u + s (d_c - d_u)`` (Ho & Salimans 2022, Eq. 6 with s = 1 + w)."""
    return d_uncond + scale * (d_cond - d_uncond)


def dual_guidance(
    d_full: torch.Tensor,
    d_image_only: torch.Tensor,
    d_uncond: torch.Tensor,
    text_scale: Scale,
    image_scale: Scale,
    d_contrast: torch.Tensor | None = None,
    contrast_scale: Scale = 0.0,
) -> torch.Tensor:
    """InstructPix2Pix guidance ``d_u + s_T (d_TI - d_I) + s_I (d_I - d_u)`` (Brooks et al. 2023, Eq. 3).

    With ``d_contrast``, the prediction for a contrast prompt ``C`` and the same image, it adds
    ``s_C (d_TI - d_CI)``: what the prompt asks beyond the contrast prompt is amplified (for "replace the circle with
    a sks star" against "... with a star": what the identifier adds to the class word). Written as
    ``(s_T + s_C) (d_TI - d_I) - s_C (d_CI - d_I)`` it is Composable Diffusion's conjunction with a negation (Liu et
    al. 2022, §3), relative to the image-only prediction.
    """
    guided = d_uncond + text_scale * (d_full - d_image_only) + image_scale * (d_image_only - d_uncond)
    if d_contrast is None:
        return guided
    return guided + contrast_scale * (d_full - d_contrast)


def _match_batch(x: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """Broadcast a batch-1 conditioning tensor to ``batch_size``; other mismatches are errors."""
    if x.shape[0] == batch_size:
        return x
    if x.shape[0] == 1:
        return x.expand(batch_size, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]}, expected {batch_size} (or 1)")


def _single(cond: Conditioning, key: str) -> torch.Tensor:
    """The one tensor stored under ``cond[key]`` (CompVis wraps each conditioning in a list)."""
    if key not in cond:
        raise KeyError(f"conditioning lacks {key!r}; it has {sorted(cond)}")
    values = cond[key]
    if len(values) != 1:
        raise ValueError(f"expected exactly one tensor under {key!r}, got {len(values)}")
    return values[0]


def null_conditioning(cond: Conditioning, null_text: torch.Tensor) -> Conditioning:
    """Unconditional IP2P conditioning: null-text embedding (``encoder("")``) and a zero image latent.

    Args:
        cond: the conditional dict; its ``c_concat`` latent gives the shape of the zero latent.
        null_text: (1 or B, 77, D) embedding of the empty prompt.
    """
    latent = _single(cond, "c_concat")
    return {
        "c_crossattn": [_match_batch(null_text, latent.shape[0], "null_text")],
        "c_concat": [torch.zeros_like(latent)],
    }


def dual_guidance_conditioning(
    cond: Conditioning, uncond: Conditioning, batch_size: int, contrast_text: torch.Tensor | None = None
) -> Conditioning:
    """Stack the three IP2P branches [(text, image), (null text, image), (null text, null image)] into batch 3B, and
    with ``contrast_text`` (1 or B, 77, D) a fourth, (contrast text, image), into batch 4B."""
    text = _match_batch(_single(cond, "c_crossattn"), batch_size, "cond c_crossattn")
    image = _match_batch(_single(cond, "c_concat"), batch_size, "cond c_concat")
    null_text = _match_batch(_single(uncond, "c_crossattn"), batch_size, "uncond c_crossattn")
    null_image = _match_batch(_single(uncond, "c_concat"), batch_size, "uncond c_concat")
    texts, images = [text, null_text, null_text], [image, image, null_image]
    if contrast_text is not None:
        texts.append(_match_batch(contrast_text, batch_size, "contrast_text"))
        images.append(image)
    return {"c_crossattn": [torch.cat(texts)], "c_concat": [torch.cat(images)]}  # (3B or 4B, 77, D), (…, 4, h, w)


def dual_guided(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    text_scale: Scale,
    image_scale: Scale,
    contrast_text: torch.Tensor | None = None,
    contrast_scale: Scale = 0.0,
) -> torch.Tensor:
    """Run the three IP2P branches of ``x`` (B, C, h, w) at ``t`` (B,) — four with ``contrast_text`` — as one batched
    call of ``model_fn(x, t, cond)`` and combine them with :func:`dual_guidance`."""
    cfg_cond = dual_guidance_conditioning(cond, uncond, x.shape[0], contrast_text)
    branches = 3 if contrast_text is None else 4
    out_full, out_image_only, out_uncond, *out_contrast = model_fn(
        torch.cat([x] * branches), torch.cat([t] * branches), cfg_cond
    ).chunk(branches)
    d_contrast = out_contrast[0] if out_contrast else None
    return dual_guidance(out_full, out_image_only, out_uncond, text_scale, image_scale, d_contrast, contrast_scale)


def gate_contrast(
    sigma: torch.Tensor, contrast_text: torch.Tensor | None, contrast_scale: Scale, min_sigma: float
) -> tuple[torch.Tensor | None, Scale]:
    """The contrast term only for the samples whose noise level ``sigma`` (B,) is at least ``min_sigma``.

    Returns ``(contrast_text, scale)`` with the scale zeroed (B, 1, 1, 1) where ``sigma < min_sigma``, and
    ``contrast_text`` None when no sample qualifies, so that the fourth branch is not run at all.
    """
    if contrast_text is None:
        return None, contrast_scale
    active = (sigma >= min_sigma).to(contrast_text.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    if not active.any():
        return None, contrast_scale
    return contrast_text, contrast_scale * active


class DualCFGDenoiser:
    """Three-way classifier-free guidance around a sigma-space denoiser (InstructPix2Pix ``CFGDenoiser``), four-way
    with a contrast prompt.

    The branches run in one batched call of the inner denoiser (:func:`dual_guided`).
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor]) -> None:
        self.inner_model = denoiser

    def __call__(
        self,
        z: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning,
        text_cfg_scale: Scale,
        image_cfg_scale: Scale,
        contrast_text: torch.Tensor | None = None,
        contrast_cfg_scale: Scale = 0.0,
        contrast_min_sigma: float = 0.0,
    ) -> torch.Tensor:
        """Guided denoised output for ``z`` (B, C, h, w) at noise levels ``sigma`` (B,).

        ``contrast_text`` (1 or B, 77, D) adds the contrast prompt's term (:func:`dual_guidance`) to the samples whose
        sigma is at least ``contrast_min_sigma``; below it (the last, low-noise steps, where the amplified difference
        only exaggerates the detail) that branch is not run.
        """
        inner = lambda x, s, c: self.inner_model(x, s, cond=c)  # noqa: E731
        contrast_text, contrast_cfg_scale = gate_contrast(sigma, contrast_text, contrast_cfg_scale, contrast_min_sigma)
        return dual_guided(inner, z, sigma, cond, uncond, text_cfg_scale, image_cfg_scale, contrast_text,
                           contrast_cfg_scale)
