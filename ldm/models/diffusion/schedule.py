"""Noise schedules and the closed-form DDPM quantities, as pure functions (Ho et al. 2020, Sec. 2 and Eq. 4, 7).

Everything is computed in float64 and stored in float32 by the caller, as the CompVis code does.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

BetaSchedule = Literal["linear", "cosine", "sqrt_linear", "sqrt"]

# The buffers a CompVis DDPM registers, in registration (= state dict) order.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_beta_schedule(
    schedule: BetaSchedule,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """β_t for t = 0..T-1 in float64. CompVis "linear" is the SD "scaled linear": linspace in √β, squared."""
    if n_timestep < 1:
        raise ValueError(f"timesteps must be >= 1, got {n_timestep}")
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021, Eq. 17
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r} (known: linear, cosine, sqrt_linear, sqrt)")


def schedule_buffers(betas: torch.Tensor, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The twelve named quantities of `SCHEDULE_BUFFERS` from β (float64 in, float64 out)."""
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    # q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 7); v_posterior interpolates towards σ² = β.
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        # The variance is 0 at t = 0: clip before the log.
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }


def lvlb_weights(buffers: dict[str, torch.Tensor], parameterization: str) -> torch.Tensor:
    """Per-timestep weights turning the simple loss into the VLB term L_t (Ho et al. Eq. 12)."""
    betas, alphas_cumprod = buffers["betas"], buffers["alphas_cumprod"]
    variance = buffers["posterior_variance"]
    if parameterization == "eps":
        weights = betas**2 / (2 * variance * (1 - betas) * (1 - alphas_cumprod))
    elif parameterization == "x0":
        weights = 0.5 * alphas_cumprod.sqrt() / (2.0 - alphas_cumprod)  # CompVis' expression, kept as is
    else:
        raise ValueError(f"unknown parameterization {parameterization!r} (known: eps, x0)")
    weights[0] = weights[1]  # L_0 is undefined (σ_0 = 0); reuse L_1's weight as CompVis does
    return weights


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[t]`` reshaped to broadcast against a (B, ...) tensor with ``ndim`` dims."""
    out = values.to(t.device)[t]
    return out.reshape(t.shape[0], *((1,) * (ndim - 1)))


def q_sample(x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (Ho et al. Eq. 4)."""
    return extract(buffers["sqrt_alphas_cumprod"], t, x_start.ndim).to(x_start.dtype) * x_start + extract(
        buffers["sqrt_one_minus_alphas_cumprod"], t, x_start.ndim
    ).to(x_start.dtype) * noise


def predict_start_from_noise(
    x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, buffers: dict[str, torch.Tensor]
) -> torch.Tensor:
    """x_0 = x_t / √ᾱ_t − ε √(1/ᾱ_t − 1), the inverse of `q_sample`."""
    return extract(buffers["sqrt_recip_alphas_cumprod"], t, x_t.ndim).to(x_t.dtype) * x_t - extract(
        buffers["sqrt_recipm1_alphas_cumprod"], t, x_t.ndim
    ).to(x_t.dtype) * noise
