"""Sigma-space samplers, the CompVis denoiser adapter and DDIM, against diffusers' schedulers as the oracle.

Everything runs on tiny tensors with a fake eps-model that is non-linear in x, t and both conditionings.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from ldm.models.diffusion.ddim import DDIMSampler, make_ddim_timesteps
from ldm.models.diffusion.sampling import (
    SAMPLERS,
    CompVisDenoiser,
    get_ancestral_step,
    get_sampler,
    sample_ddim,
    sample_euler,
    sample_euler_ancestral,
)

T = 1000
SD_SCHEDULE = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """The CompVis SD v1 schedule: betas in float64, alphas_cumprod stored as a float32 buffer."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


class FakeEpsModel:
    """Stands in for LatentDiffusion: a schedule buffer and an eps "network" non-linear in every input."""

    parameterization = "eps"

    def __init__(self, alphas_cumprod: torch.Tensor | None = None) -> None:
        self.alphas_cumprod = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        self.calls.append((x_noisy, t))
        image = cond["c_concat"][0]
        text = torch.tanh(cond["c_crossattn"][0][:, :, :4].mean(dim=1))[:, :, None, None]  # (B, 4, 1, 1)
        t = t.float()[:, None, None, None] / T
        return torch.tanh(0.7 * x_noisy + image * text) * (1 + torch.sin(3 * t)) + 0.1 * image**2 - 0.2 * text * t


def make_cond(batch: int = 2, h: int = 3, w: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "c_concat": [torch.randn(batch, 4, h, w, generator=g)],
        "c_crossattn": [torch.randn(batch, 7, 8, generator=g)],
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def diffusers_euler_loop(scheduler, model: FakeEpsModel, noise: torch.Tensor, cond: dict, **step_kwargs):
    """The StableDiffusion pipeline's loop with a diffusers Euler-type scheduler whose timesteps are already set."""
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        eps = model.apply_model(model_input, t.expand(latents.shape[0]), cond)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents


# ----------------------------------------------------------------------------------------------------------------
# CompVisDenoiser: sigmas, sigma <-> t, preconditioning


def test_training_sigmas_match_diffusers() -> None:
    denoiser = CompVisDenoiser(FakeEpsModel())
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE)
    # diffusers builds its betas in float32, CompVis in float64: they agree to ~1e-5 relative
    torch.testing.assert_close(denoiser.sigmas.flip(0), scheduler.sigmas[:-1], rtol=1e-5, atol=0)
    assert denoiser.sigma_max.item() == pytest.approx(14.6146, abs=1e-3)
    assert denoiser.sigma_min.item() == pytest.approx(0.029168, abs=1e-5)


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("steps", [10, 28])
def test_get_sigmas_match_diffusers_linspace_spacing(scheduler_cls, steps: int) -> None:
    # (T-1)/(steps-1) is an integer here, so every timestep is on the training grid and interpolation plays no role
    denoiser = CompVisDenoiser(FakeEpsModel())
    scheduler = scheduler_cls(**SD_SCHEDULE, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    sigmas = denoiser.get_sigmas(steps)
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1e-5, atol=0)
    torch.testing.assert_close(denoiser.sigma_to_t(sigmas[:-1]), scheduler.timesteps, rtol=0, atol=2e-3)


def test_fractional_timesteps_interpolate_in_log_sigma() -> None:
    # k-diffusion interpolates log(sigma) between grid timesteps; diffusers' default ("linear") interpolates sigma
    denoiser = CompVisDenoiser(FakeEpsModel())
    steps = 50
    t = torch.linspace(T - 1, 0, steps, dtype=torch.float64)
    log_sigmas = denoiser.log_sigmas.double()
    low, w = t.floor().long(), t - t.floor()
    expected = ((1 - w) * log_sigmas[low] + w * log_sigmas[(low + 1).clamp(max=T - 1)]).exp()
    sigmas = denoiser.get_sigmas(steps)
    torch.testing.assert_close(sigmas[:-1].double(), expected, rtol=1e-6, atol=0)

    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    diff = ((sigmas - scheduler.sigmas).abs()[:-1] / scheduler.sigmas[:-1]).max().item()
    assert 1e-5 < diff < 2e-4  # close, but not the same interpolation

    # diffusers maps custom sigmas back to timesteps by the same log-sigma interpolation as our sigma_to_t
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    torch.testing.assert_close(denoiser.sigma_to_t(sigmas[:-1]), scheduler.timesteps, rtol=0, atol=1e-3)
    torch.testing.assert_close(denoiser.sigma_to_t(sigmas[:-1]), t.float(), rtol=0, atol=1e-3)


def test_sigma_to_t_roundtrip_and_quantize() -> None:
    denoiser = CompVisDenoiser(FakeEpsModel())
    t = torch.tensor([0.0, 0.25, 1.4, 400.7, 998.2, 999.0])
    sigma = denoiser.t_to_sigma(t)
    torch.testing.assert_close(denoiser.sigma_to_t(sigma), t, rtol=0, atol=2e-3)
    torch.testing.assert_close(denoiser.t_to_sigma(denoiser.sigma_to_t(sigma)), sigma, rtol=1e-5, atol=0)
    assert denoiser.sigma_to_t(sigma, quantize=True).tolist() == [0, 0, 1, 401, 998, 999]
    assert CompVisDenoiser(FakeEpsModel(), quantize=True).sigma_to_t(sigma).dtype == torch.long
    # beyond the training range t is clamped to [0, T-1]
    assert denoiser.sigma_to_t(torch.tensor([1e-4, 1e3])).tolist() == [0.0, 999.0]


def test_denoiser_is_eps_preconditioning() -> None:
    model = FakeEpsModel()
    denoiser = CompVisDenoiser(model)
    cond = make_cond()
    x = torch.randn(2, 4, 3, 5)
    sigma = torch.tensor([0.5, 7.0])
    denoised = denoiser(x, sigma, cond=cond)
    x_in, t = model.calls[-1]
    assert t.dtype == torch.float32 and t.shape == (2,)
    assert 0 < t[0] < t[1] < T and t[0] != t[0].round()  # fractional, as k-diffusion passes it
    c_in = (1 / (sigma**2 + 1) ** 0.5)[:, None, None, None]
    torch.testing.assert_close(x_in, x * c_in)
    expected = x - sigma[:, None, None, None] * model.apply_model(x * c_in, denoiser.sigma_to_t(sigma), cond)
    torch.testing.assert_close(denoised, expected)


def test_non_eps_model_is_rejected() -> None:
    model = FakeEpsModel()
    model.parameterization = "v"
    with pytest.raises(ValueError, match="'v'"):
        CompVisDenoiser(model)
    with pytest.raises(ValueError, match="'v'"):
        DDIMSampler(model)


# ----------------------------------------------------------------------------------------------------------------
# Euler and Euler-ancestral


def reference_ancestral_step(x, denoised, sigma, sigma_next, noise, eta):
    """One k-diffusion Euler-ancestral step, written out independently from the library."""
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    d = (x - denoised) / sigma
    return x + d * (sigma_down - sigma) + noise * sigma_up


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_euler_ancestral_step_matches_reference(eta: float) -> None:
    denoiser = CompVisDenoiser(FakeEpsModel())
    cond = make_cond()
    x = torch.randn(2, 4, 3, 5) * 5
    noise = torch.randn(2, 4, 3, 5)
    sigma, sigma_next = 5.0, 2.0
    out = sample_euler_ancestral(
        denoiser,
        x,
        torch.tensor([sigma, sigma_next]),
        extra_args={"cond": cond},
        disable=True,
        eta=eta,
        noise_sampler=lambda s, s_next: noise,
    )
    denoised = denoiser(x, torch.full((2,), sigma), cond=cond)
    expected = reference_ancestral_step(x, denoised, sigma, sigma_next, noise, eta)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_ancestral_step_split_preserves_variance() -> None:
    sigma_from, sigma_to = torch.tensor(3.0), torch.tensor(1.2)
    sigma_down, sigma_up = get_ancestral_step(sigma_from, sigma_to)
    torch.testing.assert_close(sigma_down**2 + sigma_up**2, sigma_to**2)
    assert get_ancestral_step(sigma_from, sigma_to, eta=0.0) == (sigma_to, 0)


@pytest.mark.parametrize("steps", [10, 25])
def test_euler_matches_diffusers(steps: int) -> None:
    model = FakeEpsModel()
    denoiser = CompVisDenoiser(model)
    cond = make_cond()
    noise = torch.randn(2, 4, 3, 5)
    sigmas = denoiser.get_sigmas(steps)
    ours = sample_euler(denoiser, noise * sigmas[0], sigmas, extra_args={"cond": cond}, disable=True)

    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    if steps == 10:
        scheduler.set_timesteps(steps)  # on-grid timesteps: diffusers' own schedule
    else:
        scheduler.set_timesteps(sigmas=sigmas.tolist())  # off-grid: feed k-diffusion's log-interpolated sigmas
    reference = diffusers_euler_loop(scheduler, model, noise, cond)
    assert rel_err(ours, reference) <= 1e-5


def test_euler_churn_step_matches_karras_algorithm_2() -> None:
    # diffusers' s_churn evaluates the model at sigma, not sigma_hat, so it is no oracle here: write Alg. 2 out
    denoiser = CompVisDenoiser(FakeEpsModel())
    cond = make_cond()
    x = torch.randn(2, 4, 3, 5) * 5
    sigma, sigma_next = 5.0, 2.0
    out = sample_euler(
        denoiser,
        x,
        torch.tensor([sigma, sigma_next]),
        extra_args={"cond": cond},
        disable=True,
        s_churn=1.0,
        s_noise=1.003,
        generator=torch.Generator().manual_seed(7),
    )
    gamma = 2**0.5 - 1  # min(s_churn / steps, sqrt(2) - 1)
    sigma_hat = sigma * (1 + gamma)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) * 1.003
    x_hat = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
    denoised = denoiser(x_hat, torch.full((2,), sigma_hat), cond=cond)
    expected = x_hat + (x_hat - denoised) / sigma_hat * (sigma_next - sigma_hat)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [10, 28])
def test_euler_ancestral_matches_diffusers(steps: int) -> None:
    model = FakeEpsModel()
    denoiser = CompVisDenoiser(model)
    cond = make_cond()
    noise = torch.randn(2, 4, 3, 5)
    sigmas = denoiser.get_sigmas(steps)
    # diffusers draws one randn per step from the generator; so does our sampler when given the same generator
    ours = sample_euler_ancestral(
        denoiser,
        noise * sigmas[0],
        sigmas,
        extra_args={"cond": cond},
        disable=True,
        generator=torch.Generator().manual_seed(3),
    )
    scheduler = EulerAncestralDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    reference = diffusers_euler_loop(scheduler, model, noise, cond, generator=torch.Generator().manual_seed(3))
    assert rel_err(ours, reference) <= 1e-5

    # the same through an explicit noise_sampler fed with the generator's stream
    stream = torch.Generator().manual_seed(3)
    via_sampler = sample_euler_ancestral(
        denoiser,
        noise * sigmas[0],
        sigmas,
        extra_args={"cond": cond},
        disable=True,
        noise_sampler=lambda s, s_next: torch.randn(noise.shape, generator=stream),
    )
    torch.testing.assert_close(via_sampler, ours, rtol=0, atol=0)


def test_euler_ancestral_generator_is_independent_of_global_rng() -> None:
    denoiser = CompVisDenoiser(FakeEpsModel())
    cond = make_cond()
    sigmas = denoiser.get_sigmas(6)
    x = torch.randn(2, 4, 3, 5) * sigmas[0]

    def run(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        generator = torch.Generator().manual_seed(seed)
        return sample_euler_ancestral(denoiser, x, sigmas, extra_args={"cond": cond}, disable=True, generator=generator)

    assert torch.equal(run(0, global_seed=1), run(0, global_seed=2))
    assert not torch.allclose(run(0, global_seed=1), run(1, global_seed=1))


def test_callback_sees_every_step() -> None:
    denoiser = CompVisDenoiser(FakeEpsModel())
    sigmas = denoiser.get_sigmas(5)
    seen = []
    for name in ("euler", "euler_ancestral", "ddim"):
        seen.clear()
        get_sampler(name)(
            denoiser,
            torch.randn(1, 4, 3, 5) * sigmas[0],
            sigmas,
            extra_args={"cond": make_cond(batch=1)},
            callback=lambda info: seen.append((info["i"], info["sigma"].item(), info["denoised"].shape)),
            disable=True,
        )
        assert [i for i, _, _ in seen] == list(range(5))
        assert [s for _, s, _ in seen] == pytest.approx(sigmas[:-1].tolist())
    assert set(SAMPLERS) == {"euler", "euler_ancestral", "ddim"}
    with pytest.raises(KeyError, match="'heun'"):
        get_sampler("heun")


# ----------------------------------------------------------------------------------------------------------------
# DDIM


def test_ddim_timesteps_as_compvis() -> None:
    assert make_ddim_timesteps(50, T).tolist() == list(range(1, 1000, 20))
    assert make_ddim_timesteps(50, T)[[0, 1, -1]].tolist() == [1, 21, 981]
    assert len(make_ddim_timesteps(30, T)) == 30  # CompVis' range(0, T, T // S) would give 31
    assert make_ddim_timesteps(4, T, "quad").tolist() == [1, 89, 356, 801]
    with pytest.raises(ValueError, match="1001"):
        make_ddim_timesteps(1001, T)
    with pytest.raises(ValueError, match="'cosine'"):
        make_ddim_timesteps(10, T, "cosine")


def run_ddim(model, steps, x_T, cond, **kwargs):
    sampler = DDIMSampler(model)
    batch_size, *shape = x_T.shape
    samples, intermediates = sampler.sample(
        S=steps, batch_size=batch_size, shape=tuple(shape), conditioning=cond, x_T=x_T, verbose=False, **kwargs
    )
    return sampler, samples, intermediates


def diffusers_ddim_loop(model, steps, x_T, cond, eta=0.0, generator=None):
    scheduler = DDIMScheduler(
        **SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )
    scheduler.set_timesteps(steps)
    latents = x_T
    for t in scheduler.timesteps:
        eps = model.apply_model(latents, t.expand(latents.shape[0]), cond)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return scheduler, latents


@pytest.mark.parametrize("steps", [50, 30])
def test_ddim_matches_diffusers(steps: int) -> None:
    model = FakeEpsModel()
    cond = make_cond()
    x_T = torch.randn(2, 4, 3, 5)
    sampler, ours, intermediates = run_ddim(model, steps, x_T, cond)
    scheduler, reference = diffusers_ddim_loop(model, steps, x_T, cond)
    assert torch.equal(sampler.ddim_timesteps.flip(0), scheduler.timesteps)
    assert rel_err(ours, reference) <= 1e-5

    # step count honoured: one model call per step, at the CompVis timesteps in descending order
    model.calls.clear()
    run_ddim(model, steps, x_T, cond)
    assert [t[0].item() for _, t in model.calls] == sampler.ddim_timesteps.flip(0).tolist()
    assert model.calls[0][1].dtype == torch.long
    # x_T, then the first step (index S-1) and the last (index 0, a multiple of log_every_t)
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 3


def test_ddim_eta0_is_deterministic_and_eta_noise_matches_diffusers() -> None:
    model = FakeEpsModel()
    cond = make_cond()
    x_T = torch.randn(2, 4, 3, 5)
    torch.manual_seed(1)
    _, first, _ = run_ddim(model, 10, x_T, cond)
    torch.manual_seed(2)
    _, second, _ = run_ddim(model, 10, x_T, cond)
    assert torch.equal(first, second)

    _, ours, _ = run_ddim(model, 10, x_T, cond, eta=0.7, generator=torch.Generator().manual_seed(5))
    _, reference = diffusers_ddim_loop(model, 10, x_T, cond, eta=0.7, generator=torch.Generator().manual_seed(5))
    assert rel_err(ours, reference) <= 1e-5
    assert not torch.allclose(ours, first)


def test_ddim_draws_x_T_from_generator() -> None:
    sampler = DDIMSampler(FakeEpsModel())
    kwargs = dict(S=3, batch_size=1, shape=(4, 3, 5), conditioning=make_cond(batch=1), verbose=False)
    a, _ = sampler.sample(**kwargs, generator=torch.Generator().manual_seed(0))
    b, _ = sampler.sample(**kwargs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_ddim_guidance() -> None:
    model = FakeEpsModel()
    cond = make_cond()
    uncond = {"c_concat": cond["c_concat"], "c_crossattn": [torch.zeros(2, 7, 8)]}
    x = torch.randn(2, 4, 3, 5)
    t = torch.full((2,), 501)
    sampler = DDIMSampler(model)
    e_c, e_u = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
    model.calls.clear()
    guided = sampler.guided_eps(x, cond, t, 7.5, uncond)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 4  # one batched call
    torch.testing.assert_close(guided, e_u + 7.5 * (e_c - e_u))

    # IP2P dual guidance: uncond carries the zero image; the image-only branch keeps cond's image
    uncond = {"c_concat": [torch.zeros(2, 4, 3, 5)], "c_crossattn": [torch.zeros(1, 7, 8)]}
    e_i = model.apply_model(x, t, {"c_concat": cond["c_concat"], "c_crossattn": [torch.zeros(2, 7, 8)]})
    e_u = model.apply_model(x, t, {"c_concat": uncond["c_concat"], "c_crossattn": [torch.zeros(2, 7, 8)]})
    model.calls.clear()
    guided = sampler.guided_eps(x, cond, t, 7.5, uncond, image_guidance_scale=1.5)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 6
    torch.testing.assert_close(guided, e_u + 7.5 * (e_c - e_i) + 1.5 * (e_i - e_u))

    # contrast guidance: a fourth branch (contrast text, image) and s_C (e_c - e_contrast), per sample by sigma(t)
    contrast_text = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(4))
    e_k = model.apply_model(x, t, {"c_concat": cond["c_concat"], "c_crossattn": [contrast_text]})
    model.calls.clear()
    guided = sampler.guided_eps(x, cond, t, 7.5, uncond, 1.5, contrast_text, 2.0, contrast_min_sigma=0.0)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 8
    torch.testing.assert_close(guided, e_u + 7.5 * (e_c - e_i) + 1.5 * (e_i - e_u) + 2.0 * (e_c - e_k))
    sigma = ((1 - model.alphas_cumprod[501]) / model.alphas_cumprod[501]).sqrt().item()
    model.calls.clear()
    assert torch.equal(sampler.guided_eps(x, cond, t, 7.5, uncond, 1.5, contrast_text, 2.0, sigma * 1.001),
                       sampler.guided_eps(x, cond, t, 7.5, uncond, 1.5))
    assert model.calls[0][0].shape[0] == 6  # below the threshold the fourth branch is not run
    with pytest.raises(ValueError, match="needs dual guidance"):
        sampler.guided_eps(x, cond, t, 7.5, uncond, None, contrast_text, 2.0)


def test_ddim_rejects_unsupported_legacy_arguments() -> None:
    sampler = DDIMSampler(FakeEpsModel())
    kwargs = dict(S=2, batch_size=1, shape=(4, 3, 5), conditioning=make_cond(batch=1), verbose=False)
    sampler.sample(**kwargs, quantize_x0=False, score_corrector=None)  # defaults are accepted
    with pytest.raises(ValueError, match="quantize_x0"):
        sampler.sample(**kwargs, quantize_x0=True)
    with pytest.raises(TypeError, match="'unconditional_guidance'"):
        sampler.sample(**kwargs, unconditional_guidance=7.5)


def test_sigma_space_ddim_equals_ddim_sampler() -> None:
    # DDIM is Euler in x / sqrt(alpha_bar): sample_ddim on the DDIM timesteps' sigmas reproduces DDIMSampler
    model = FakeEpsModel()
    cond = make_cond()
    x_T = torch.randn(2, 4, 3, 5)
    sampler, reference, _ = run_ddim(model, 20, x_T, cond)
    denoiser = CompVisDenoiser(model)
    timesteps = sampler.ddim_timesteps.flip(0)
    sigmas = torch.cat([denoiser.sigmas[timesteps], denoiser.sigmas[:1]])
    x = sample_ddim(denoiser, x_T * (sigmas[0] ** 2 + 1) ** 0.5, sigmas, extra_args={"cond": cond}, disable=True)
    ours = x / (sigmas[-1] ** 2 + 1) ** 0.5
    assert rel_err(ours, reference) <= 1e-5


@pytest.mark.gpu
def test_samplers_follow_the_model_device() -> None:
    # schedules live on the model's device; a CPU generator still drives noise for CUDA tensors
    device = torch.device("cuda")
    cond = make_cond()
    noise = torch.randn(2, 4, 3, 5)
    runs = []
    for target in (torch.device("cpu"), device):
        model = FakeEpsModel(scaled_linear_alphas_cumprod().to(target))
        target_cond = {key: [value[0].to(target)] for key, value in cond.items()}
        denoiser = CompVisDenoiser(model)
        sigmas = denoiser.get_sigmas(8)
        z = sample_euler_ancestral(
            denoiser,
            noise.to(target) * sigmas[0],
            sigmas,
            extra_args={"cond": target_cond},
            disable=True,
            generator=torch.Generator().manual_seed(0),
        )
        samples, _ = DDIMSampler(model).sample(
            S=8,
            batch_size=2,
            shape=(4, 3, 5),
            conditioning=target_cond,
            eta=0.5,
            verbose=False,
            generator=torch.Generator().manual_seed(0),
        )
        assert z.device.type == samples.device.type == target.type
        runs.append((z.cpu(), samples.cpu()))
    for on_cpu, on_gpu in zip(*runs):
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)


def test_x0_parameterization_denoiser_returns_the_prediction():
    """An x0-predicting model's output is the denoised estimate; it equals the eps form of the same prediction."""
    from ldm.models.diffusion.sampling import CompVisDenoiser
    from ldm.models.diffusion.schedule import make_beta_schedule, schedule_buffers

    alphas_cumprod = schedule_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"].float()
    x0 = torch.randn(2, 4, 3, 3)

    class X0Model:
        parameterization = "x0"

        def __init__(self):
            self.alphas_cumprod = alphas_cumprod

        def apply_model(self, x_t, t, cond):
            return x0

    class EpsModel:
        parameterization = "eps"

        def __init__(self):
            self.alphas_cumprod = alphas_cumprod

        def apply_model(self, x_t, t, cond):  # the eps that makes the same x0: eps = (x_t - sqrt(ab) x0) / sqrt(1-ab)
            ab = alphas_cumprod[t.round().long()].view(-1, 1, 1, 1)
            return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    sigma = torch.tensor([CompVisDenoiser(X0Model()).sigmas[500].item()] * 2)
    x = torch.randn(2, 4, 3, 3) * sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(CompVisDenoiser(X0Model())(x, sigma, cond=None), x0)
    torch.testing.assert_close(CompVisDenoiser(EpsModel())(x, sigma, cond=None), x0, rtol=1e-4, atol=1e-4)
