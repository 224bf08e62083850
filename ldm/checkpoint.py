"""Checkpoint IO: read `.ckpt`/`.safetensors` without running pickled code, migrate keys, load strictly, write.

A checkpoint is untrusted input. `.ckpt` files are read with torch's ``weights_only`` unpickler; the only globals it
may resolve beyond tensors and plain containers are Lightning-era metadata classes (callback objects, hparams
containers), which are replaced by an inert stand-in (`InertObject`) — their code is never imported or run.
Anything else (``os.system``, ``builtins.eval``, …) is refused with an `UnsafeCheckpointError`.

Loading into a model is strict: after the ordered migrations in `MIGRATIONS` have run, every key of the model must
be present with the right shape and every remaining checkpoint key must be either expected or declared ignorable.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ldm.errors import MissingFileError, UserError
from ldm.fileio import atomic_path

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Module prefixes whose classes may appear in Lightning-era checkpoints as metadata (callback states, hparams).
# They are never imported: each is replaced by `InertObject`.
INERT_GLOBAL_PREFIXES = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
    "main.",
    "ldm.",
    "typing.",
    "pathlib.",
    "argparse.Namespace",
)
# Plain standard containers and scalars that old checkpoints use in their metadata: constructing them runs no code.
_EXTRA_SAFE_GLOBALS: dict[str, Any] = {
    "collections.defaultdict": collections.defaultdict,
    "builtins.dict": dict,
    "builtins.list": list,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.tuple": tuple,
    "builtins.int": int,
    "builtins.float": float,
    "builtins.str": str,
    "builtins.bool": bool,
}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint references code that loading would execute."""


class InertObject:
    """Stand-in for any metadata class found in a checkpoint: accepts any construction or state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> InertObject:
        return InertObject(*args, **kwargs)


def _inert_subclass(path: str) -> type:
    """A fresh inert class named after ``path`` (distinct classes stay distinct as dict keys)."""
    return type(path.rsplit(".", 1)[-1], (InertObject,), {"__module__": "ldm.checkpoint.inert", "origin": path})


def _numpy_safe_globals() -> dict[str, Any]:
    """numpy scalars/dtypes that Lightning metadata sometimes holds (e.g. a numpy ``global_step``)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return {}
    out: dict[str, Any] = {"numpy.dtype": np.dtype}
    for name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
        out[name] = np._core.multiarray.scalar
    for name in ("float64", "float32", "int64", "int32"):
        dtype_cls = type(np.dtype(name))
        out[f"numpy.dtypes.{dtype_cls.__name__}"] = dtype_cls
    return out


def _globals_for(path: Path) -> list[tuple[Any, str]]:
    """Allow-list entries for the non-default globals that ``path`` references; refuse anything unsafe."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is not a torch checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    known = _numpy_safe_globals() | _EXTRA_SAFE_GLOBALS
    allowed: list[tuple[Any, str]] = []
    refused = []
    for name in names:
        if name in known:
            allowed.append((known[name], name))
        elif name.startswith(INERT_GLOBAL_PREFIXES):
            allowed.append((_inert_subclass(name), name))
        else:
            refused.append(name)
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load, the file references code that unpickling would run: {', '.join(refused)}. "
            "Only tensors, plain containers and Lightning metadata are accepted. If you trust this file, convert it "
            "to .safetensors in a trusted environment first."
        )
    return allowed


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a whole checkpoint file (``.ckpt``-style pickle or ``.safetensors``) as a dict, safely."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from err
    allowed = _globals_for(path)
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as err:  # noqa: BLE001
        if "Unsupported global" in str(err) or "Weights only load failed" in str(err):
            raise UnsafeCheckpointError(f"{path}: refusing to load unsafe pickle content ({err})") from err
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict at top level, found {type(obj).__name__}")
    return dict(obj)


def unwrap_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the flat ``{name: tensor}`` weights of a checkpoint (Lightning's ``state_dict`` entry if present)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: 'state_dict' is a {type(state).__name__}, not a mapping")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: non-tensor entries in the state dict: {', '.join(map(str, bad[:10]))}")
    return dict(state)


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read ``path`` and return its flat state dict (no migration)."""
    checkpoint = read_checkpoint(path)
    if "global_step" in checkpoint:
        logger.info("%s: global_step %s", path, checkpoint["global_step"])
    return unwrap_state_dict(checkpoint, str(path))


# --------------------------------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    """A named, ordered rewrite of checkpoint keys; ``fn(state, expected) -> state`` must not mutate its input."""

    name: str
    fn: Callable[[dict[str, torch.Tensor], Mapping[str, torch.Size]], dict[str, torch.Tensor]]
    doc: str


TEXT_PREFIX = "cond_stage_model.transformer."


def add_text_model_prefix(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """transformers >= 5 saves CLIPTextModel flat; re-insert ``text_model.`` where the model expects it."""
    out = {}
    for key, value in state.items():
        if key.startswith(TEXT_PREFIX) and not key.startswith(TEXT_PREFIX + "text_model."):
            candidate = TEXT_PREFIX + "text_model." + key[len(TEXT_PREFIX) :]
            if candidate in expected and key not in expected:
                key = candidate
        out[key] = value
    return out


def drop_position_ids(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Files saved with transformers < 4.31 carry CLIP ``embeddings.position_ids``, no longer a saved buffer."""
    return {k: v for k, v in state.items() if not (k.endswith("embeddings.position_ids") and k not in expected)}


MIGRATIONS: tuple[Migration, ...] = (
    Migration("add_text_model_prefix", add_text_model_prefix, add_text_model_prefix.__doc__ or ""),
    Migration("drop_position_ids", drop_position_ids, drop_position_ids.__doc__ or ""),
)


def widen_input_channels(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Zero-pad the UNet input conv (and its EMA twin) to the expected input channels (IP2P Sec. 3.3: SD → 8 ch)."""
    out = dict(state)
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model_ema.diffusion_modelinput_blocks00weight"):
        target = expected.get(key)
        if key not in out or target is None or out[key].shape == target:
            continue
        weight = out[key]
        if weight.ndim != 4 or weight.shape[1] > target[1] or weight.shape[0] != target[0]:
            continue  # not a widening: leave it for the shape check to report
        widened = weight.new_zeros(target)
        widened[:, : weight.shape[1]] = weight
        out[key] = widened
        logger.info("widened %s from %s to %s input channels (new channels zero)", key, weight.shape[1], target[1])
    return out


EMA_PREFIX = "model_ema."
UNET_PREFIX = "model."


def ema_key(param_name: str) -> str:
    """LitEma's name for a parameter of ``model`` (``model.diffusion_model.a.b`` → ``model_ema.diffusion_modelab``)."""
    if not param_name.startswith(UNET_PREFIX):
        raise KeyError(f"{param_name!r} is not a parameter under 'model.'")
    return EMA_PREFIX + param_name[len(UNET_PREFIX) :].replace(".", "")


def use_ema_weights(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Copy the EMA shadow weights into ``model.*`` (the weights InstructPix2Pix's own edits use)."""
    out = dict(state)
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in state]
    if missing:
        raise CheckpointError(
            f"EMA weights requested but the checkpoint has no EMA copy of {len(missing)} UNet parameter(s), "
            f"e.g. {missing[0]} (expected {ema_key(missing[0])}); use the non-EMA weights instead"
        )
    for key in unet_keys:
        out[key] = state[ema_key(key)]
    logger.info("using the EMA weights for %d UNet parameters", len(unet_keys))
    return out


OPTIONAL_MIGRATIONS: dict[str, Migration] = {
    m.name: m
    for m in (
        Migration("widen_input_channels", widen_input_channels, widen_input_channels.__doc__ or ""),
        Migration("use_ema_weights", use_ema_weights, use_ema_weights.__doc__ or ""),
    )
}


def migrate(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], extra: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Apply `MIGRATIONS` in order, then the requested optional migrations (by name) in the given order."""
    out = dict(state)
    steps = list(MIGRATIONS)
    for name in extra:
        if name not in OPTIONAL_MIGRATIONS:
            raise KeyError(f"unknown migration {name!r} (known: {', '.join(OPTIONAL_MIGRATIONS)})")
        steps.append(OPTIONAL_MIGRATIONS[name])
    for step in steps:
        before = set(out)
        out = step.fn(out, expected)
        changed = before ^ set(out)
        if changed:
            logger.debug("migration %s changed %d key(s)", step.name, len(changed))
    return out


# --------------------------------------------------------------------------------------------------- strict load


@dataclass
class LoadReport:
    """What a strict load found: each list names keys; ``ignored`` are unexpected keys that were allowed."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    ignored: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, source: str) -> str:
        lines = [f"{source} does not fit the model:"]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} key(s) with a different shape (checkpoint vs model):")
            lines += [f"    {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched]
        if self.missing:
            lines.append(f"  {len(self.missing)} key(s) missing from the checkpoint:")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s) in the checkpoint:")
            lines += [f"    {k}" for k in self.unexpected]
        return "\n".join(lines)


def compare_keys(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], ignorable: Iterable[str] = ()
) -> LoadReport:
    """Match ``state`` against the model's ``expected`` shapes; keys matching an ``ignorable`` regex are allowed."""
    patterns = [re.compile(p) for p in ignorable]
    missing = [k for k in expected if k not in state]
    unexpected, ignored = [], []
    for key in state:
        if key in expected:
            continue
        (ignored if any(p.match(key) for p in patterns) else unexpected).append(key)
    mismatched = [
        (k, tuple(state[k].shape), tuple(shape)) for k, shape in expected.items() if k in state and state[k].shape != shape
    ]
    return LoadReport(missing, unexpected, mismatched, ignored)


def expected_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """``{key: shape}`` of ``model.state_dict()`` in order."""
    return {k: v.shape for k, v in model.state_dict().items()}


def load_model_weights(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    migrations: Iterable[str] = (),
    ignorable: Iterable[str] = (),
) -> LoadReport:
    """Migrate ``state`` and load it into ``model`` strictly; raise `CheckpointError` naming every bad key."""
    expected = expected_shapes(model)
    migrated = migrate(state, expected, migrations)
    report = compare_keys(migrated, expected, ignorable)
    if not report.ok:
        raise CheckpointError(report.describe(source))
    if report.ignored:
        logger.info("%s: ignored %d key(s) the model does not use (e.g. %s)", source, len(report.ignored), report.ignored[0])
    model.load_state_dict({k: migrated[k] for k in expected}, strict=True)
    return report


# --------------------------------------------------------------------------------------------------- writing


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state`` as safetensors atomically (temp file + rename), in the original key layout given."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``checkpoint`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        torch.save(dict(checkpoint), tmp)
    return Path(path)
