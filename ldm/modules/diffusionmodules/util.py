"""Small building blocks shared by the diffusion networks (CompVis ``diffusionmodules/util.py`` surface)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool) -> Any:
    """Evaluate ``func(*inputs)``, recomputing it in the backward pass instead of storing activations when ``flag``.

    Gradient checkpointing (Chen et al. 2016) through ``torch.utils.checkpoint`` (non-reentrant), so
    gradients reach every parameter ``func`` uses without listing them; ``params`` is kept for the
    CompVis call signature. Without autograd recording there is nothing to save, so ``func`` runs plainly.
    """
    del params  # the non-reentrant implementation finds the parameters itself
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal timestep embedding (Vaswani et al. 2017, sec. 3.5), ``[cos | sin]`` as in CompVis.

    ``timesteps``: (N,) possibly fractional. Returns (N, dim) float32; with ``repeat_only`` the raw
    timestep is repeated ``dim`` times instead.
    """
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)  # (N, dim)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )  # (half,)
    args = timesteps[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (zero-initialised residual branches)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation layer: 32-group GroupNorm computed in float32."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D convolution module."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args: Any, **kwargs: Any) -> nn.Module:
    """A linear module (CompVis helper name)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D average-pooling module."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")
