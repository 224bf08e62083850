"""Exponential moving average of a model's parameters, with the CompVis ``LitEma`` buffer names."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadow weights kept as buffers named after the parameters with dots removed.

    ``decay`` is warmed up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the CompVis rule) when
    ``use_num_upates`` (sic, the original keyword) is set.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        num_updates = 0 if use_num_upates else -1
        self.register_buffer("num_updates", torch.tensor(num_updates, dtype=torch.int))
        for name, param in model.named_parameters():
            if param.requires_grad:
                shadow_name = name.replace(".", "")
                self.m_name2s_name[name] = shadow_name
                self.register_buffer(shadow_name, param.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update: ``shadow -= (1 - decay) * (shadow - param)``."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            n = int(self.num_updates)
            decay = min(decay, (1 + n) / (10 + n))
        one_minus_decay = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name not in self.m_name2s_name:
                raise KeyError(f"parameter {name!r} has no EMA shadow; the model changed after LitEma was built")
            target = shadow[self.m_name2s_name[name]]
            target.sub_(one_minus_decay * (target - param.detach().to(target.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into ``model``'s parameters."""
        shadow = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(shadow[self.m_name2s_name[name]])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Remember the current parameters (to put them back with `restore`)."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by `store`."""
        if not self.collected_params:
            raise RuntimeError("LitEma.restore called without a matching store")
        for saved, param in zip(self.collected_params, parameters, strict=True):
            param.copy_(saved)
        self.collected_params = []
