"""The full-size models built from the original configs have exactly the released checkpoints' keys (meta device)."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import migrate
from ldm.util import instantiate_from_config
from tests.reference import manifest_entries, reference_config

DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


def _build_on_meta(config_name: str, **param_overrides):
    config = reference_config(config_name)
    for key, value in param_overrides.items():
        config.model.params[key] = value
    with torch.device("meta"):
        return instantiate_from_config(config.model)


def _entries_without_position_ids(name: str) -> list[dict]:
    return [e for e in manifest_entries(name) if not e["key"].endswith("position_ids")]


@pytest.fixture(scope="module")
def ip2p_model():
    return _build_on_meta("ip2p-generate.yaml")


@pytest.fixture(scope="module")
def sd_model():
    # The SD v1 manifest was made with use_ema switched on (tests/data/README.md).
    return _build_on_meta("sd-v1-inference.yaml", use_ema=True)


@pytest.mark.parametrize("group", ["schedule", "unet", "ema", "vae", "text"])
@pytest.mark.parametrize("name", ["ip2p", "sd_v1"])
def test_every_group_matches_manifest(name, group, ip2p_model, sd_model):
    model = ip2p_model if name == "ip2p" else sd_model
    state = model.state_dict()
    expected = [e for e in _entries_without_position_ids(name) if e["group"] == group]
    prefixes = {e["key"].split(".")[0] for e in expected}
    ours = [k for k in state if k.split(".")[0] in prefixes or (group == "schedule" and "." not in k)]
    assert ours == [e["key"] for e in expected], f"{group}: names or order differ"
    for entry in expected:
        tensor = state[entry["key"]]
        assert list(tensor.shape) == entry["shape"], entry["key"]
        assert tensor.dtype == DTYPES[entry["dtype"]], entry["key"]


@pytest.mark.parametrize("name", ["ip2p", "sd_v1"])
def test_whole_state_dict_equals_manifest_after_migration(name, ip2p_model, sd_model):
    """The released file's keys (position_ids included) migrate onto exactly our keys, in order."""
    model = ip2p_model if name == "ip2p" else sd_model
    expected = {k: v.shape for k, v in model.state_dict().items()}
    released = {e["key"]: torch.empty(e["shape"], dtype=DTYPES[e["dtype"]], device="meta") for e in manifest_entries(name)}
    migrated = migrate(released, expected)
    assert list(migrated) == list(expected)
    assert all(migrated[k].shape == expected[k] for k in expected)


def test_manifests_differ_only_in_input_conv(ip2p_model, sd_model):
    ip2p, sd = ip2p_model.state_dict(), sd_model.state_dict()
    assert list(ip2p) == list(sd)
    differing = [k for k in ip2p if ip2p[k].shape != sd[k].shape]
    assert differing == ["model.diffusion_model.input_blocks.0.0.weight", "model_ema.diffusion_modelinput_blocks00weight"]


def test_parameter_counts(ip2p_model):
    unet = sum(p.numel() for p in ip2p_model.model.parameters())
    vae = sum(p.numel() for p in ip2p_model.first_stage_model.parameters())
    text = sum(p.numel() for p in ip2p_model.cond_stage_model.parameters())
    assert (unet, vae, text) == (859_532_484, 83_653_863, 123_060_480)
