"""LoRA (peft adapters on the CompVis-named modules): training freezes the base, files in the kohya/A1111 layout merge
into the weights exactly as peft computes them, and diffusers' pipeline reads the same file to the same edit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ldm.checkpoint import save_safetensors
from ldm.data.transforms import image_to_tensor
from ldm.editing import edit_latents
from ldm.lora import adapter_tensors, kohya_name, merge_lora_, read_lora, split_peft_state
from ldm.models.diffusion.losses import prior_preservation_loss
from tests.oracle import diffusers_ip2p_pipeline
from tests.test_edit_parity import PROMPT, STEPS, _photo
from tests.test_train import _batch
from tests.tiny import build_tiny_model, tiny_config

LORA = {"rank": 4, "alpha": 8, "text_encoder": True}


def lora_model(seed: int = 3, lora: dict | None = None, **params):
    """A tiny model with adapters whose B matrices are random (a fresh adapter is a no-op: B starts at zero)."""
    defaults = dict(use_ema=False, first_stage_key="image", cond_stage_key="caption")
    model = build_tiny_model(seed=seed, lora_config=LORA if lora is None else lora, **{**defaults, **params})
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def test_adapters_sit_on_the_attention_projections_and_alone_train():
    model = lora_model(seed=1, cond_stage_trainable=True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A.default." in n or ".lora_B.default." in n for n in trained)
    adapted = {n.split(".lora_")[0] for n in trained}
    unet = {n for n in adapted if n.startswith("model.diffusion_model.")}
    text = adapted - unet
    attention = {n.rsplit(".", 1)[0] for n, _ in build_tiny_model(seed=1).named_modules()
                 if n.endswith((".to_q", ".to_k", ".to_v"))}
    # Every UNet attention (self and cross) gets q, k, v and out; the text encoder its q, k, v, out projections.
    assert {n.rsplit(".", 1)[0] for n in unet if not n.endswith("to_out.0")} == attention
    assert len(unet) == 4 * len(attention) and sum(n.endswith(".to_out.0") for n in unet) == len(attention)
    assert sorted({n.rsplit(".", 1)[1] for n in text}) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert len(model.trainable_parameters()) == len(trained)
    assert not model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.requires_grad


def test_text_encoder_is_frozen_without_text_adapters():
    model = lora_model(seed=1, lora={"rank": 2}, cond_stage_trainable=True)
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    assert not model.cond_stage_trainable
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("model.diffusion_model.") for n in names)


def test_training_moves_only_the_adapters_and_prior_preservation_reaches_them():
    model = lora_model(seed=2, cond_stage_trainable=True, learning_rate=1e-2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = model.configure_optimizers()
    train_batch, reg_batch = _batch(0), _batch(1, caption="replace the wolf with a dog")

    def grads(reg_weight):
        model.zero_grad()
        loss_train, _ = model.shared_step(train_batch, torch.Generator().manual_seed(1))
        loss_reg, _ = model.shared_step(reg_batch, torch.Generator().manual_seed(2))
        prior_preservation_loss(loss_train, loss_reg, reg_weight).backward()
        return torch.cat([p.grad.flatten() for p in model.trainable_parameters()])

    without_reg = grads(0.0)
    with_reg = grads(1.0)
    assert (with_reg - without_reg).norm() > 1e-3 * without_reg.norm()  # the reg batch's loss reaches the adapters
    for _ in range(2):
        optimizer.step()
        grads(1.0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed == lora_keys  # every adapter moved; every base weight (UNet, VAE, text) is bit-identical


def test_kohya_names_are_the_original_module_paths():
    model = lora_model(seed=1)
    tensors = adapter_tensors(model.state_dict(), alpha=8.0)
    plain = build_tiny_model(seed=1).state_dict()
    names = sorted({k.split(".")[0] for k in tensors})
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj" in names
    lookup = {kohya_name(k[: -len(".weight")]): k for k in plain
              if k.endswith(".weight") and k.startswith(("model.diffusion_model.", "cond_stage_model.transformer."))}
    for name in names:
        weight = plain[lookup[name]]  # each names a weight of the original layout
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.shape == (4, weight.shape[1]) and up.shape == (weight.shape[0], 4)
        assert float(tensors[f"{name}.alpha"]) == 8.0


def test_merged_weights_compute_what_the_adapters_compute():
    model = lora_model(seed=4).eval()
    base, adapter = split_peft_state(model.state_dict(), alpha=8.0)
    plain = build_tiny_model(seed=4, use_ema=False, first_stage_key="image", cond_stage_key="caption").eval()
    assert set(base) == set(plain.state_dict())
    plain.load_state_dict(base, strict=True)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    with torch.no_grad():
        cond = {"c_concat": [torch.randn(2, 4, 8, 8)], "c_crossattn": [model.get_learned_conditioning(["a", "b"])]}
        unmerged = model.apply_model(x, t, cond)
        assert not torch.allclose(unmerged, plain.apply_model(x, t, cond), atol=1e-4)  # the adapters matter
        assert merge_lora_(plain.state_dict(), adapter, scale=1.0) == len({k.split(".")[0] for k in adapter})
        torch.testing.assert_close(plain.apply_model(x, t, cond), unmerged, rtol=1e-5, atol=1e-5)
        text = plain.get_learned_conditioning(["a sks dog"])
        torch.testing.assert_close(text, model.get_learned_conditioning(["a sks dog"]), rtol=1e-5, atol=1e-5)


def test_scale_and_bad_files(tmp_path):
    model = lora_model(seed=5, lora={"rank": 2})
    _, adapter = split_peft_state(model.state_dict(), alpha=2.0)
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    weights = build_tiny_model(seed=5).state_dict()
    start = weights[key].clone()
    merge_lora_(weights, adapter, scale=0.5)
    half = weights[key] - start
    merge_lora_(weights, adapter, scale=0.5)
    torch.testing.assert_close(weights[key] - start, 2 * half)
    name = "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    expected = adapter[f"{name}.lora_up.weight"] @ adapter[f"{name}.lora_down.weight"] * 0.5  # alpha / rank = 1
    torch.testing.assert_close(half, expected)
    from ldm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no weight in this model"):
        merge_lora_(weights, {"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 3),
                              "lora_unet_nowhere.lora_up.weight": torch.zeros(3, 2)})
    save_safetensors({"model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp_path / "full.safetensors")
    with pytest.raises(CheckpointError, match="not a kohya/A1111 LoRA file"):
        read_lora(tmp_path / "full.safetensors")


@pytest.mark.parametrize("text_encoder", [True, False])
def test_edit_with_lora_matches_diffusers_load_lora_weights(tmp_path, text_encoder):
    """Our edit with the file merged at load == diffusers' pipeline after ``load_lora_weights`` of the same file."""
    config = tiny_config(use_ema=False)
    base = build_tiny_model(seed=3, use_ema=False)
    trained = lora_model(seed=3, lora={**LORA, "text_encoder": text_encoder})
    path = save_safetensors(adapter_tensors(trained.state_dict(), alpha=8.0), tmp_path / "lora.safetensors")
    pipe = diffusers_ip2p_pipeline(base, config, tmp_path)
    image, noise = _photo(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))

    def reference():
        with torch.no_grad():
            return pipe(prompt=PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=7.5,
                        image_guidance_scale=1.5, latents=noise.clone(), output_type="latent").images

    without = reference()
    # diffusers' SD v1 loader maps CompVis block names (input_blocks_3_1) to its own (down_blocks.1.attentions.0)
    # only when given the UNet config, which its SDXL pipeline passes and its SD v1 pipeline does not.
    with pytest.raises(ValueError, match="not found in the base model"):
        pipe.load_lora_weights(str(path), adapter_name="plain")
    pipe.load_lora_weights(str(path), adapter_name="sks", unet_config=pipe.unet.config)
    with_lora = reference()
    tensors, _ = read_lora(path)
    merge_lora_(base.state_dict(), tensors, scale=1.0)
    ours = edit_latents(base, image_to_tensor(image)[None], [PROMPT], [7.5], [1.5], [0], steps=STEPS,
                        sampler="euler", initial_noise=noise)
    assert (with_lora - without).abs().max() > 1e-2 * without.abs().max()  # diffusers did apply the file
    rel = (ours - with_lora).abs().max() / with_lora.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"


def test_lora_file_metadata(tmp_path):
    from ldm.export import export_lora

    model = lora_model(seed=6)
    model.base_checkpoint = {"path": "/somewhere/base.ckpt", "sha256": "ab" * 32}
    path = export_lora(model, tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert metadata["rank"] == "4" and metadata["alpha"] == "8" and metadata["base_checkpoint_sha256"] == "ab" * 32
    assert metadata["base_checkpoint"] == "base.ckpt" and metadata["ss_network_dim"] == "4"
    assert '"to_out.0"' in metadata["targets"] and metadata["text_encoder"] == "true"
    assert keys == set(adapter_tensors(model.state_dict(), 8.0))


# ------------------------------------------------------------------------------------------- main.py end to end

import json  # noqa: E402
import shutil  # noqa: E402

from PIL import Image  # noqa: E402

from ldm.checkpoint import load_state_dict_file, read_checkpoint  # noqa: E402
from ldm.fileio import sha256_file  # noqa: E402
from tests.test_resume import main_py  # noqa: E402
from tests.test_train import NO_IMAGES, TINY_TRAIN, make_pairs  # noqa: E402

# Rank 64 makes the adapters of the 64-wide UNet attentions large enough (64 x 64) for 8-bit optimizer states.
LORA_FLAGS = ["--lora_rank", "64", "--lora_alpha", "32", "--lora_text_encoder", "--optimizer", "adamw8bit",
              "model.base_learning_rate=1e-2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    ckpt = save_tiny_checkpoint_for_lora(root / "base.ckpt")
    train, reg = make_pairs(root / "training", 3, seed=21), make_pairs(root / "reg", 2, seed=22)
    logs = root / "logs"
    first = ["-b", str(TINY_TRAIN), "--actual_resume", str(ckpt), "--data_root", str(train), "--reg_data_root",
             str(reg), "--class_word", "dog", "--source_word", "wolf"]
    main_py(logs, *first, *LORA_FLAGS, "-t", "-n", "lora", "--max_steps", "4")
    (run,) = logs.glob("*_lora")
    return {"root": root, "ckpt": ckpt, "run": run, "logs": logs, "first": first}


def save_tiny_checkpoint_for_lora(path):
    from tests.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(path, seed=5)


def test_lora_run_writes_the_adapter_and_keeps_the_base(lora_run):
    run = lora_run["run"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    assert sorted(p.name for p in (run / "images" / "train").iterdir()) == ["gs-000002.png", "gs-000004.png"]
    assert sorted(p.name for p in (run / "export").iterdir()) == ["lora.safetensors"]
    (project,) = (run / "configs").glob("*-project.yaml")
    from omegaconf import OmegaConf

    params = OmegaConf.load(project).model.params
    assert OmegaConf.to_container(params.lora_config) == {"rank": 64, "alpha": 32.0, "text_encoder": True}
    assert params.optimizer == "adamw8bit"

    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
    base, adapter = split_peft_state(checkpoint["state_dict"], alpha=32.0)
    original = load_state_dict_file(lora_run["ckpt"])
    assert [k for k, v in base.items() if not torch.equal(v, original[k])] == []  # base bit-identical after training
    assert checkpoint["lora"]["rank"] == 64 and checkpoint["lora"]["base_checkpoint"]["sha256"] == sha256_file(
        lora_run["ckpt"])
    states = [_flat(state) for state in checkpoint["optimizer_states"][0]["state"].values()]
    assert {state["state1"].dtype for state in states} == {torch.uint8, torch.float32}  # 8-bit for the large ones

    tensors, metadata = read_lora(run / "export" / "lora.safetensors")
    assert tensors.keys() == adapter.keys() and all(torch.equal(tensors[k], adapter[k]) for k in tensors)
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert metadata["rank"] == "64" and metadata["alpha"] == "32" and metadata["global_step"] == "4"
    assert metadata["base_checkpoint_sha256"] == sha256_file(lora_run["ckpt"])
    assert metadata["base_weights"] == "training"  # the run started from model.*, not from the file's EMA copy
    assert (run / "export" / "lora.safetensors").stat().st_size < 0.25 * lora_run["ckpt"].stat().st_size


def test_lora_resume_is_exact(lora_run):
    run = lora_run["run"]
    half = lora_run["logs"] / f"{run.name.rsplit('_', 1)[0]}_half"
    shutil.copytree(run, half, ignore=shutil.ignore_patterns("last.ckpt", "step=000004.ckpt", "export", "images"))
    main_py(lora_run["logs"], "-r", str(half / "checkpoints" / "step=000002.ckpt"), "-t", "--max_steps", "4", NO_IMAGES)
    a, b = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (run, half))
    assert a["global_step"] == b["global_step"] == 4
    assert [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])] == []
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for index, state in opt_a["state"].items():
        flat_a, flat_b = _flat(state), _flat(opt_b["state"][index])
        assert flat_a.keys() == flat_b.keys()
        for name, value in flat_a.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(flat_b[name])), (index, name)
    # The resumed run never loaded the base file, yet its adapter still names it.
    _, metadata = read_lora(half / "export" / "lora.safetensors")
    assert metadata["base_checkpoint_sha256"] == sha256_file(lora_run["ckpt"])
    result = main_py(lora_run["logs"], "-r", str(half), "-t", "--max_steps", "5", "--lora_rank", "8", expect=2)
    assert "model.params.lora_config.rank" in result.stderr and "Traceback" not in result.stderr


def _flat(state: dict, prefix: str = "") -> dict:
    """An optimizer's per-parameter state with nested dicts (bitsandbytes' quantisation state) flattened."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}".replace("__bnb_optimizer_quant_state__.", "")] = value
    return out


def _edit(tmp_path, name, ckpt, config, *extra):
    from scripts.edit_cli import main as edit_main

    photo = tmp_path / "wolf.png"
    if not photo.exists():
        Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(photo)
    out = tmp_path / f"{name}.png"
    assert edit_main(["--ckpt", str(ckpt), "--config", str(config), "--input", str(photo), "--output", str(out),
                      "--edit", "replace the wolf with a sks dog", "--steps", "2", "--resolution", "64", "--seed", "1",
                      "--quiet", *extra]) == 0
    return Image.open(out)


def test_edit_cli_lora_equals_merged_export(lora_run, tmp_path):
    from scripts.export import main as export_main

    run, base = lora_run["run"], lora_run["ckpt"]
    (project,) = (run / "configs").glob("*-project.yaml")
    lora = run / "export" / "lora.safetensors"
    plain = np.asarray(_edit(tmp_path, "plain", base, project))
    with_lora = _edit(tmp_path, "lora", base, project, "--lora", str(lora))
    assert json.loads(with_lora.text["instruct2dream"])["lora"] == [{"file": "lora.safetensors", "scale": 1.0}]
    assert not np.array_equal(plain, np.asarray(with_lora))

    merged = tmp_path / "merged.safetensors"
    assert export_main([str(base), str(merged), "--merge", "--lora", str(lora)]) == 0
    assert np.array_equal(np.asarray(_edit(tmp_path, "merged", merged, project)), np.asarray(with_lora))
    from_run = tmp_path / "from_run.safetensors"
    assert export_main([str(run / "checkpoints" / "last.ckpt"), str(from_run), "--merge"]) == 0
    a, b = load_state_dict_file(merged), load_state_dict_file(from_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adapter = tmp_path / "adapter.safetensors"
    assert export_main([str(run / "checkpoints" / "last.ckpt"), str(adapter)]) == 0
    assert read_lora(adapter)[0].keys() == read_lora(lora)[0].keys()
    half = np.asarray(_edit(tmp_path, "half", base, project, "--lora", str(lora), "--lora-scale", "0.5"))
    assert not np.array_equal(half, np.asarray(with_lora)) and not np.array_equal(half, plain)
