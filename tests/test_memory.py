"""The memory options: 8-bit AdamW, gradient checkpointing, half-precision frozen parts, and main.py's flags for them
(written into the run's config) and for Lightning strategies (DDP through --strategy, FSDP refused on CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import ConfigError
from tests.test_resume import main_py
from tests.test_train import NO_IMAGES, TINY_TRAIN, _batch, _dreambooth_model, make_pairs
from tests.tiny import save_tiny_checkpoint


def test_adamw8bit_keeps_8bit_moments_and_trains():
    import bitsandbytes as bnb

    model = _dreambooth_model(optimizer="adamw8bit", cond_stage_trainable=False, learning_rate=1e-3)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 1e-2)  # torch AdamW's
    before = [p.detach().clone() for p in model.model.parameters()]
    loss, _ = model.shared_step(_batch(0, size=32), torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.model.parameters()) if a.numel() > 1)
    big = max(model.model.parameters(), key=lambda p: p.numel())
    assert optimizer.state[big]["state1"].dtype == torch.uint8 and optimizer.state[big]["state2"].dtype == torch.uint8
    with pytest.raises(ConfigError, match="adamw8bit"):
        _dreambooth_model(optimizer="sgd")


def test_frozen_dtype_holds_vae_and_frozen_text_encoder_in_half_precision():
    model = _dreambooth_model(frozen_dtype="bf16", cond_stage_trainable=False)
    assert {p.dtype for p in model.first_stage_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.cond_stage_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.model.parameters()} == {torch.float32}
    batch = _batch(0, size=32)
    posterior = model.encode_first_stage(batch["image"])
    assert posterior.mode().dtype == torch.float32 and posterior.sample().dtype == torch.float32
    assert model.get_learned_conditioning(["a dog"]).dtype == torch.float32
    assert model.decode_first_stage(posterior.mode() * model.scale_factor).dtype == torch.float32
    reference = _dreambooth_model(cond_stage_trainable=False)  # same weights in float32
    rel = (posterior.mode() - reference.encode_first_stage(batch["image"]).mode()).abs().max()
    assert 0 < rel < 0.05 * reference.encode_first_stage(batch["image"]).mode().abs().max()
    loss, _ = model.shared_step(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in model.model.parameters())
    # A trained text encoder stays in float32; its LoRA adapters too, over a half-precision base.
    trained_text = _dreambooth_model(frozen_dtype="bf16", cond_stage_trainable=True)
    assert {p.dtype for p in trained_text.cond_stage_model.parameters()} == {torch.float32}
    lora = _dreambooth_model(frozen_dtype="bf16", lora_config={"rank": 2, "text_encoder": True})
    dtypes = {p.dtype for n, p in lora.cond_stage_model.named_parameters() if ".lora_" in n}
    assert dtypes == {torch.float32}
    assert {p.dtype for n, p in lora.cond_stage_model.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    loss, _ = lora.shared_step(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())
    with pytest.raises(ConfigError, match="frozen_dtype"):
        _dreambooth_model(frozen_dtype="int8")


def _config_after_flags(*flags):
    from main import apply_model_flags, load_configs, parse_args

    opt, overrides = parse_args([*flags, "-b", str(TINY_TRAIN)])
    config = load_configs(opt.base, overrides)
    apply_model_flags(config, opt)
    return config.model.params


def test_memory_flags_write_the_config():
    params = _config_after_flags("--lora_rank", "8", "--lora_alpha", "4", "--lora_targets", "to_q, to_v",
                                 "--lora_text_encoder", "--optimizer", "adamw8bit", "--gradient_checkpointing",
                                 "--frozen_dtype", "bf16")
    assert OmegaConf.to_container(params.lora_config) == {"rank": 8, "alpha": 4.0, "text_encoder": True,
                                                          "targets": ["to_q", "to_v"]}
    assert params.optimizer == "adamw8bit" and params.frozen_dtype == "bf16"
    assert params.unet_config.params.use_checkpoint is True
    assert _config_after_flags("--gradient_checkpointing", "false").unet_config.params.use_checkpoint is False
    untouched = _config_after_flags()
    assert "lora_config" not in untouched and "optimizer" not in untouched and "frozen_dtype" not in untouched
    # A flag on top of a config's own lora_config changes that key alone.
    params = _config_after_flags("model.params.lora_config.rank=2", "model.params.lora_config.alpha=1",
                                 "--lora_alpha", "3")
    assert OmegaConf.to_container(params.lora_config) == {"rank": 2, "alpha": 3.0}


def test_gradient_checkpointing_reaches_every_block():
    params = _config_after_flags("--gradient_checkpointing")
    from ldm.util import instantiate_from_config

    unet = instantiate_from_config(params.unet_config)
    flags = [m.checkpoint for m in unet.modules() if hasattr(m, "checkpoint") and isinstance(m.checkpoint, bool)]
    flags += [m.use_checkpoint for m in unet.modules() if type(m).__name__ == "ResBlock"]
    assert flags and all(flags)


@pytest.mark.parametrize("args,message", [
    (["--lora_alpha", "4"], "need --lora_rank"),
    (["--lora_rank", "0"], "--lora_rank must be at least 1"),
    (["--lora_rank", "4", "--lora_targets", " , "], "name at least one module"),
    (["--strategy", "fsdp"], "CUDA devices only"),
    (["--strategy", "deepspeed_stage_2"], "deepspeed is not installed"),
])
def test_flag_errors_are_clear(args, message, capsys, tmp_path, monkeypatch):
    import importlib.util

    from main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    data = make_pairs(tmp_path / "pairs", 1, seed=0)
    assert main(["-b", str(TINY_TRAIN), "-t", "-l", str(tmp_path / "logs"), "--data_root", str(data),
                 "--reg_data_root", str(data), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_lora_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key"):
        _dreambooth_model(lora_config={"rank": 4, "dropout": 0.1})
    with pytest.raises(ConfigError, match="match no module|not found"):
        _dreambooth_model(lora_config={"rank": 4, "targets": ["no_such_layer"]})


def test_strategy_ddp_flag_with_lora_two_processes(tmp_path):
    """--strategy ddp passes through to Lightning: two gloo ranks, a LoRA run, identical adapters at the end."""
    ckpt = save_tiny_checkpoint(tmp_path / "base.ckpt", seed=5)
    train, reg = make_pairs(tmp_path / "training", 4, seed=31), make_pairs(tmp_path / "reg", 2, seed=32)
    probe, logs = tmp_path / "probe", tmp_path / "logs"
    main_py(logs, "-b", str(TINY_TRAIN), "--actual_resume", str(ckpt), "--data_root", str(train), "--reg_data_root",
            str(reg), "--class_word", "dog", "-t", "-n", "ddp", "--max_steps", "2", NO_IMAGES, "--strategy", "ddp",
            "lightning.trainer.devices=2", "--lora_rank", "2",
            "lightning.callbacks.probe.target=tests.ddp_probe.DDPProbe",
            f"lightning.callbacks.probe.params.out_dir={probe}")
    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["weights"] == records[1]["weights"]
    assert not set(records[0]["seen"][0]) & set(records[1]["seen"][0])
    (run,) = logs.glob("*_ddp")
    (lightning,) = (run / "configs").glob("*-lightning.yaml")
    assert OmegaConf.load(lightning).lightning.trainer.strategy == "ddp"
    assert (run / "export" / "lora.safetensors").is_file() and not (run / "export" / "model.safetensors").exists()
