"""Our InstructPix2Pix model as a diffusers ``StableDiffusionInstructPix2PixPipeline`` (``save_pretrained`` folder).

Nothing is fetched from a model hub: every component config is derived from our YAML config and the model built from
it. The UNet's and the autoencoder's come from diffusers' own single-file helpers (``create_unet_diffusers_config_
from_ldm`` / ``create_vae_diffusers_config_from_ldm``, given our config as the "original config"), the text
encoder's is the ``CLIPTextConfig`` our encoder was built with, the scheduler's is our noise schedule. Weights are
renamed by ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` (the functions diffusers'
``from_single_file`` uses); the text encoder's already have their transformers names. `convert_weights` checks that
every weight of ours lands on a diffusers parameter of the same shape and that every diffusers parameter is filled.

The scheduler is InstructPix2Pix's (its diffusers release: ``EulerAncestralDiscreteScheduler``, SD v1 betas), which
is our default ``euler_ancestral`` sampler; an x0-predicting model gets ``EulerDiscreteScheduler`` (diffusers'
ancestral Euler does not implement ``prediction_type="sample"``), which is our ``euler``.
"""

from __future__ import annotations

import logging
import warnings
from types import ModuleType
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, compare_keys
from ldm.errors import UsageError
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'instruct2dream[convert]'"
# Where each diffusers component's weights sit in our (the original CompVis) layout.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
TEXT_MODEL_PREFIX = PREFIXES["text_encoder"] + "text_model."
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample"}
SCHEDULERS = {"eps": "EulerAncestralDiscreteScheduler", "x0": "EulerDiscreteScheduler"}
# The classes whose diffusers counterparts the pipeline has (UNet2DConditionModel, AutoencoderKL, CLIPTextModel).
TARGETS = {
    "unet_config": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "first_stage_config": "ldm.models.autoencoder.AutoencoderKL",
    "cond_stage_config": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
}


def import_diffusers() -> ModuleType:
    """Import diffusers (needed by the converter only) quietly, or say how to install it."""
    from transformers.utils import logging as transformers_logging

    # Importing the pipeline classes makes transformers warn about image processors without torchvision (unused
    # here) and bitsandbytes, when installed, about an optional CPU kernel package.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        import diffusers
        from diffusers import StableDiffusionInstructPix2PixPipeline  # noqa: F401 - the import that warns
    except ImportError as err:
        raise UsageError(f"converting to diffusers needs the diffusers package: {INSTALL_HINT}") from err
    finally:
        transformers_logging.set_verbosity(verbosity)
    return diffusers


def _plain(config: Any) -> dict[str, Any]:
    """An OmegaConf (or plain) config as a resolved plain dict."""
    return OmegaConf.to_container(OmegaConf.create(config), resolve=True)


def check_convertible(config: Any) -> None:
    """Refuse (`ConfigError`) a config whose model diffusers' InstructPix2Pix pipeline cannot express (no weights)."""
    params = _plain(config).get("model", {}).get("params", {})
    unet = params.get("unet_config", {}).get("params", {})
    text = params.get("cond_stage_config", {}).get("params") or {}
    problems = [f"{key} must be {target}, found {params.get(key, {}).get('target')}"
                for key, target in TARGETS.items() if params.get(key, {}).get("target") != target]
    if params.get("conditioning_key") != "hybrid" or unet.get("in_channels") != 2 * unet.get("out_channels", 0):
        problems.append("it is not an InstructPix2Pix model (conditioning_key: hybrid, UNet in_channels twice its "
                        f"out_channels), found conditioning_key {params.get('conditioning_key')!r}, in_channels "
                        f"{unet.get('in_channels')}, out_channels {unet.get('out_channels')}")
    if unet.get("num_heads", -1) < 1 or unet.get("num_head_channels", -1) != -1:
        problems.append("the UNet must set num_heads (the same head count at every level), not num_head_channels")
    if text.get("layer", "last") != "last":
        problems.append(f"the text encoder's layer is {text.get('layer')!r}: diffusers uses the last layer's output")
    if problems:
        raise ConfigError("cannot convert to diffusers: " + "; ".join(problems))


def model_configs(model: Any, config: Any) -> dict[str, Any]:
    """The UNet, autoencoder and text encoder configs of the diffusers pipeline, for ``model`` built from ``config``."""
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    check_convertible(config)
    original = _plain(config)
    params = original["model"]["params"]
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    # diffusers sizes in pixels; ours (model.params.image_size) is the latent size the model was trained at.
    pixels = int(model.image_size) * 2 ** (len(ddconfig["ch_mult"]) - 1)
    with warnings.catch_warnings():  # passing image_size (instead of guessing it from the weights) is "deprecated"
        warnings.filterwarnings("ignore", message=".*image_size.*", category=FutureWarning)
        unet = create_unet_diffusers_config_from_ldm(original, {}, image_size=pixels)
        vae = create_vae_diffusers_config_from_ldm(original, {}, image_size=pixels)
    vae["scaling_factor"] = float(model.scale_factor)  # ours, also when the config leaves it at its default
    return {"unet": unet, "vae": vae, "text_encoder": model.cond_stage_model.transformer.text_model.config}


def scheduler_config(model: Any) -> tuple[str, dict[str, Any]]:
    """(class name, config) of the diffusers scheduler for ``model``'s noise schedule; an inexpressible one is refused.

    CompVis' "linear" schedule is diffusers' "scaled_linear" (linspace in sqrt(beta), squared). The betas diffusers
    computes from the config are compared with the model's, so any other schedule is a `ConfigError`.
    """
    config = {
        "num_train_timesteps": int(model.num_timesteps),
        "beta_start": float(model.linear_start),
        "beta_end": float(model.linear_end),
        "beta_schedule": "scaled_linear",
        "prediction_type": PREDICTION_TYPES[model.parameterization],
        "timestep_spacing": "linspace",
        "steps_offset": 1,
    }
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    if not torch.allclose(betas, model.betas.double(), rtol=1e-5, atol=0):
        raise ConfigError("cannot convert to diffusers: the noise schedule is not SD's scaled-linear one "
                          "(beta_schedule: linear, no given_betas)")
    return SCHEDULERS[model.parameterization], config


def empty_component(name: str, config: Any) -> torch.nn.Module:
    """The diffusers/transformers module of component ``name`` built on the meta device (shapes only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.device("meta"):
        if name == "text_encoder":
            return CLIPTextModel(config)
        return (UNet2DConditionModel if name == "unet" else AutoencoderKL)(**config)


def convert_weights(
    state: Mapping[str, torch.Tensor], configs: Mapping[str, Any]
) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict (original layout, no EMA copy) → ``{component: diffusers state dict}``, checked strictly.

    Each diffusers state dict must hold exactly its module's keys with their shapes, and as many elements as our
    weights under the component's prefix (nothing dropped); a key of ours outside the three components other than
    the noise schedule's buffers is refused. Works on meta tensors (key coverage without weights).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    leftover = [k for k in state if not k.startswith(tuple(PREFIXES.values())) and k not in SCHEDULE_BUFFERS]
    if leftover:
        raise CheckpointError(f"cannot convert to diffusers: {len(leftover)} weight(s) outside the UNet, autoencoder "
                              f"and text encoder, e.g. {leftover[0]}")
    converted = {
        "unet": convert_ldm_unet_checkpoint(dict(state), configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(dict(state), configs["vae"]),
        "text_encoder": {k[len(TEXT_MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_MODEL_PREFIX)},
    }
    for name, weights in converted.items():
        module = empty_component(name, configs[name])
        if hasattr(module, "text_model"):  # transformers < 5.6 nests CLIPTextModel's weights under text_model.
            weights = converted[name] = {f"text_model.{k}": v for k, v in weights.items()}
        report = compare_keys(weights, {k: v.shape for k, v in module.state_dict().items()})
        if not report.ok:
            raise CheckpointError(report.describe(f"the {name} converted to diffusers' layout"))
        ours = sum(v.numel() for k, v in state.items() if k.startswith(PREFIXES[name]))
        theirs = sum(v.numel() for v in weights.values())
        if ours != theirs:
            raise CheckpointError(f"cannot convert to diffusers: {ours - theirs} of the {ours} {name} weight elements "
                                  "have no diffusers counterpart")
    return converted


def build_pipeline(model: Any, config: Any, dtype: torch.dtype = torch.float32) -> Any:
    """diffusers' ``StableDiffusionInstructPix2PixPipeline`` holding ``model``'s weights (as ``dtype``), on the CPU.

    ``model`` is our LatentDiffusion built from ``config`` without an EMA copy (`ldm.editing.load_model`); the
    pipeline's tokenizer is the one ``model``'s text encoder uses.
    """
    diffusers = import_diffusers()
    from transformers import CLIPTextModel

    configs = model_configs(model, config)
    encoder = model.cond_stage_model
    if encoder.tokenizer.model_max_length != encoder.max_length:
        raise ConfigError(f"cannot convert to diffusers: the text encoder's max_length {encoder.max_length} differs "
                          f"from its tokenizer's model_max_length {encoder.tokenizer.model_max_length}, to which "
                          "diffusers pads prompts")
    scheduler_class, scheduler = scheduler_config(model)
    weights = convert_weights(model.state_dict(), configs)
    components: dict[str, torch.nn.Module] = {}
    for name in ("unet", "vae"):
        module = empty_component(name, configs[name])
        module.load_state_dict({k: v.detach().to("cpu", dtype) for k, v in weights[name].items()}, strict=True,
                               assign=True)
        components[name] = module.eval()
    text_encoder = CLIPTextModel(configs["text_encoder"])  # built for real: it has a non-persistent buffer
    text_encoder.load_state_dict(weights["text_encoder"], strict=True)
    components["text_encoder"] = text_encoder.to(dtype).eval()
    for name, module in components.items():
        meta = [k for k, v in [*module.named_parameters(), *module.named_buffers()] if v.is_meta]
        if meta:
            raise RuntimeError(f"{name}: {len(meta)} tensor(s) left without data after loading, e.g. {meta[0]}")
    logger.info("diffusers components: UNet %s, autoencoder (scaling factor %g), %s",
                configs["unet"]["down_block_types"], configs["vae"]["scaling_factor"], scheduler_class)
    return diffusers.StableDiffusionInstructPix2PixPipeline(
        **components, tokenizer=encoder.tokenizer, scheduler=getattr(diffusers, scheduler_class).from_config(scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
