"""Distributions over first-stage latents (Kingma & Welling 2014, "Auto-Encoding Variational Bayes")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussianDistribution:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))), parameterised by the encoder moments (Kingma & Welling 2014).

    ``parameters`` is (B, 2C, H, W): mean and log-variance concatenated on dim 1. The log-variance is clamped
    to [-30, 20] for numerical safety. ``deterministic`` collapses the distribution onto its mean.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, H, W) each
        self.logvar = torch.clamp(self.logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps, eps ~ N(0, I) (Kingma & Welling 2014, Eq. 10).

        With a ``generator`` the noise is drawn on the generator's device, so a seed gives the same sample
        whatever device the model runs on.
        """
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)  # (B, C, H, W)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over (C, H, W), per batch element; ``other`` defaults to N(0, I).

        Closed form for diagonal Gaussians (Kingma & Welling 2014, App. B).
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=tuple(dims))

    def mode(self) -> torch.Tensor:
        """The most likely latent, i.e. the mean."""
        return self.mean


class DiracDistribution:
    """Point mass at ``value``: ``sample()`` and ``mode()`` both return it (pixel-space first stage)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.val = value

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The value itself; ``generator`` is accepted for interface parity and unused."""
        return self.val

    def mode(self) -> torch.Tensor:
        """The value itself."""
        return self.val


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), broadcasting scalars to tensors.

    Used for the prior term of the variational bound (Ho et al. 2020, Eq. 5).
    """
    reference = next((obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)), None)
    if reference is None:
        raise ValueError("normal_kl needs at least one tensor argument, got only Python scalars")
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x, device=reference.device, dtype=reference.dtype)
        for x in (logvar1, logvar2)
    )
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))
