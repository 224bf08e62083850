"""ldm.checkpoint: safe reading, migrations (each on its own), strict loading, writing."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from ldm import checkpoint as ckpt


class Tiny(nn.Module):
    def __init__(self, in_ch: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 4, 3)
        self.register_buffer("betas", torch.linspace(0, 1, 5))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_loads_strictly(tmp_path, suffix):
    source, target = Tiny(), Tiny()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        ckpt.save_safetensors(source.state_dict(), path, {"note": "x"})
    else:
        ckpt.save_checkpoint({"state_dict": source.state_dict(), "global_step": 7}, path)
    state = ckpt.load_state_dict_file(path)
    ckpt.load_model_weights(target, state, source=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "w.safetensors"
    ckpt.save_safetensors(Tiny().state_dict(), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": evil}, path)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="system"):
        ckpt.read_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil2.ckpt"
    path.write_bytes(pickle.dumps(evil))  # legacy (non-zip) format
    with pytest.raises(ckpt.CheckpointError):
        ckpt.read_checkpoint(path)
    assert not marker.exists()


def test_lightning_era_checkpoint_with_callbacks_and_position_ids_loads(tmp_path):
    """A PL 1.x-style file: a callback class as dict key, OmegaConf hparams, global_step, old CLIP key."""
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ModelCheckpoint

    model = nn.Module()
    model.cond_stage_model = nn.Module()
    model.cond_stage_model.transformer = nn.Module()
    model.cond_stage_model.transformer.text_model = nn.Linear(2, 2)
    state = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in model.cond_stage_model.transformer.text_model.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 22000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "dirpath": "/logs/ckpt"}},
            "hyper_parameters": OmegaConf.create({"lr": 1e-4}),
            "optimizer_states": [],
        },
        path,
    )
    loaded = ckpt.read_checkpoint(path)
    assert loaded["global_step"] == 22000
    report = ckpt.load_model_weights(model, ckpt.unwrap_state_dict(loaded), source=str(path))
    assert report.ok


def test_not_a_checkpoint(tmp_path):
    for name, data in [("junk.ckpt", b"not a zip"), ("junk.safetensors", b"\x00" * 20), ("empty.ckpt", b"")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ckpt.CheckpointError, match=name):
            ckpt.read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        ckpt.read_checkpoint(tmp_path / "missing.ckpt")


# ------------------------------------------------------------------ migrations, each on its own

def test_migration_drop_position_ids():
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state = {key: torch.arange(77)[None], "a": torch.zeros(1)}
    assert list(ckpt.drop_position_ids(state, {"a": torch.Size([1])})) == ["a"]
    # Kept when the model does expect it.
    assert key in ckpt.drop_position_ids(state, {key: torch.Size([1, 77])})


def test_migration_add_text_model_prefix():
    flat = "cond_stage_model.transformer.final_layer_norm.weight"
    nested = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    out = ckpt.add_text_model_prefix({flat: torch.ones(3)}, {nested: torch.Size([3])})
    assert list(out) == [nested]
    # A model that expects the flat layout keeps it.
    assert list(ckpt.add_text_model_prefix({flat: torch.ones(3)}, {flat: torch.Size([3])})) == [flat]


def test_migration_widen_input_channels():
    key = "model.diffusion_model.input_blocks.0.0.weight"
    ema = "model_ema.diffusion_modelinput_blocks00weight"
    w4 = torch.randn(320, 4, 3, 3)
    out = ckpt.widen_input_channels({key: w4, ema: w4 * 2}, {key: torch.Size([320, 8, 3, 3]), ema: torch.Size([320, 8, 3, 3])})
    assert out[key].shape == (320, 8, 3, 3)
    assert torch.equal(out[key][:, :4], w4) and torch.count_nonzero(out[key][:, 4:]) == 0
    assert torch.equal(out[ema][:, :4], w4 * 2)


def test_migration_use_ema_weights():
    state = {"model.diffusion_model.out.2.weight": torch.zeros(2), "model_ema.diffusion_modelout2weight": torch.ones(2)}
    out = ckpt.use_ema_weights(state, {})
    assert torch.equal(out["model.diffusion_model.out.2.weight"], torch.ones(2))
    assert torch.equal(state["model.diffusion_model.out.2.weight"], torch.zeros(2)), "input must not be mutated"
    with pytest.raises(ckpt.CheckpointError, match="EMA"):
        ckpt.use_ema_weights({"model.diffusion_model.out.2.weight": torch.zeros(2)}, {})


def test_ema_key_rule():
    assert ckpt.ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_unknown_optional_migration_is_an_error():
    with pytest.raises(KeyError, match="nope"):
        ckpt.migrate({}, {}, ["nope"])


# ------------------------------------------------------------------ strict loading reports

def test_strict_load_names_every_bad_key():
    model = Tiny(in_ch=8)
    state = _state(Tiny(in_ch=4))
    del state["betas"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model_weights(model, state, source="sd.ckpt")
    message = str(err.value)
    assert "sd.ckpt" in message
    assert "conv.weight: (4, 4, 3, 3) vs (4, 8, 3, 3)" in message
    assert "betas" in message and "extra.weight" in message


def test_ignorable_keys_are_reported_not_loaded():
    model = Tiny()
    state = _state(Tiny())
    state["model_ema.decay"] = torch.tensor(0.9999)
    report = ckpt.load_model_weights(model, state, ignorable=[r"^model_ema\."])
    assert report.ignored == ["model_ema.decay"]


def test_widening_is_opt_in():
    model = Tiny(in_ch=8)
    state = {"conv.weight": torch.randn(4, 4, 3, 3), "conv.bias": torch.zeros(4), "betas": torch.zeros(5)}
    with pytest.raises(ckpt.CheckpointError, match="conv.weight"):
        ckpt.load_model_weights(model, state)
