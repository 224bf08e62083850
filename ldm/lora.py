"""LoRA (Hu et al. 2021, eq. 3: ``W + (alpha/r)·B·A``) through peft, and LoRA files in the kohya/A1111 layout.

Training: `add_adapters` injects peft's LoRA layers into the CompVis-named modules (``to_q``/``to_k``/``to_v``/
``to_out.0`` of every UNet attention by default) and freezes everything else in that module. The state dict of such
a model keeps peft's names (``<path>.base_layer.weight``, ``<path>.lora_A.default.weight``, ``<path>.lora_B.…``).

Files: one entry per adapted module, named after its path in the original checkpoint with dots turned into
underscores, e.g. ``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q`` →
``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`` and ``cond_stage_model.transformer.text_model.
encoder.layers.0.self_attn.q_proj`` → ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, each with
``.lora_down.weight`` (A, (r, in)), ``.lora_up.weight`` (B, (out, r)) and ``.alpha`` (a scalar). Applying a file
merges ``W += scale · (alpha/r) · up @ down`` into the weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, MutableMapping

import torch
from torch import nn

from ldm.checkpoint import EMA_PREFIX, CheckpointError, ema_key
from ldm.errors import MissingFileError, UsageError
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
KOHYA_PREFIXES = {UNET_PREFIX: "lora_unet_", TEXT_PREFIX: "lora_te_"}
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "default"  # peft's adapter name
_PEFT_KEY = re.compile(rf"^(?P<path>.+)\.lora_(?P<which>[AB])\.{ADAPTER}\.weight$")
_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass(frozen=True)
class LoraSettings:
    """``model.params.lora_config``: rank r, alpha (default r), target module names, adapters on the text encoder."""

    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    text_encoder: bool = False
    text_encoder_targets: tuple[str, ...] = DEFAULT_TEXT_TARGETS

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> LoraSettings | None:
        """None for no LoRA; an unknown key or a bad value is a `ConfigError` naming it."""
        if config is None:
            return None
        known = {"rank", "alpha", "targets", "text_encoder", "text_encoder_targets"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"lora_config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        rank = int(config.get("rank", 4))
        alpha = config.get("alpha")
        if rank < 1:
            raise ConfigError(f"lora_config.rank must be at least 1, got {rank}")
        if alpha is not None and float(alpha) <= 0:
            raise ConfigError(f"lora_config.alpha must be positive, got {alpha}")
        targets = _names(config.get("targets", DEFAULT_TARGETS), "targets")
        text_targets = _names(config.get("text_encoder_targets", DEFAULT_TEXT_TARGETS), "text_encoder_targets")
        return cls(rank, None if alpha is None else float(alpha), targets, bool(config.get("text_encoder", False)),
                   text_targets)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.lora_alpha, "targets": list(self.targets),
                "text_encoder": self.text_encoder, "text_encoder_targets": list(self.text_encoder_targets)}


def _names(value: Any, key: str) -> tuple[str, ...]:
    names = tuple(str(v).strip() for v in ([value] if isinstance(value, str) else value))
    if not names or any(not n for n in names):
        raise ConfigError(f"lora_config.{key} must name at least one module, got {value!r}")
    return names


def _peft() -> Any:
    """Import peft (an optional dependency) or say how to install it."""
    # bitsandbytes, imported by peft when present, warns at import about an optional CPU kernel package.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import peft
    except ImportError as err:
        raise UsageError("LoRA needs peft: pip install 'instruct2dream[lora]' (or scripts/setup_env.sh)") from err
    return peft


def add_adapters(module: nn.Module, rank: int, alpha: float, targets: Iterable[str], where: str) -> int:
    """Inject peft LoRA layers (B zero-initialised) into the modules of ``module`` named ``targets``; freeze the rest.

    A target matches a module whose path equals it or ends with ``.<target>`` (peft's rule). Returns the number of
    adapted modules; none is a `ConfigError`.
    """
    peft = _peft()
    targets = list(targets)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    try:
        peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as err:
        raise ConfigError(f"lora targets {targets} in the {where}: {err}") from err
    for name, param in module.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    count = sum(1 for m in module.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    if count == 0:
        raise ConfigError(f"lora targets {targets} match no module of the {where}")
    logger.info("LoRA r=%d alpha=%g on %d %s modules (%s)", rank, alpha, count, where, ", ".join(targets))
    return count


def kohya_name(module_path: str) -> str:
    """Original-checkpoint module path → kohya/A1111 LoRA module name (``lora_unet_…`` / ``lora_te_…``)."""
    for prefix, kohya in KOHYA_PREFIXES.items():
        if module_path.startswith(prefix):
            return kohya + module_path[len(prefix):].replace(".", "_")
    raise ValueError(f"{module_path}: LoRA files hold UNet ({UNET_PREFIX}…) and text encoder ({TEXT_PREFIX}…) "
                     "modules only")


def is_peft_state(state: Mapping[str, Any]) -> bool:
    """True for the state dict of a model with peft adapters (a LoRA run's checkpoint)."""
    return any(_PEFT_KEY.match(k) for k in state)


def adapter_tensors(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The peft LoRA weights of a model state dict in the kohya layout (``lora_down``/``lora_up``/``alpha``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match is None or key.startswith("model_ema."):
            continue
        name = kohya_name(match["path"])
        out[f"{name}.lora_{'down' if match['which'] == 'A' else 'up'}.weight"] = value.detach().float().cpu()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def split_peft_state(state: Mapping[str, torch.Tensor], alpha: float, ema: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA run's state dict → (base weights in the original layout, the adapter in the kohya layout).

    With ``ema`` the adapter is the run's EMA of the adapter weights (LitEma names, `ldm.checkpoint.ema_key`). The
    base weights never hold EMA keys.
    """
    adapter = {k: v for k, v in state.items() if _PEFT_KEY.match(k) and not k.startswith(EMA_PREFIX)}
    if ema:
        missing = [k for k in adapter if k.startswith("model.") and ema_key(k) not in state]
        if missing:
            raise CheckpointError(f"EMA export requested but the LoRA weights have no EMA, e.g. {missing[0]}")
        adapter = {k: state[ema_key(k)] if k.startswith("model.") else v for k, v in adapter.items()}
    base = {k.replace(".base_layer.", "."): v for k, v in state.items()
            if not _PEFT_KEY.match(k) and not k.startswith(EMA_PREFIX)}
    return base, adapter_tensors(adapter, alpha)


def lora_metadata(settings: LoraSettings, base_checkpoint: str | None = None, base_sha256: str | None = None,
                  base_ema: bool | None = None, **extra: str) -> dict[str, str]:
    """safetensors metadata of a LoRA file: ours, plus the ``ss_*`` keys kohya's tools and A1111 display.

    ``base_ema`` records which UNet weights of the base checkpoint the adapter was trained on (``base_weights``:
    ``ema`` or ``training``), so that applying it can pick the same ones (`recorded_base_ema`).
    """
    metadata = {
        "format": "instruct2dream-lora",
        "rank": str(settings.rank),
        "alpha": f"{settings.lora_alpha:g}",
        "targets": json.dumps(list(settings.targets)),
        "text_encoder": json.dumps(settings.text_encoder),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": f"{settings.lora_alpha:g}",
        "ss_base_model_version": "sd_v1",
        **extra,
    }
    if settings.text_encoder:
        metadata["text_encoder_targets"] = json.dumps(list(settings.text_encoder_targets))
    if base_checkpoint:
        metadata["base_checkpoint"] = Path(base_checkpoint).name
    if base_ema is not None:
        metadata["base_weights"] = "ema" if base_ema else "training"
    if base_sha256:
        metadata["base_checkpoint_sha256"] = base_sha256
        metadata["sshs_model_hash"] = base_sha256
    return metadata


def read_lora(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a kohya-layout LoRA ``.safetensors``: (tensors, metadata); other layouts are a `CheckpointError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    bad = sorted(k for k in tensors if not (k.startswith(tuple(KOHYA_PREFIXES.values())) and
                                           k.split(".", 1)[-1] in _KOHYA_SUFFIXES))
    if bad or not tensors:
        shown = ", ".join(bad[:3]) if bad else "no tensors"
        raise CheckpointError(f"{path}: not a kohya/A1111 LoRA file (lora_unet_…/lora_te_… keys), found {shown}")
    return tensors, metadata


def merge_lora_(weights: MutableMapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], scale: float = 1.0,
                source: str = "LoRA") -> int:
    """Merge a kohya LoRA into original-layout weights in place: ``W += scale · (alpha/r) · up @ down``.

    ``weights`` maps original keys (``model.diffusion_model.….weight``) to tensors, e.g. a model's ``state_dict()``
    (whose tensors share the parameters' storage). Every LoRA module must name a weight of the right shape; a
    missing ``alpha`` means alpha = r. Returns the number of merged modules.
    """
    lookup = {}
    for key in weights:
        if key.endswith(".weight") and key.startswith(tuple(KOHYA_PREFIXES)):
            lookup[kohya_name(key[: -len(".weight")])] = key
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        name, suffix = key.split(".", 1)
        modules.setdefault(name, {})[suffix] = value
    unknown = sorted(name for name in modules if name not in lookup)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} LoRA module(s) have no weight in this model, e.g. "
                              f"{', '.join(unknown[:3])} (files with diffusers block names are not supported)")
    for name, parts in modules.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise CheckpointError(f"{source}: {name} needs both lora_down.weight and lora_up.weight")
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        weight = weights[lookup[name]]
        if up.shape[0] != weight.shape[0] or up[0].numel() != rank or down[0].numel() != weight[0].numel():
            raise CheckpointError(f"{source}: {name} has shapes down {tuple(down.shape)} / up {tuple(up.shape)}, "
                                  f"which do not fit the weight {tuple(weight.shape)}")
        delta = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(weight.shape)  # (out, in[, k, k])
        with torch.no_grad():
            weight.add_((delta * (scale * alpha / rank)).to(device=weight.device, dtype=weight.dtype))
    logger.info("%s: merged %d LoRA modules at scale %g", source, len(modules), scale)
    return len(modules)


def apply_lora_files(weights: MutableMapping[str, torch.Tensor], files: Iterable[str | os.PathLike[str]],
                     scales: Iterable[float]) -> None:
    """Merge each LoRA file at its scale into ``weights`` (see `merge_lora_`)."""
    for path, scale in zip(files, scales, strict=True):
        tensors, _ = read_lora(path)
        merge_lora_(weights, tensors, float(scale), source=str(path))


def recorded_base_ema(files: Iterable[str | os.PathLike[str]]) -> bool | None:
    """The base UNet weights (True: EMA) that all ``files`` record they were trained on; None if unknown or mixed."""
    choices = set()
    for path in files:
        _, metadata = read_lora(path)
        choices.add(metadata.get("base_weights"))
    if len(choices) != 1 or None in choices:
        return None
    return choices.pop() == "ema"


def lora_scales(files: list[str], scales: list[float] | None) -> list[float]:
    """``--lora-scale`` values for ``--lora`` files: none → 1 each, one → shared, else one per file."""
    if not scales:
        return [1.0] * len(files)
    if len(scales) == 1:
        return scales * len(files)
    if len(scales) != len(files):
        raise UsageError(f"give one --lora-scale, or one per --lora file ({len(files)}), not {len(scales)}")
    return list(scales)
