"""InstructPix2Pix editing: load a model for inference and edit batches of images with dual guidance.

The sampling loop follows InstructPix2Pix's ``edit_cli.py`` (Brooks et al. 2023): the input image's latent is the
posterior mode (unscaled), the null text is ``encoder("")``, the null image a zero latent. ``euler`` and
``euler_ancestral`` walk the model's own discrete sigmas (k-diffusion ``CompVisDenoiser``); ``ddim`` is the CompVis
`DDIMSampler` (eta 0) on its uniform timesteps ``[0, c, ..., (S-1) c] + 1`` with ``c = T // S``, which is
diffusers' ``DDIMScheduler`` with ``timestep_spacing="leading"`` and ``steps_offset=1`` (SD v1's scheduler config).
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Hashable, Literal, Sequence, TypeVar

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import ema_key, load_model_weights, load_state_dict_file
from ldm.errors import MissingFileError, UsageError
from ldm.lora import apply_lora_files, is_peft_state, recorded_base_ema
from ldm.models.diffusion.conditioning import hybrid_conditioning
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import Conditioning, DualCFGDenoiser, null_conditioning
from ldm.models.diffusion.sampling import CompVisDenoiser, get_sampler
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
T = TypeVar("T")
# Contrast guidance stops below this sigma: in ShapesWorld (12 steps, sigmas 14.6 … 0.53, 0.32, 0.03) the last two
# steps only exaggerated a learned pattern's contrast (docs/shapesworld.md, "Thirteenth session").
CONTRAST_MIN_SIGMA = 0.4


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA if available, else Apple MPS, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available here (torch {torch.__version__})")
    return device


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto`` → fp16 on CUDA, fp32 elsewhere; any other name is returned as it is."""
    if name != "auto":
        return name  # type: ignore[return-value]
    return "fp16" if device.type == "cuda" else "fp32"


def autocast_for(device: torch.device, precision: Precision) -> ContextManager[Any]:
    """Mixed-precision context for ``precision`` (weights stay fp32, as InstructPix2Pix's own ``autocast``)."""
    if precision == "fp32":
        return nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise UsageError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def has_ema_weights(state: dict[str, torch.Tensor]) -> bool:
    """True when every UNet parameter of ``state`` has its LitEma twin."""
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    return bool(unet) and all(ema_key(k) in state for k in unet)


def require_model_files(config_path: str | os.PathLike[str], ckpt_path: str | os.PathLike[str]) -> None:
    """`MissingFileError` for a missing model config or checkpoint (the latter says how to download it)."""
    if not Path(config_path).is_file():
        raise MissingFileError(f"config not found: {config_path}")
    if not Path(ckpt_path).is_file():
        raise MissingFileError(
            f"checkpoint not found: {ckpt_path} (download the InstructPix2Pix checkpoint with "
            "`python scripts/download_checkpoint.py`, or pass --ckpt)"
        )


@dataclass
class LoadedModel:
    """A model ready for inference and what was loaded into it."""

    model: Any
    ckpt_path: Path
    used_ema: bool


def inference_config(config_path: str | os.PathLike[str], tokenizer: str | None = None) -> Any:
    """The model config of ``config_path`` made ready for editing: no ``ckpt_path`` (`load_model` loads once,
    strictly), no separate EMA copy, no training-only LoRA/precision settings, and ``tokenizer`` (a folder or hub
    id) for the text encoder when given."""
    config = OmegaConf.load(config_path)
    if "model" not in config:
        raise UsageError(f"{config_path}: no 'model' section")
    if "params" not in config.model:
        config.model.params = {}
    params = config.model.params  # the node itself: OmegaConf's setdefault would hand back a detached copy
    params.pop("ckpt_path", None)
    params["use_ema"] = False  # EMA weights, when wanted, are copied into model.* instead of kept twice
    # A LoRA run's config trains adapters on top of the base: for inference its file is merged instead (``loras``),
    # and the precision of every part is the caller's (``precision``), not the training run's memory settings.
    params.pop("lora_config", None)
    params.pop("frozen_dtype", None)
    if tokenizer is not None:
        OmegaConf.update(params, "cond_stage_config.params.tokenizer", tokenizer)
    return config


def load_model(
    config_path: str | os.PathLike[str],
    ckpt_path: str | os.PathLike[str],
    *,
    ema: bool | None = None,
    device: torch.device | str = "cpu",
    tokenizer: str | None = None,
    loras: Sequence[tuple[str | os.PathLike[str], float]] = (),
) -> LoadedModel:
    """Build the model of ``config_path`` and load ``ckpt_path`` strictly for inference.

    Args:
        ema: True → the checkpoint's EMA UNet weights (error if it has none); False → its training weights;
            None → EMA when the file has a complete EMA copy (the released InstructPix2Pix checkpoint), else the
            training weights (our fine-tuned exports store the chosen weights under ``model.*``).
        tokenizer: a local tokenizer folder or hub id for the text encoder (offline machines).
        loras: ``(file, scale)`` LoRA files (kohya/A1111 layout) merged into the loaded weights, in order
            (`ldm.lora.merge_lora_`: ``W += scale · alpha/r · up @ down``). With ``ema`` None, the UNet weights are
            those the files record they were trained on (``base_weights`` metadata), when they agree.
    """
    config_path, ckpt_path = Path(config_path), Path(ckpt_path)
    require_model_files(config_path, ckpt_path)
    config = inference_config(config_path, tokenizer)
    state = load_state_dict_file(ckpt_path)
    if is_peft_state(state):
        raise UsageError(f"{ckpt_path} is a LoRA run's checkpoint: edit with the base checkpoint and --lora "
                         "<run>/export/lora.safetensors, or merge it first with scripts/export.py --merge")
    available = has_ema_weights(state)
    if ema is None and loras:  # the UNet weights the LoRA files were trained on, when they say
        ema = recorded_base_ema([path for path, _ in loras])
        if ema is not None:
            logger.info("using the %s UNet weights the LoRA file(s) were trained on", "EMA" if ema else "non-EMA")
    use_ema = available if ema is None else ema
    model = instantiate_from_config(config.model)
    load_model_weights(
        model,
        state,
        source=str(ckpt_path),
        migrations=["use_ema_weights"] if use_ema else [],
        ignorable=[r"^model_ema\."],
    )
    del state
    logger.info("loaded %s (%s UNet weights)", ckpt_path, "EMA" if use_ema else "non-EMA")
    if loras:
        apply_lora_files(model.state_dict(), [path for path, _ in loras], [scale for _, scale in loras])
    model = model.to(device).eval()
    return LoadedModel(model=model, ckpt_path=ckpt_path, used_ema=use_ema)


def compile_unet(model: Any, mode: str | None = None) -> Any:
    """Compile the UNet with ``torch.compile`` in place (the first call compiles: tens of seconds to minutes).

    Only the UNet is compiled: it runs ``3 x steps`` times per edit, the VAE and text encoder once. Off by default:
    it pays off over long jobs (many edits, pair generation), see bench/RESULTS.md.
    """
    model.model.diffusion_model.compile(mode=mode)  # in place: state_dict keys stay as they are
    logger.info("UNet compiled with torch.compile (mode %s); the first call compiles", mode or "default")
    return model


def same_size_batches(items: Sequence[T], size_of: Callable[[T], Hashable], batch_size: int) -> list[list[T]]:
    """Group ``items`` by ``size_of`` (first-seen order) and cut each group into batches of ``batch_size``."""
    by_size: dict[Hashable, list[T]] = {}
    for item in items:
        by_size.setdefault(size_of(item), []).append(item)
    return [group[i : i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


class PerSampleNoise:
    """Standard-normal draws (B, *shape), sample ``i`` from its own CPU generator seeded ``seeds[i] + offset``:
    reproducible whatever the batching and device. Called as a sampler's ancestral ``noise_sampler`` too."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], device: torch.device, offset: int = 0) -> None:
        self.shape = tuple(shape)
        self.generators = [torch.Generator().manual_seed(int(s) + offset) for s in seeds]
        self.device = device

    def draw(self) -> torch.Tensor:
        """The next draw of every sample's generator, stacked on ``device``."""
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return self.draw()


@torch.no_grad()
def edit_latents(
    model: Any,
    images: torch.Tensor,
    prompts: Sequence[str],
    text_scales: Sequence[float],
    image_scales: Sequence[float],
    seeds: Sequence[int],
    steps: int = 100,
    sampler: str = "euler_ancestral",
    precision: Precision = "fp32",
    progress: bool = False,
    initial_noise: torch.Tensor | None = None,
    contrast_prompts: Sequence[str] | None = None,
    contrast_scales: Sequence[float] | None = None,
    contrast_min_sigma: float = CONTRAST_MIN_SIGMA,
) -> torch.Tensor:
    """Edit ``images`` (B, 3, H, W) in [-1, 1] following ``prompts``; returns the final scaled latents (B, 4, H/8, W/8).

    Each sample has its own text/image guidance scale and seed. ``sampler``: ``euler_ancestral`` (InstructPix2Pix's
    own), ``euler`` or ``ddim`` (the CompVis DDIM schedule, see the module docstring). ``initial_noise``
    (B, 4, H/8, W/8), if given, replaces the seeded initial draw (for parity tests).

    ``contrast_prompts`` and ``contrast_scales`` (one each per image; every sampler) add contrast guidance
    (`ldm.models.diffusion.guidance.dual_guidance`) at every step whose sigma is at least ``contrast_min_sigma``:
    "replace the circle with a sks star" against "replace the circle with a star" amplifies what the identifier
    adds to the class word. Scales of 0 everywhere leave the three-branch edit unchanged.
    """
    batch = images.shape[0]
    if not (len(prompts) == len(text_scales) == len(image_scales) == len(seeds) == batch):
        raise ValueError("prompts, text_scales, image_scales and seeds need one entry per image")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if (contrast_prompts is None) != (contrast_scales is None):
        raise ValueError("contrast_prompts and contrast_scales go together")
    contrast = contrast_prompts is not None and any(scale != 0 for scale in contrast_scales)
    if contrast_prompts is not None and not len(contrast_prompts) == len(contrast_scales) == batch:
        raise ValueError("contrast_prompts and contrast_scales need one entry per image")
    device = images.device
    with autocast_for(device, precision):
        cond_text = model.get_learned_conditioning(list(prompts))  # (B, 77, D)
        null_text = model.get_learned_conditioning([""])  # (1, 77, D)
        image_latent = model.encode_first_stage(images).mode()  # (B, 4, h, w), unscaled as in IP2P
        contrast_text = model.get_learned_conditioning(list(contrast_prompts)) if contrast else None  # (B, 77, D)
    cond = hybrid_conditioning(cond_text.float(), image_latent.float())
    uncond = null_conditioning(cond, null_text.float())
    latent_shape = image_latent.shape[1:]
    noise = PerSampleNoise(latent_shape, seeds, device).draw() if initial_noise is None else initial_noise.to(device)
    as_column = lambda values: torch.tensor(values, device=device, dtype=noise.dtype).view(-1, 1, 1, 1)  # noqa: E731
    text_scale, image_scale = as_column(text_scales), as_column(image_scales)  # (B, 1, 1, 1)
    contrast_args: dict[str, Any] = {}
    if contrast:
        contrast_args = {"contrast_text": contrast_text.float(), "contrast_cfg_scale": as_column(contrast_scales),
                         "contrast_min_sigma": contrast_min_sigma}
    if sampler == "ddim":
        with autocast_for(device, precision):
            z = _sample_ddim(model, noise, cond, uncond, text_scale, image_scale, steps, progress, **contrast_args)
        return z.float()
    denoiser = CompVisDenoiser(model)
    sigmas = denoiser.get_sigmas(steps).to(device)
    z = noise * sigmas[0]
    extra_args = {"cond": cond, "uncond": uncond, "text_cfg_scale": text_scale, "image_cfg_scale": image_scale,
                  **contrast_args}
    kwargs: dict[str, Any] = {"extra_args": extra_args, "disable": not progress}
    if sampler != "euler":
        kwargs["noise_sampler"] = PerSampleNoise(latent_shape, seeds, device, offset=1)  # not the initial draw
    with autocast_for(device, precision):
        z = get_sampler(sampler)(DualCFGDenoiser(denoiser), z, sigmas, **kwargs)
    return z.float()


def _sample_ddim(
    model: Any,
    noise: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    text_scale: torch.Tensor,
    image_scale: torch.Tensor,
    steps: int,
    progress: bool,
    contrast_text: torch.Tensor | None = None,
    contrast_cfg_scale: torch.Tensor | float = 0.0,
    contrast_min_sigma: float = 0.0,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from ``noise`` (B, 4, h, w) with InstructPix2Pix's dual guidance on the eps (and
    contrast guidance with ``contrast_text``)."""
    samples, _ = DDIMSampler(model).sample(
        S=steps,
        batch_size=noise.shape[0],
        shape=tuple(noise.shape[1:]),
        conditioning=cond,
        x_T=noise,
        eta=0.0,
        verbose=progress,
        unconditional_guidance_scale=text_scale,
        unconditional_conditioning=uncond,
        image_guidance_scale=image_scale,
        contrast_conditioning=contrast_text,
        contrast_guidance_scale=contrast_cfg_scale,
        contrast_min_sigma=contrast_min_sigma,
    )
    return samples


@torch.no_grad()
def decode_to_images(model: Any, latents: torch.Tensor, precision: Precision = "fp32") -> torch.Tensor:
    """Scaled latents (B, 4, h, w) → pixels (B, 3, 8h, 8w) clamped to [-1, 1]."""
    with autocast_for(latents.device, precision):
        x = model.decode_first_stage(latents)
    return x.float().clamp(-1.0, 1.0)
