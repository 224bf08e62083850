"""DDIM sampling (Song et al. 2021) with the CompVis ``DDIMSampler`` call signature."""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.guidance import Scale, dual_guided, gate_contrast, single_guidance
from ldm.models.diffusion.sampling import EpsModel, check_eps_parameterization, standard_normal

logger = logging.getLogger(__name__)

# CompVis ``sample`` keywords whose features this sampler does not implement; accepted only at their defaults.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "normals_sequence": None,
    "quantize_x0": False,
    "mask": None,
    "x0": None,
    "score_corrector": None,
    "corrector_kwargs": None,
}


def make_ddim_timesteps(
    num_ddim_timesteps: int,
    num_ddpm_timesteps: int,
    discretize: Literal["uniform", "quad"] = "uniform",
) -> torch.Tensor:
    """The DDIM subsequence of training timesteps, ascending, shifted by +1 as in CompVis.

    ``uniform``: ``c = T // S`` and ``t = [0, c, ..., (S-1) c] + 1`` (S = 50, T = 1000 gives 1, 21, ..., 981).
    CompVis takes ``range(0, T, c)``, which has more than S entries when S does not divide T; here the step count
    is always honoured (the first S entries, as diffusers' "leading" spacing with ``steps_offset=1``).
    ``quad``: ``int(linspace(0, sqrt(0.8 T), S)^2) + 1``.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"ddim steps must be in [1, {num_ddpm_timesteps}], got {num_ddim_timesteps}")
    if discretize == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        timesteps = torch.arange(num_ddim_timesteps) * c
    elif discretize == "quad":
        t_max = (num_ddpm_timesteps * 0.8) ** 0.5
        timesteps = (torch.linspace(0, t_max, num_ddim_timesteps, dtype=torch.float64) ** 2).long()
    else:
        raise ValueError(f"unknown ddim_discretize {discretize!r}; choose 'uniform' or 'quad'")
    return timesteps + 1


def make_ddim_sampling_parameters(
    alphas_cumprod: torch.Tensor, ddim_timesteps: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step ``(sigma_t, alpha_bar_t, alpha_bar_prev)`` of DDIM (Song et al. 2021, Eq. 16).

    ``sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)``; the last step's ``a_prev`` is
    ``alpha_bar_0`` (diffusers' ``set_alpha_to_one=False``).
    """
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)) ** 0.5
    return sigmas, alphas, alphas_prev


def _cat_conditioning(conds: list[Any]) -> Any:
    """Concatenate conditionings along the batch: tensors, lists of tensors, or dicts of either."""
    first = conds[0]
    if isinstance(first, dict):
        return {key: _cat_conditioning([c[key] for c in conds]) for key in first}
    if isinstance(first, (list, tuple)):
        return [_cat_conditioning([c[i] for c in conds]) for i in range(len(first))]
    return torch.cat(conds)


def _first_tensor(cond: Any) -> torch.Tensor:
    """The first tensor inside a conditioning (to read its batch size)."""
    while not isinstance(cond, torch.Tensor):
        cond = next(iter(cond.values())) if isinstance(cond, dict) else cond[0]
    return cond


class DDIMSampler:
    """DDIM sampler for a CompVis eps-model (Song et al. 2021), keeping the CompVis attribute and call names.

    Args:
        model: object with ``alphas_cumprod`` (T,) and ``apply_model(x_noisy, t, cond) -> eps``.
        schedule: kept for CompVis signature compatibility; the schedule is the model's ``alphas_cumprod``.
    """

    def __init__(self, model: EpsModel, schedule: str = "linear") -> None:
        check_eps_parameterization(model)
        self.model = model
        self.ddpm_num_timesteps = model.alphas_cumprod.shape[0]
        self.schedule = schedule

    @property
    def device(self) -> torch.device:
        """The model's device (where its schedule buffer lives)."""
        return self.model.alphas_cumprod.device

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: Literal["uniform", "quad"] = "uniform",
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """Set ``ddim_timesteps`` and the per-step ``ddim_alphas``/``ddim_alphas_prev``/``ddim_sigmas``."""
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize)
        alphas_cumprod = self.model.alphas_cumprod.detach().to("cpu", torch.float64)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod, self.ddim_timesteps, ddim_eta)
        to_model = lambda x: x.to(self.device, torch.float32)  # noqa: E731
        self.ddim_sigmas = to_model(sigmas)
        self.ddim_alphas = to_model(alphas)
        self.ddim_alphas_prev = to_model(alphas_prev)
        self.ddim_sqrt_one_minus_alphas = to_model((1 - alphas) ** 0.5)
        if verbose:
            timesteps = self.ddim_timesteps.tolist()
            logger.info("DDIM: %d steps, timesteps %s, eta %s", len(timesteps), timesteps, ddim_eta)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        eta: float = 0.0,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        contrast_conditioning: torch.Tensor | None = None,
        contrast_guidance_scale: Scale = 0.0,
        contrast_min_sigma: float = 0.0,
        **legacy: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` DDIM steps; returns (samples, intermediates).

        With ``image_guidance_scale`` set, dict conditionings are guided InstructPix2Pix-style
        (:func:`~ldm.models.diffusion.guidance.dual_guidance`, text scale = ``unconditional_guidance_scale``);
        otherwise CompVis classifier-free guidance between ``conditioning`` and ``unconditional_conditioning``.
        ``contrast_conditioning`` (1 or B, 77, D), with dual guidance only, adds contrast guidance of scale
        ``contrast_guidance_scale`` at every step whose noise level sqrt((1 - a_t) / a_t) is at least
        ``contrast_min_sigma`` (:func:`~ldm.models.diffusion.guidance.gate_contrast`; the same sigma as the
        euler samplers').
        """
        for name, value in legacy.items():
            if name not in _UNSUPPORTED_DEFAULTS:
                raise TypeError(f"DDIMSampler.sample() got an unexpected keyword argument {name!r}")
            if value is not _UNSUPPORTED_DEFAULTS[name]:
                raise ValueError(f"DDIMSampler.sample(): {name}={value!r} is not supported")
        if conditioning is not None:
            cond_batch = _first_tensor(conditioning).shape[0]
            if cond_batch != batch_size:
                logger.warning("got %d conditionings but batch size is %d", cond_batch, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        return self.ddim_sampling(
            conditioning,
            (batch_size, *shape),
            x_T=x_T,
            callback=callback,
            img_callback=img_callback,
            log_every_t=log_every_t,
            temperature=temperature,
            noise_dropout=noise_dropout,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning,
            image_guidance_scale=image_guidance_scale,
            generator=generator,
            verbose=verbose,
            contrast_conditioning=contrast_conditioning,
            contrast_guidance_scale=contrast_guidance_scale,
            contrast_min_sigma=contrast_min_sigma,
        )

    @torch.no_grad()
    def ddim_sampling(
        self,
        cond: Any,
        shape: tuple[int, ...],
        x_T: torch.Tensor | None = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        log_every_t: int = 100,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        verbose: bool = True,
        contrast_conditioning: torch.Tensor | None = None,
        contrast_guidance_scale: Scale = 0.0,
        contrast_min_sigma: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run the DDIM loop from ``x_T`` (or fresh noise) over ``ddim_timesteps`` in descending order."""
        img = standard_normal(shape, generator, self.device) if x_T is None else x_T
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        total_steps = len(self.ddim_timesteps)
        time_range = self.ddim_timesteps.flip(0).tolist()
        for i, step in enumerate(tqdm(time_range, desc="DDIM Sampler", total=total_steps, disable=not verbose)):
            index = total_steps - i - 1
            ts = torch.full((shape[0],), step, device=img.device, dtype=torch.long)
            img, pred_x0 = self.p_sample_ddim(
                img,
                cond,
                ts,
                index=index,
                temperature=temperature,
                noise_dropout=noise_dropout,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning,
                image_guidance_scale=image_guidance_scale,
                generator=generator,
                contrast_conditioning=contrast_conditioning,
                contrast_guidance_scale=contrast_guidance_scale,
                contrast_min_sigma=contrast_min_sigma,
            )
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    def guided_eps(
        self,
        x: torch.Tensor,
        c: Any,
        t: torch.Tensor,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        image_guidance_scale: float | None = None,
        contrast_conditioning: torch.Tensor | None = None,
        contrast_guidance_scale: Scale = 0.0,
        contrast_min_sigma: float = 0.0,
    ) -> torch.Tensor:
        """Noise prediction with single (text) or dual (text + image) classifier-free guidance, the latter optionally
        with a contrast prompt while the noise level of ``t`` is at least ``contrast_min_sigma``."""
        apply_model = self.model.apply_model
        if image_guidance_scale is not None:
            if not isinstance(c, dict) or not isinstance(unconditional_conditioning, dict):
                raise ValueError("image_guidance_scale needs dict conditioning and unconditional_conditioning")
            alpha_bar = self.model.alphas_cumprod[t]  # (B,)
            sigma = ((1 - alpha_bar) / alpha_bar).sqrt()  # the k-diffusion sigma of timestep t
            contrast, contrast_scale = gate_contrast(sigma, contrast_conditioning, contrast_guidance_scale,
                                                     contrast_min_sigma)
            return dual_guided(apply_model, x, t, c, unconditional_conditioning, unconditional_guidance_scale,
                               image_guidance_scale, contrast, contrast_scale)
        if contrast_conditioning is not None:
            raise ValueError("contrast_conditioning needs dual guidance (image_guidance_scale)")
        if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
            return apply_model(x, t, c)
        c_in = _cat_conditioning([unconditional_conditioning, c])
        e_uncond, e_cond = apply_model(torch.cat([x] * 2), torch.cat([t] * 2), c_in).chunk(2)
        return single_guidance(e_cond, e_uncond, unconditional_guidance_scale)

    @torch.no_grad()
    def p_sample_ddim(
        self,
        x: torch.Tensor,
        c: Any,
        t: torch.Tensor,
        index: int,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        image_guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        contrast_conditioning: torch.Tensor | None = None,
        contrast_guidance_scale: Scale = 0.0,
        contrast_min_sigma: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step ``x_t -> x_prev`` (Song et al. 2021, Eq. 12); returns ``(x_prev, pred_x0)``."""
        # x: (B, C, H, W); t: (B,) long
        e_t = self.guided_eps(
            x, c, t, unconditional_guidance_scale, unconditional_conditioning, image_guidance_scale,
            contrast_conditioning, contrast_guidance_scale, contrast_min_sigma,
        )  # (B, C, H, W)
        a_t = self.ddim_alphas[index]
        a_prev = self.ddim_alphas_prev[index]
        sigma_t = self.ddim_sigmas[index]
        pred_x0 = (x - self.ddim_sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if sigma_t > 0:
            noise = sigma_t * standard_normal(x.shape, generator, x.device).to(x.dtype) * temperature
            if noise_dropout > 0.0:
                noise = torch.nn.functional.dropout(noise, p=noise_dropout)
            x_prev = x_prev + noise
        return x_prev, pred_x0
