"""Classifier-free guidance algebra and the batched three-way InstructPix2Pix denoiser."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.guidance import DualCFGDenoiser, dual_guidance, null_conditioning, single_guidance
from ldm.models.diffusion.sampling import CompVisDenoiser, sample_euler_ancestral


def outputs(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, 3, 5, generator=g, dtype=dtype) for _ in range(3))


def make_cond(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "c_crossattn": [torch.randn(batch, 7, 8, generator=g)],
        "c_concat": [torch.randn(batch, 4, 3, 5, generator=g)],
    }


class FakeDenoiser:
    """A sigma-space denoiser, non-linear in x, sigma, the text and the image, that records its batch sizes."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        text = torch.tanh(cond["c_crossattn"][0] @ torch.linspace(-1, 1, 8)).mean(dim=1)  # (B,)
        image = cond["c_concat"][0]
        s = sigma[:, None, None, None]
        return torch.tanh(x / (1 + s) + image**2 * text[:, None, None, None]) + torch.sin(image * s)


class FakeEpsModel:
    """A CompVis-like eps-model; optionally applies dual guidance itself, in eps space, as diffusers' pipeline does."""

    parameterization = "eps"

    def __init__(self, guide: tuple[dict, float, float] | None = None) -> None:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
        self.guide = guide

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        text = cond["c_crossattn"][0].mean(dim=(1, 2))[:, None, None, None]
        return torch.tanh(x * cond["c_concat"][0] + text) * torch.cos(t / 500)[:, None, None, None]

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        if self.guide is None:
            return self.eps(x, t, cond)
        uncond, text_scale, image_scale = self.guide
        image_only = {"c_crossattn": uncond["c_crossattn"], "c_concat": cond["c_concat"]}
        return dual_guidance(
            self.eps(x, t, cond), self.eps(x, t, image_only), self.eps(x, t, uncond), text_scale, image_scale
        )


def test_unit_scales_give_the_fully_conditioned_output() -> None:
    d_full, d_image, d_uncond = outputs()
    torch.testing.assert_close(dual_guidance(d_full, d_image, d_uncond, 1.0, 1.0), d_full, rtol=0, atol=1e-14)
    torch.testing.assert_close(dual_guidance(d_full, d_image, d_uncond, 0.0, 0.0), d_uncond, rtol=0, atol=0)
    torch.testing.assert_close(dual_guidance(d_full, d_image, d_uncond, 0.0, 1.0), d_image, rtol=0, atol=1e-14)


@pytest.mark.parametrize("text_scale", [0.0, 1.0, 7.5])
def test_unit_image_scale_is_text_cfg_around_the_image_branch(text_scale: float) -> None:
    d_full, d_image, d_uncond = outputs(1)
    torch.testing.assert_close(
        dual_guidance(d_full, d_image, d_uncond, text_scale, 1.0),
        single_guidance(d_full, d_image, text_scale),
        rtol=0,
        atol=1e-13,
    )


def test_single_guidance() -> None:
    d_cond, d_uncond, _ = outputs(2)
    torch.testing.assert_close(single_guidance(d_cond, d_uncond, 1.0), d_cond, rtol=0, atol=1e-14)
    torch.testing.assert_close(single_guidance(d_cond, d_uncond, 0.0), d_uncond, rtol=0, atol=0)
    torch.testing.assert_close(single_guidance(d_cond, d_uncond, 3.0), 3 * d_cond - 2 * d_uncond, rtol=0, atol=1e-14)


@pytest.mark.parametrize("batch", [1, 3])
def test_batched_dual_cfg_equals_three_separate_calls(batch: int) -> None:
    inner = FakeDenoiser()
    cond = make_cond(batch, seed=1)  # per-sample text and image
    uncond = null_conditioning(cond, torch.randn(1, 7, 8))
    z = torch.randn(batch, 4, 3, 5)
    sigma = torch.linspace(0.5, 9.0, batch)
    guided = DualCFGDenoiser(inner)(z, sigma, cond=cond, uncond=uncond, text_cfg_scale=7.5, image_cfg_scale=1.5)
    assert inner.batch_sizes == [3 * batch]  # one batched call

    image_only = {"c_crossattn": uncond["c_crossattn"], "c_concat": cond["c_concat"]}
    d_full, d_image, d_uncond = (inner(z, sigma, cond=c) for c in (cond, image_only, uncond))
    torch.testing.assert_close(guided, d_uncond + 7.5 * (d_full - d_image) + 1.5 * (d_image - d_uncond))
    # each sample only sees its own conditioning
    first = DualCFGDenoiser(inner)(
        z[:1],
        sigma[:1],
        cond={k: [v[0][:1]] for k, v in cond.items()},
        uncond={k: [v[0][:1]] for k, v in uncond.items()},
        text_cfg_scale=7.5,
        image_cfg_scale=1.5,
    )
    torch.testing.assert_close(guided[:1], first)


def test_per_sample_scales() -> None:
    inner = FakeDenoiser()
    cond = make_cond(2, seed=2)
    uncond = null_conditioning(cond, torch.randn(1, 7, 8))
    z, sigma = torch.randn(2, 4, 3, 5), torch.tensor([1.0, 4.0])
    text, image = torch.tensor([7.5, 3.0]).view(-1, 1, 1, 1), torch.tensor([1.5, 1.0]).view(-1, 1, 1, 1)
    guided = DualCFGDenoiser(inner)(z, sigma, cond=cond, uncond=uncond, text_cfg_scale=text, image_cfg_scale=image)
    for i in range(2):
        alone = DualCFGDenoiser(inner)(
            z, sigma, cond=cond, uncond=uncond, text_cfg_scale=text[i].item(), image_cfg_scale=image[i].item()
        )
        torch.testing.assert_close(guided[i], alone[i])


def test_null_conditioning() -> None:
    cond = make_cond(2)
    null_text = torch.randn(1, 7, 8)
    uncond = null_conditioning(cond, null_text)
    assert torch.equal(uncond["c_concat"][0], torch.zeros(2, 4, 3, 5))
    assert uncond["c_crossattn"][0].shape == (2, 7, 8)
    assert torch.equal(uncond["c_crossattn"][0][1], null_text[0])


def test_bad_conditioning_is_named() -> None:
    cond = make_cond(2)
    uncond = null_conditioning(cond, torch.randn(1, 7, 8))
    z, sigma = torch.randn(2, 4, 3, 5), torch.ones(2)
    denoiser = DualCFGDenoiser(FakeDenoiser())
    with pytest.raises(ValueError, match="cond c_concat has batch 3"):
        bad = {"c_crossattn": cond["c_crossattn"], "c_concat": [torch.randn(3, 4, 3, 5)]}
        denoiser(z, sigma, cond=bad, uncond=uncond, text_cfg_scale=7.5, image_cfg_scale=1.5)
    with pytest.raises(KeyError, match="'c_concat'"):
        text_only = {"c_crossattn": cond["c_crossattn"]}
        denoiser(z, sigma, cond=text_only, uncond=uncond, text_cfg_scale=1.0, image_cfg_scale=1.0)


def test_guiding_denoised_outputs_equals_guiding_eps() -> None:
    # the IP2P CFGDenoiser guides denoised outputs, diffusers' IP2P pipeline guides eps: same result (affine weights)
    cond = make_cond(2, seed=3)
    uncond = null_conditioning(cond, torch.randn(1, 7, 8))
    text_scale, image_scale = 7.5, 1.5
    plain = CompVisDenoiser(FakeEpsModel())
    guided_eps = CompVisDenoiser(FakeEpsModel((uncond, text_scale, image_scale)))
    sigmas = plain.get_sigmas(6)
    x = torch.randn(2, 4, 3, 5) * sigmas[0]
    extra = {"cond": cond, "uncond": uncond, "text_cfg_scale": text_scale, "image_cfg_scale": image_scale}
    ours = sample_euler_ancestral(
        DualCFGDenoiser(plain), x, sigmas, extra_args=extra, disable=True, generator=torch.Generator().manual_seed(0)
    )
    reference = sample_euler_ancestral(
        guided_eps, x, sigmas, extra_args={"cond": cond}, disable=True, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_contrast_guidance_adds_the_difference_to_the_contrast_prompt() -> None:
    d_full, d_image, d_uncond = outputs(seed=3)
    d_contrast = outputs(seed=4)[0]
    guided = dual_guidance(d_full, d_image, d_uncond, 3.0, 1.5, d_contrast, 2.0)
    plain = dual_guidance(d_full, d_image, d_uncond, 3.0, 1.5)
    torch.testing.assert_close(guided, plain + 2.0 * (d_full - d_contrast), rtol=0, atol=1e-13)
    # Composable Diffusion's form: the prompt at s_T + s_C and the contrast negated at s_C, around the image branch
    composed = d_uncond + 1.5 * (d_image - d_uncond) + 5.0 * (d_full - d_image) - 2.0 * (d_contrast - d_image)
    torch.testing.assert_close(guided, composed, rtol=0, atol=1e-13)
    # weights sum to one: a prediction shared by every branch passes through unchanged (eps or denoised alike)
    same = torch.full_like(d_full, 0.25)
    torch.testing.assert_close(dual_guidance(same, same, same, 3.0, 1.5, same, 2.0), same)


def test_contrast_branch_batched_and_switched_off_below_min_sigma() -> None:
    inner = FakeDenoiser()
    cond = make_cond(2, seed=5)
    uncond = null_conditioning(cond, torch.randn(1, 7, 8))
    contrast_text = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(6))
    z, sigma = torch.randn(2, 4, 3, 5), torch.tensor([0.3, 5.0])
    scale = torch.tensor([2.0, 1.0]).view(-1, 1, 1, 1)
    guided = DualCFGDenoiser(inner)(z, sigma, cond=cond, uncond=uncond, text_cfg_scale=3.0, image_cfg_scale=1.5,
                                    contrast_text=contrast_text, contrast_cfg_scale=scale, contrast_min_sigma=0.4)
    assert inner.batch_sizes == [8]  # four branches in one call
    plain = DualCFGDenoiser(inner)(z, sigma, cond=cond, uncond=uncond, text_cfg_scale=3.0, image_cfg_scale=1.5)
    contrast = {"c_crossattn": [contrast_text], "c_concat": cond["c_concat"]}
    d_full, d_contrast = inner(z, sigma, cond=cond), inner(z, sigma, cond=contrast)
    torch.testing.assert_close(guided[0], plain[0])  # sigma 0.3 < 0.4: no contrast term
    torch.testing.assert_close(guided[1], plain[1] + 1.0 * (d_full[1] - d_contrast[1]))

    inner.batch_sizes.clear()  # every sample below the threshold: the fourth branch is not run at all
    low = DualCFGDenoiser(inner)(z, sigma * 0.1, cond=cond, uncond=uncond, text_cfg_scale=3.0, image_cfg_scale=1.5,
                                 contrast_text=contrast_text, contrast_cfg_scale=scale, contrast_min_sigma=0.6)
    assert inner.batch_sizes == [6]
    torch.testing.assert_close(low, DualCFGDenoiser(inner)(z, sigma * 0.1, cond=cond, uncond=uncond,
                                                           text_cfg_scale=3.0, image_cfg_scale=1.5))
