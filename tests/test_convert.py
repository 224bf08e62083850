"""scripts/convert_to_diffusers.py: the folder diffusers' ``from_pretrained`` loads edits like our model, and our
single-file export loads with ``from_single_file``; both strictly (every weight used, every parameter filled).

The diffusers side is always built by diffusers itself, from the folder or the file, offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict_file, save_safetensors
from ldm.data.transforms import image_to_tensor
from ldm.editing import decode_to_images, edit_latents, load_model
from ldm.lora import adapter_tensors
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import ConfigError, instantiate_from_config
from scripts.convert_to_diffusers import main
from tests.reference import reference_config
from tests.test_edit_parity import PROMPT, STEPS, _photo
from tests.test_lora import LORA, lora_model
from tests.tiny import REPO, TINY_CONFIG, build_tiny_model, save_tiny_checkpoint, tiny_config

SEED = 7
COMPONENTS = ("unet", "vae", "text_encoder")


def _pipeline_class():
    from ldm.diffusers_export import import_diffusers

    return import_diffusers().StableDiffusionInstructPix2PixPipeline


def _convert(*args: str) -> int:
    return main([*args, "--quiet"])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A Lightning-style checkpoint with EMA weights that differ from the training ones."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", seed=3)


@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny-diffusers"
    assert _convert("--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--out", str(out)) == 0
    return out


def _noise() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))


def _edit_diffusers(pipe, text_scale: float = 7.5, image_scale: float = 1.5) -> torch.Tensor:
    """diffusers' edit: our initial noise, and our ancestral noise (drawn from seed + 1)."""
    with torch.no_grad():
        return pipe(
            prompt=PROMPT, image=_photo(2), num_inference_steps=STEPS, guidance_scale=text_scale,
            image_guidance_scale=image_scale, latents=_noise(), generator=torch.Generator().manual_seed(SEED + 1),
            output_type="latent",
        ).images


def _edit_ours(model, sampler: str, text_scale: float = 7.5, image_scale: float = 1.5) -> torch.Tensor:
    return edit_latents(model, image_to_tensor(_photo(2))[None], [PROMPT], [text_scale], [image_scale], [SEED],
                        steps=STEPS, sampler=sampler, initial_noise=_noise())


# Our edit against diffusers' on the same weights and noise, in fp32 after STEPS sampler steps at text guidance up
# to 7.5 (which multiplies every difference of the UNet outputs): the two libraries sum in different orders, and the
# order also depends on the CPU's kernels (an AVX2-only 2-core EPYC gave 1.1e-4 for the x0 model; earlier sessions'
# faster machine stayed under 1e-4). Other weights are off by more than 1e-3 (the EMA and LoRA checks below).
PARITY = 2e-4


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return float((ours - reference).abs().max() / reference.abs().max())


def test_from_pretrained_edits_like_our_model(converted, tiny_ckpt):
    """InstructPix2Pix's own sampler (Euler ancestral, the folder's scheduler) with the same noise, and the decoder."""
    pipe = _pipeline_class().from_pretrained(str(converted), local_files_only=True)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.unet.config.in_channels == 8 and pipe.vae.config.scaling_factor == 0.18215
    model = load_model(TINY_CONFIG, tiny_ckpt).model  # EMA weights, as the converter's default
    reference, ours = _edit_diffusers(pipe), _edit_ours(model, "euler_ancestral")
    assert _relative(ours, reference) <= PARITY
    with torch.no_grad():
        pixels = pipe.vae.decode(reference / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert (pixels - decode_to_images(model, reference)).abs().max() <= 1e-4
    # The tokenizer in the folder is the one our text encoder uses.
    assert pipe.tokenizer(PROMPT).input_ids == model.cond_stage_model.tokenizer(PROMPT).input_ids
    # The EMA weights were converted, not the training ones.
    training = load_model(TINY_CONFIG, tiny_ckpt, ema=False).model
    assert _relative(_edit_ours(training, "euler_ancestral"), ours) > 1e-3


def test_lora_merged_before_converting(tiny_ckpt, tmp_path):
    from diffusers import EulerDiscreteScheduler

    trained = lora_model(seed=3, lora=LORA)  # adapters on the UNet and the text encoder
    lora = save_safetensors(adapter_tensors(trained.state_dict(), alpha=8.0), tmp_path / "lora.safetensors")
    out = tmp_path / "with-lora"
    assert _convert("--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--out", str(out), "--no-ema",
                    "--lora", str(lora), "--lora-scale", "0.7") == 0
    pipe = _pipeline_class().from_pretrained(str(out), local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # our deterministic "euler"
    model = load_model(TINY_CONFIG, tiny_ckpt, ema=False, loras=[(lora, 0.7)]).model
    reference, ours = _edit_diffusers(pipe, 3.0, 2.2), _edit_ours(model, "euler", 3.0, 2.2)
    assert _relative(ours, reference) <= PARITY
    plain = load_model(TINY_CONFIG, tiny_ckpt, ema=False).model
    assert _relative(_edit_ours(plain, "euler", 3.0, 2.2), ours) > 1e-3  # the LoRA mattered


def test_x0_model_gets_a_sample_predicting_euler_scheduler(tmp_path):
    """diffusers' ancestral Euler has no x0 prediction: an x0 model's folder gets Euler, equal to our "euler"."""
    config = tmp_path / "x0.yaml"
    OmegaConf.save(tiny_config(parameterization="x0", scale_factor=1.0), config)
    ckpt = save_tiny_checkpoint(tmp_path / "x0.safetensors", seed=4, use_ema=False, parameterization="x0")
    out = tmp_path / "x0-diffusers"
    assert _convert("--config", str(config), "--ckpt", str(ckpt), "--out", str(out)) == 0
    pipe = _pipeline_class().from_pretrained(str(out), local_files_only=True)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.prediction_type == "sample" and pipe.vae.config.scaling_factor == 1.0
    reference, ours = _edit_diffusers(pipe), _edit_ours(load_model(config, ckpt).model, "euler")
    assert _relative(ours, reference) <= PARITY


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "convert_to_diffusers.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_end_to_end(tiny_ckpt, tmp_path):
    out = tmp_path / "half"
    done = _cli("--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--out", str(out), "--half")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and "writing" in done.stderr  # progress on stderr, the folder on stdout
    assert (out / "model_index.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]  # no temporary folder left behind
    weights = [*out.glob("*/*.safetensors")]
    assert len(weights) == 3 and {v.dtype for path in weights for v in load_state_dict_file(path).values()} == {
        torch.float16}
    pipe = _pipeline_class().from_pretrained(str(out), local_files_only=True, dtype=torch.float16)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}

    before = _snapshot(out)
    refused = _cli("--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--out", str(out))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert _snapshot(out) == before

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    failed = _cli("--config", str(TINY_CONFIG), "--ckpt", str(bad), "--out", str(out), "--overwrite")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and f"error: {bad}: " in failed.stderr
    assert _snapshot(out) == before  # a failed conversion leaves the old folder as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt", "half"]

    quiet = _cli("--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--out", str(out), "--overwrite", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr  # no log lines, no library progress bars
    assert _snapshot(out) != before and (out / "unet" / "config.json").read_bytes() == before["unet/config.json"]


def test_cli_user_errors(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--out", str(out)]
    assert _convert(*common, "--tokenizer", str(tmp_path / "no-tokenizer")) == 2
    assert f"tokenizer '{tmp_path / 'no-tokenizer'}'" in capsys.readouterr().err
    assert _convert(*common[:2], "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(out)) == 2
    assert "missing.ckpt: no such file" in capsys.readouterr().err
    assert _convert(*common, "--lora", str(tmp_path / "missing.safetensors")) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    sd_config = tmp_path / "sd.yaml"
    OmegaConf.save(reference_config("sd-v1-inference.yaml"), sd_config)
    assert _convert("--config", str(sd_config), "--ckpt", str(tiny_ckpt), "--out", str(out)) == 2
    assert "not an InstructPix2Pix model" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--lora-scale" in capsys.readouterr().out


def test_from_single_file_loads_our_export_strictly(converted, tiny_ckpt, tmp_path):
    """Our single-file export (original layout, as A1111/ComfyUI load it) through diffusers' ``from_single_file``.

    The config folder holds the converted folder's configs and tokenizer but no weights, so every weight comes from
    the file; each must equal the converted folder's, and the file's weights must all be used.
    """
    from scripts.export import main as export_main

    export = tmp_path / "tiny.safetensors"
    assert export_main([str(tiny_ckpt), str(export)]) == 0
    configs = tmp_path / "configs"
    shutil.copytree(converted, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    single = _pipeline_class().from_single_file(str(export), config=str(configs), local_files_only=True)
    folder = _pipeline_class().from_pretrained(str(converted), local_files_only=True)
    used = 0
    for name in COMPONENTS:
        loaded, expected = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert list(loaded) == list(expected), name
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), f"{name}.{key}"
        used += sum(v.numel() for v in loaded.values())
    weights = load_state_dict_file(export)
    assert used == sum(v.numel() for k, v in weights.items() if k not in SCHEDULE_BUFFERS)
    assert single.tokenizer(PROMPT).input_ids == folder.tokenizer(PROMPT).input_ids
    assert single.scheduler.config == folder.scheduler.config


def test_full_size_model_maps_key_for_key():
    """The full-size InstructPix2Pix model (meta device, no weights): every weight lands on a diffusers parameter of
    the same shape, every diffusers parameter is filled, and the configs are those of the diffusers release."""
    from ldm.diffusers_export import empty_component, convert_weights, model_configs

    config = reference_config("ip2p-generate.yaml")
    config.model.params.use_ema = False
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    configs = model_configs(model, config)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    assert unet["in_channels"] == 8 and unet["out_channels"] == 4 and unet["cross_attention_dim"] == 768
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["attention_head_dim"] == 8
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    assert (text.hidden_size, text.num_hidden_layers, text.hidden_act) == (768, 12, "quick_gelu")
    state = model.state_dict()
    converted = convert_weights(state, configs)
    counts = {}
    for name in COMPONENTS:
        expected = empty_component(name, configs[name]).state_dict()
        assert set(converted[name]) == set(expected)
        assert all(converted[name][k].shape == expected[k].shape for k in expected)
        counts[name] = sum(v.numel() for v in converted[name].values())
    assert counts == {"unet": 859_532_484, "vae": 83_653_863, "text_encoder": 123_060_480}  # every weight of ours


def test_models_diffusers_cannot_express_are_refused():
    from ldm.diffusers_export import check_convertible, scheduler_config

    with pytest.raises(ConfigError, match="not an InstructPix2Pix model"):
        check_convertible(reference_config("sd-v1-inference.yaml"))
    penultimate = tiny_config()
    penultimate.model.params.cond_stage_config.params.layer = "penultimate"
    with pytest.raises(ConfigError, match="last layer"):
        check_convertible(penultimate)
    with pytest.raises(ConfigError, match="first_stage_config must be ldm.models.autoencoder.AutoencoderKL"):
        check_convertible(OmegaConf.load(REPO / "configs" / "shapesworld" / "base.yaml"))  # a pixel-space toy
    check_convertible(reference_config("ip2p-generate.yaml"))
    check_convertible(OmegaConf.load(REPO / "configs" / "instruct-pix2pix" / "generate.yaml"))
    with pytest.raises(ConfigError, match="noise schedule"):
        scheduler_config(build_tiny_model(use_ema=False, beta_schedule="cosine"))
    assert scheduler_config(build_tiny_model(use_ema=False))[1]["beta_schedule"] == "scaled_linear"
