"""Access to the read-only reference material in ../shared/reference (configs and key manifests)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
REFERENCE_CONFIGS = REFERENCE / "configs"
MANIFESTS = {"ip2p": REFERENCE / "ip2p_checkpoint_keys.json", "sd_v1": REFERENCE / "sd_v1_checkpoint_keys.json"}


@lru_cache(maxsize=None)
def manifest(name: str) -> dict[str, Any]:
    """The key manifest ``name`` ("ip2p" or "sd_v1") as parsed JSON."""
    return json.loads(MANIFESTS[name].read_text())


def manifest_entries(name: str, group: str | None = None) -> list[dict[str, Any]]:
    """Manifest entries in state-dict order, optionally of one group (schedule, unet, ema, vae, text)."""
    return [e for e in manifest(name)["entries"] if group is None or e["group"] == group]


def reference_config(name: str, drop_ckpt_path: bool = True) -> Any:
    """An original YAML config (e.g. "ip2p-generate.yaml") as OmegaConf, optionally without ``ckpt_path``."""
    config = OmegaConf.load(REFERENCE_CONFIGS / name)
    if drop_ckpt_path and "ckpt_path" in config.model.params:
        del config.model.params["ckpt_path"]
    return config
