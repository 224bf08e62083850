"""The reference oracle: diffusers' InstructPix2Pix pipeline built offline from our original-layout weights."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def diffusers_ip2p_pipeline(model, config, workdir, image_size: int = 64):
    """diffusers' StableDiffusionInstructPix2PixPipeline built offline from our original-layout state dict."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_diffusers_clip_model_from_ldm,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextModel

    from ldm.modules.encoders.modules import clip_text_config

    checkpoint = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = OmegaConf.to_container(config, resolve=True)
    unet_config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=image_size)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(dict(checkpoint), unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(original, checkpoint, image_size=image_size)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(checkpoint), vae_config), strict=True)
    # Full-size configs name no text_config (FrozenCLIPEmbedder's default: ViT-L/14); tiny ones override it.
    text_overrides = original["model"]["params"]["cond_stage_config"].get("params", {}).get("text_config", {})
    clip_text_config(text_overrides).save_pretrained(Path(workdir) / "text_encoder")
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, dict(checkpoint), subfolder="text_encoder", config=str(workdir), local_files_only=True
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="linspace",
    )
    return StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=model.cond_stage_model.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
