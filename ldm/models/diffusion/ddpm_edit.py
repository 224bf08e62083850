"""The InstructPix2Pix target path (``ldm.models.diffusion.ddpm_edit.LatentDiffusion``).

InstructPix2Pix (Brooks et al. 2023) is latent diffusion with ``hybrid`` conditioning: the input image's latent is
concatenated to the noisy latent (8 UNet input channels) and the instruction goes through cross-attention. The
weights and their names are those of `ldm.models.diffusion.ddpm.LatentDiffusion`; this subclass changes the
defaults of the InstructPix2Pix configs and, like InstructPix2Pix's training, starts from a 4-channel Stable Diffusion
``ckpt_path`` by zero-padding the UNet's input convolution (the ``widen_input_channels`` migration).
"""

from __future__ import annotations

from typing import Any

from ldm.models.diffusion import ddpm


class LatentDiffusion(ddpm.LatentDiffusion):
    """InstructPix2Pix latent diffusion: ``hybrid`` conditioning by default, EMA loadable (``load_ema``)."""

    def __init__(self, *args: Any, conditioning_key: ddpm.ConditioningKey | None = "hybrid", **kwargs: Any) -> None:
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)

    def ckpt_migrations(self) -> list[str]:
        """Also widen a Stable Diffusion input conv (4 channels) to the 8 of InstructPix2Pix when loading ``ckpt_path``."""
        return ["widen_input_channels", *super().ckpt_migrations()]