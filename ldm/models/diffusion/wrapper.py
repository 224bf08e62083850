"""The UNet holder of the CompVis state-dict layout: ``model.diffusion_model.*``, conditioning routed into it."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from ldm.util import instantiate_from_config

ConditioningKey = Literal["concat", "crossattn", "hybrid"]


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` and routes conditioning into it (CompVis key ``model.diffusion_model``)."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: ConditioningKey | None) -> None:
        super().__init__()
        if conditioning_key not in (None, "concat", "crossattn", "hybrid"):
            raise ValueError(f"conditioning_key must be concat, crossattn or hybrid, got {conditioning_key!r}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: Sequence[torch.Tensor] | None = None,
        c_crossattn: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) noisy latent; c_concat: latents joined on channels; c_crossattn: (B, L, D) contexts."""
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key in ("concat", "hybrid"):
            if not c_concat:
                raise ValueError(f"conditioning_key {key!r} needs c_concat")
            x = torch.cat([x, *c_concat], dim=1)  # (B, C + C_cond, H, W)
        context = None
        if key in ("crossattn", "hybrid"):
            if not c_crossattn:
                raise ValueError(f"conditioning_key {key!r} needs c_crossattn")
            context = torch.cat(list(c_crossattn), dim=1)  # (B, L, D)
        return self.diffusion_model(x, t, context=context)
