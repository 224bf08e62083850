"""Sigma-space samplers and the CompVis denoiser adapter (the k-diffusion formulation).

A CompVis eps-model is wrapped as a denoiser ``D(x, sigma) -> x0`` in the variance-exploding coordinate
``x = x_t / sqrt(alpha_bar_t)`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` (Karras et al. 2022,
Table 1, VP column). Samplers are free functions with one signature:
``sample_<name>(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, ...)``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from tqdm.auto import trange

from ldm.errors import UsageError

Denoiser = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


class EpsModel(Protocol):
    """What the adapters need from a CompVis LatentDiffusion: its schedule and its eps network."""

    alphas_cumprod: torch.Tensor

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that ``x`` broadcasts against a ``target_dims``-d tensor."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """Append a final 0 to a 1-d tensor of noise levels."""
    return torch.cat([x, x.new_zeros([1])])


def check_eps_parameterization(model: Any) -> None:
    """Raise unless ``model`` predicts eps (the only parameterization of SD v1 / InstructPix2Pix)."""
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization != "eps":
        raise UsageError(f"this sampler needs an eps-prediction model, the model has parameterization="
                         f"{parameterization!r}: use --sampler euler or euler_ancestral")


class CompVisDenoiser:
    """Wrap a CompVis model as a denoiser in sigma space (Karras et al. 2022, Table 1, VP preconditioning).

    Args:
        model: object with ``alphas_cumprod`` (T,) and ``apply_model(x_noisy, t, cond)`` predicting eps, or x0 when
            its ``parameterization`` is ``"x0"`` (then the prediction is the denoised estimate itself).
        quantize: round ``t(sigma)`` to the nearest training timestep instead of interpolating.
    """

    def __init__(self, model: EpsModel, quantize: bool = False) -> None:
        self.predicts_x0 = getattr(model, "parameterization", "eps") == "x0"
        if not self.predicts_x0:
            check_eps_parameterization(model)
        self.inner_model = model
        self.quantize = quantize
        alphas_cumprod = model.alphas_cumprod.detach().float()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (T,), increasing in t
        self.log_sigmas = self.sigmas.log()
        self.sigma_data = 1.0

    @property
    def sigma_min(self) -> torch.Tensor:
        """The smallest training noise level, sigma(t=0)."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        """The largest training noise level, sigma(t=T-1)."""
        return self.sigmas[-1]

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        """Noise levels at ``t = linspace(T-1, 0, n)`` followed by a final 0 (all T levels if ``n`` is None)."""
        if n is None:
            return append_zero(self.sigmas.flip(0))
        if n < 1:
            raise ValueError(f"number of sampling steps must be >= 1, got {n}")
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n, device=self.sigmas.device)
        return append_zero(self.t_to_sigma(t))

    def sigma_to_discrete_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep whose log-sigma is nearest to ``log(sigma)``."""
        log_sigma = sigma.log().to(self.log_sigmas.device)
        dists = log_sigma - self.log_sigmas[:, None]  # (T, N)
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """Fractional timestep of ``sigma`` by linear interpolation in log-sigma between neighbouring timesteps."""
        quantize = self.quantize if quantize is None else quantize
        if quantize:
            return self.sigma_to_discrete_timestep(sigma)
        log_sigma = sigma.log().to(self.log_sigmas.device)
        dists = log_sigma - self.log_sigmas[:, None]  # (T, N)
        # index of the last training level at or below sigma, kept one short of the end
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape).to(sigma.device)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level at a (fractional) timestep, interpolating linearly in log-sigma."""
        t = t.float().to(self.log_sigmas.device)
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(c_out, c_in) = (-sigma, 1 / sqrt(sigma^2 + sigma_data^2))`` (eps preconditioning)."""
        c_out = -sigma
        c_in = 1 / (sigma**2 + self.sigma_data**2) ** 0.5
        return c_out, c_in

    def get_eps(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run the wrapped eps network on the VP-scaled input."""
        return self.inner_model.apply_model(x_t, t, **kwargs)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Denoised estimate ``x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma), cond)``."""
        # x: (B, C, H, W) in sigma space; sigma: (B,)
        c_out, c_in = (append_dims(s, x.ndim) for s in self.get_scalings(sigma))
        out = self.get_eps(x * c_in, self.sigma_to_t(sigma), **kwargs)  # (B, C, H, W)
        if self.predicts_x0:
            return out  # x = x0 + sigma * eps in sigma space: the x0 prediction is the denoised estimate
        return x + out * c_out


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, Eqs. 1 and 3)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``sigma_from -> sigma_to`` into a deterministic step to ``sigma_down`` plus fresh noise ``sigma_up``.

    ``sigma_up^2 = eta^2 * sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2`` (capped at ``sigma_to``) and
    ``sigma_down^2 = sigma_to^2 - sigma_up^2``; with ``eta = 1`` this is the DDPM ancestral step, and in general it is
    DDIM's eta-noise (Song et al. 2021, Eq. 16) written in sigma space.
    """
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def standard_normal(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise on ``device``; with a generator, drawn only from it (on its device, then moved), so a
    seed reproduces it regardless of the global RNG."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def default_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Return ``noise_sampler(sigma, sigma_next)`` drawing standard normal noise shaped like ``x`` (`standard_normal`)."""
    return lambda sigma, sigma_next: standard_normal(x.shape, generator, x.device, x.dtype)


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022); deterministic unless ``s_churn > 0``."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    churn_noise = default_noise_sampler(x, generator)
    for i in trange(len(sigmas) - 1, disable=disable):
        in_range = s_tmin <= sigmas[i] <= s_tmax
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if in_range else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            eps = churn_noise(sigmas[i], sigma_hat) * s_noise
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = denoiser(x, sigma_hat * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        d = to_d(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral sampling with Euler method steps (k-diffusion; Karras et al. 2022, Alg. 2 with ancestral noise).

    Noise comes from ``noise_sampler`` if given, else from ``generator``, else from the global RNG: one draw per
    step with ``sigma_next > 0`` (none when ``eta == 0``).
    """
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and eta != 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) in sigma space.

    With ``x = x_t / sqrt(alpha_bar_t)`` the DDIM update is ``x' = D + sigma_down * eps + sigma_up * noise`` with
    ``eps = (x - D) / sigma``, i.e. exactly an (ancestral) Euler step; ``eta = 0`` is deterministic DDIM.
    Run it on the DDIM timesteps' sigmas to reproduce :class:`~ldm.models.diffusion.ddim.DDIMSampler`.
    """
    return sample_euler_ancestral(
        denoiser,
        x,
        sigmas,
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        eta=eta,
        noise_sampler=noise_sampler,
        generator=generator,
    )


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler_ancestral": sample_euler_ancestral,
    "euler": sample_euler,
    "ddim": sample_ddim,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Look up a sampler in :data:`SAMPLERS` by name."""
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
