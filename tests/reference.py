"""Facts about the original releases, kept in tests/data (key manifests and original configs; see its README)."""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
REFERENCE_CONFIGS = DATA / "configs"
MANIFESTS = {"ip2p": DATA / "ip2p_checkpoint_keys.json.gz", "sd_v1": DATA / "sd_v1_checkpoint_keys.json.gz"}
# The six original configs, listed rather than globbed so that a missing file fails its tests instead of
# silently emptying a parametrization.
ORIGINAL_CONFIGS = (
    "ip2p-generate.yaml",
    "ip2p-train.yaml",
    "sd-v1-inference.yaml",
    "seed-generate.yaml",
    "seed-v1-finetune_unfrozen.yaml",
    "seed-v1-inference.yaml",
)
# sha256 of the files as copied from the project's reference folder (manifests: of the uncompressed JSON).
SHA256 = {
    "ip2p_checkpoint_keys.json.gz": "b4060e8831352a752d2b6de31736cc8ab6804a2bc0194fb95699c395d6c61d56",
    "sd_v1_checkpoint_keys.json.gz": "8bd0dc6f232f155d44464b28bd19d0b8ac0a6af1cd2187936d03310a15f1da76",
    "configs/ip2p-generate.yaml": "af1cca9e4c5eaba930a4e9f0a3f0e0dddac81f3828861c461e9c73d8c9008b76",
    "configs/ip2p-train.yaml": "cbd246a40e2d1da4cfed95c09cb477a145d5c0e6d100a6944fc733c3d907aa69",
    "configs/sd-v1-inference.yaml": "20b7f0acae54d1f88384a6ca15b5d62c0ee4fbbca07ff72f3761fe936083210d",
    "configs/seed-generate.yaml": "d91388c3be497a54d80fbf0623bd42d734d199a43be06de1fcbd82f583fa5bd9",
    "configs/seed-v1-finetune_unfrozen.yaml": "1ca5e15c4b2821da8fa49564a8d58122708d8ebdcbc25888ce8ca024230706bf",
    "configs/seed-v1-inference.yaml": "dd4a2b65ec579ca11bddfcd333ee920be95cad98a4bd31f700955c37c5eced5f",
}


def data_bytes(relative: str) -> bytes:
    """The content of ``tests/data/<relative>``, decompressed when it ends in ``.gz``."""
    raw = (DATA / relative).read_bytes()
    return gzip.decompress(raw) if relative.endswith(".gz") else raw


def sha256(relative: str) -> str:
    """sha256 (hex) of the (decompressed) content of ``tests/data/<relative>``."""
    return hashlib.sha256(data_bytes(relative)).hexdigest()


@lru_cache(maxsize=None)
def manifest(name: str) -> dict[str, Any]:
    """The key manifest ``name`` ("ip2p" or "sd_v1") as parsed JSON."""
    return json.loads(data_bytes(MANIFESTS[name].name))


def manifest_entries(name: str, group: str | None = None) -> list[dict[str, Any]]:
    """Manifest entries in state-dict order, optionally of one group (schedule, unet, ema, vae, text)."""
    return [e for e in manifest(name)["entries"] if group is None or e["group"] == group]


def reference_config(name: str, drop_ckpt_path: bool = True) -> Any:
    """An original YAML config (e.g. "ip2p-generate.yaml") as OmegaConf, optionally without ``ckpt_path``."""
    config = OmegaConf.load(REFERENCE_CONFIGS / name)
    if drop_ckpt_path and "ckpt_path" in config.model.params:
        del config.model.params["ckpt_path"]
    return config
