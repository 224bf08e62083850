"""Whole-edit parity: our model + sampler + dual guidance vs diffusers' InstructPix2Pix pipeline, same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.transforms import image_to_tensor
from ldm.editing import edit_latents
from tests.oracle import diffusers_ip2p_pipeline
from tests.tiny import build_tiny_model, tiny_config

STEPS = 10  # k-diffusion's and diffusers' Euler sigmas coincide when linspace(999, 0, n) lands on integers
PROMPT = "replace the wolf with a sks dog"


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.random((8, 8, 3)) * 255
    return Image.fromarray(smooth.astype(np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("text_scale,image_scale", [(7.5, 1.5), (3.0, 2.2)])
def test_whole_edit_matches_diffusers_pipeline(tmp_path, text_scale, image_scale):
    config = tiny_config(use_ema=False)
    model = build_tiny_model(seed=3, use_ema=False)
    pipe = diffusers_ip2p_pipeline(model, config, tmp_path)
    image = _photo()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))

    with torch.no_grad():
        reference = pipe(
            prompt=PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=text_scale,
            image_guidance_scale=image_scale, latents=noise.clone(), output_type="latent",
        ).images
    ours = edit_latents(
        model, image_to_tensor(image)[None], [PROMPT], [text_scale], [image_scale], [0],
        steps=STEPS, sampler="euler", initial_noise=noise,
    )
    assert ours.shape == reference.shape == (1, 4, 8, 8)
    rel = (ours - reference).abs().max() / reference.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
    # The edit is not trivially the noise or the input: guidance actually changed the result.
    plain = edit_latents(model, image_to_tensor(image)[None], [PROMPT], [1.0], [1.0], [0], steps=STEPS,
                         sampler="euler", initial_noise=noise)
    assert (plain - ours).abs().max() > 1e-3


def test_batched_edits_equal_single_edits():
    """Per-sample seeds and scales: an edit does not depend on what else is in its batch (ancestral sampler)."""
    model = build_tiny_model(seed=4, use_ema=False)
    images = torch.stack([image_to_tensor(_photo(1)), image_to_tensor(_photo(2))])
    args = dict(steps=4, sampler="euler_ancestral")
    batched = edit_latents(model, images, ["make it red", "make it blue"], [7.5, 5.0], [1.5, 1.2], [10, 20], **args)
    first = edit_latents(model, images[:1], ["make it red"], [7.5], [1.5], [10], **args)
    second = edit_latents(model, images[1:], ["make it blue"], [5.0], [1.2], [20], **args)
    single = torch.cat([first, second])
    # Batched kernels round differently; through 4 guided steps that stays at float noise level.
    assert (batched - single).abs().max() <= 1e-4 * single.abs().max() * 10
    again = edit_latents(model, images[:1], ["make it red"], [7.5], [1.5], [10], **args)
    assert torch.equal(first, again)
    other_seed = edit_latents(model, images[:1], ["make it red"], [7.5], [1.5], [11], **args)
    assert not torch.allclose(first, other_seed)


# SD v1's scheduler config (scheduler/scheduler_config.json of the SD v1.x and InstructPix2Pix diffusers repos), from
# which diffusers builds its DDIMScheduler: "leading" spacing (its default) with steps_offset=1, no x0 clipping.
SD_V1_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}


@pytest.mark.parametrize("steps,text_scale,image_scale", [(10, 7.5, 1.5), (7, 3.0, 2.2)])
def test_ddim_edit_matches_diffusers_ddim_pipeline(tmp_path, steps, text_scale, image_scale):
    from diffusers import DDIMScheduler

    config = tiny_config(use_ema=False)
    model = build_tiny_model(seed=5, use_ema=False)
    pipe = diffusers_ip2p_pipeline(model, config, tmp_path)
    pipe.scheduler = DDIMScheduler.from_config(SD_V1_SCHEDULER_CONFIG)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    image = _photo(3)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        reference = pipe(
            prompt=PROMPT, image=image, num_inference_steps=steps, guidance_scale=text_scale,
            image_guidance_scale=image_scale, latents=noise.clone(), output_type="latent",
        ).images

    seen = []
    apply_model = model.apply_model
    model.apply_model = lambda x, t, cond: seen.append(t.clone()) or apply_model(x, t, cond)
    ours = edit_latents(
        model, image_to_tensor(image)[None], [PROMPT], [text_scale], [image_scale], [0],
        steps=steps, sampler="ddim", initial_noise=noise,
    )
    # One batched (3-branch) call per step, at diffusers' integer timesteps.
    assert [t.tolist() for t in seen] == [[t] * 3 for t in pipe.scheduler.timesteps.tolist()]
    assert seen[0].dtype == torch.long and len(seen) == steps
    rel = (ours - reference).abs().max() / reference.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"


def test_ddim_is_not_euler():
    """``--sampler ddim`` is the DDIM schedule, not Euler on the Euler sigmas; both are deterministic."""
    model = build_tiny_model(seed=6, use_ema=False)
    image = image_to_tensor(_photo(4))[None]
    run = lambda sampler, seed: edit_latents(  # noqa: E731
        model, image, [PROMPT], [7.5], [1.5], [seed], steps=STEPS, sampler=sampler
    )
    ddim, euler = run("ddim", 0), run("euler", 0)
    assert (ddim - euler).abs().max() > 1e-2 * euler.abs().max()
    assert torch.equal(ddim, run("ddim", 0))
    assert not torch.allclose(ddim, run("ddim", 1))  # the seed draws the initial noise


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddim"])
def test_contrast_guidance_reaches_the_model_and_vanishes_where_it_should(sampler):
    """Contrast guidance (``contrast_prompts``): against the edit's own prompt, at scale 0, or only below the
    smallest sigma it leaves the edit as it was; against another prompt it changes it."""
    model = build_tiny_model(seed=5, use_ema=False)
    image = image_to_tensor(_photo(3))[None]
    args = dict(steps=4, sampler=sampler)
    plain = edit_latents(model, image, [PROMPT], [3.0], [1.5], [7], **args)

    def contrasted(contrast: str, scale: float, min_sigma: float = 0.0) -> torch.Tensor:
        return edit_latents(model, image, [PROMPT], [3.0], [1.5], [7], contrast_prompts=[contrast],
                            contrast_scales=[scale], contrast_min_sigma=min_sigma, **args)

    assert torch.equal(contrasted("replace the wolf with a dog", 0.0), plain)  # the fourth branch is not run
    assert torch.equal(contrasted("replace the wolf with a dog", 2.0, min_sigma=1e3), plain)
    same = contrasted(PROMPT, 2.0)  # d_full - d_contrast = 0 up to batched rounding
    assert (same - plain).abs().max() <= 1e-5 * plain.abs().max()
    other = contrasted("replace the wolf with a dog", 2.0)
    assert (other - plain).abs().max() > 1e-3 * plain.abs().max()
    late = contrasted("replace the wolf with a dog", 2.0, min_sigma=1.0)  # the low-noise steps without it
    assert (late - other).abs().max() > 1e-5 * plain.abs().max() and (late - plain).abs().max() > 0


def test_contrast_guidance_arguments_are_checked():
    model = build_tiny_model(seed=5, use_ema=False)
    image = image_to_tensor(_photo(3))[None]
    with pytest.raises(ValueError, match="go together"):
        edit_latents(model, image, [PROMPT], [3.0], [1.5], [7], steps=2, contrast_prompts=["a dog"])
    with pytest.raises(ValueError, match="one entry per image"):
        edit_latents(model, image, [PROMPT], [3.0], [1.5], [7], steps=2, contrast_prompts=["a", "b"],
                     contrast_scales=[1.0, 1.0])


def test_ddim_contrast_starts_at_the_sigma_of_its_timestep():
    """DDIM gates contrast guidance by the k-diffusion sigma of its timestep, sqrt((1 - a_t) / a_t), as the euler
    samplers do: a threshold just above the first step's sigma never applies it, one just below applies it there."""
    model = build_tiny_model(seed=5, use_ema=False)
    image = image_to_tensor(_photo(3))[None]
    steps = 4
    first_t = (model.alphas_cumprod.shape[0] // steps) * (steps - 1) + 1  # the last of DDIM's uniform timesteps
    alpha_bar = model.alphas_cumprod[first_t].double()
    sigma = float(((1 - alpha_bar) / alpha_bar).sqrt())

    def run(min_sigma: float | None) -> torch.Tensor:
        contrast = {} if min_sigma is None else dict(contrast_prompts=["replace the wolf with a dog"],
                                                    contrast_scales=[2.0], contrast_min_sigma=min_sigma)
        return edit_latents(model, image, [PROMPT], [3.0], [1.5], [7], steps=steps, sampler="ddim", **contrast)

    plain = run(None)
    assert torch.equal(run(sigma * 1.001), plain)
    first_only = run(sigma * 0.999)
    assert (first_only - plain).abs().max() > 1e-4 * plain.abs().max()
    assert not torch.equal(first_only, run(0.0))  # the later steps are gated off
