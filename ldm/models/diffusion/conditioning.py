"""Conditioning for InstructPix2Pix: the CompVis hybrid dict, and the joint classifier-free-guidance dropout policy.

InstructPix2Pix (Brooks et al. 2023, Sec. 3.3) trains the unconditional branches used by its three-way guidance by
dropping the text, the image, or both, for 5% of the samples each. One uniform draw ``r`` per sample decides:
text is dropped when ``r < p_text + p_both``, the image when ``p_text <= r < p_text + p_both + p_image`` — so the
"both" band is shared, not the product of two independent draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.models.diffusion.guidance import Conditioning


def hybrid_conditioning(text: torch.Tensor, image_latent: torch.Tensor | None = None) -> Conditioning:
    """The CompVis conditioning dict: text contexts (B, L, D) for cross-attention, the image latent (B, 4, h, w)
    (InstructPix2Pix: the posterior mode, unscaled) for channel concatenation when given."""
    cond = {"c_crossattn": [text]}
    if image_latent is not None:
        cond["c_concat"] = [image_latent]
    return cond


@dataclass(frozen=True)
class JointDropout:
    """Probabilities of dropping only the text, both, and only the image (InstructPix2Pix default: 5% each)."""

    text: float = 0.05
    both: float = 0.05
    image: float = 0.05

    def __post_init__(self) -> None:
        for name in ("text", "both", "image"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"dropout probability {name}={value} is not in [0, 1]")
        if self.text + self.both + self.image > 1.0:
            raise ValueError(f"dropout probabilities sum to {self.text + self.both + self.image} > 1")

    def masks(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean (B,) masks: which samples lose their text, which lose their image."""
        r = torch.rand(batch_size, generator=generator)
        drop_text = r < self.text + self.both
        drop_image = (r >= self.text) & (r < self.text + self.both + self.image)
        return drop_text, drop_image


def mask_text(text: torch.Tensor, null_text: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace the embeddings (B, L, D) of the samples in ``drop`` (B,) by ``null_text`` (1, L, D)."""
    return torch.where(drop.to(text.device).view(-1, 1, 1), null_text.to(text.dtype), text)


def mask_image(latent: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Zero the image latents (B, C, h, w) of the samples in ``drop`` (B,): the null image of guidance."""
    return latent * (~drop).to(latent.device, latent.dtype).view(-1, 1, 1, 1)
