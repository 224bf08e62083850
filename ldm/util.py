"""Config plumbing shared by the whole codebase: `target`/`params` instantiation (CompVis convention)."""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Mapping

from ldm.errors import UsageError

logger = logging.getLogger(__name__)

_reported_legacy: set[tuple[str, str]] = set()


class ConfigError(UsageError):
    """A config names a target that does not exist or passes parameters the target does not accept."""


def report_legacy_param(owner: str, name: str, value: Any, reason: str, default: Any = None) -> None:
    """Warn once per process that ``owner``'s legacy config parameter ``name`` is set (not ``default``) and ignored."""
    if value == default or (owner, name) in _reported_legacy:
        return
    _reported_legacy.add((owner, name))
    logger.warning("%s: legacy parameter %s=%r is accepted for compatibility and ignored (%s)", owner, name, value,
                   reason)


def exists(value: Any) -> bool:
    """True when ``value`` is not None."""
    return value is not None


def default(value: Any, fallback: Any) -> Any:
    """``value`` unless it is None, else ``fallback`` (called if it is a function)."""
    if exists(value):
        return value
    return fallback() if inspect.isfunction(fallback) else fallback


def get_obj_from_str(target: str, reload: bool = False) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``; the error names what could not be found."""
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"target {target!r} is not a dotted path such as 'ldm.models.autoencoder.AutoencoderKL'")
    module_name, attr = target.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Distinguish "the target's module is missing" from "the module imports something missing".
        if err.name and module_name.startswith(err.name):
            raise ConfigError(f"target {target!r}: module {module_name!r} does not exist") from err
        raise
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ConfigError(f"target {target!r}: module {module_name!r} has no attribute {attr!r}") from err


def _to_container(params: Any) -> dict[str, Any]:
    """Turn an OmegaConf node or mapping into a plain dict (nested configs stay OmegaConf-free)."""
    if params is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(params, DictConfig):
            return OmegaConf.to_container(params, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    if not isinstance(params, Mapping):
        raise ConfigError(f"'params' must be a mapping, got {type(params).__name__}")
    return dict(params)


def _check_params(obj: Any, target: str, params: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming every parameter that ``obj`` does not accept."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if accepts_kwargs:
        return
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        known = ", ".join(name for name in signature.parameters if name != "self")
        raise ConfigError(f"{target}: unknown parameter(s) {', '.join(unknown)} (accepted: {known})")


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build ``config["target"](**config["params"], **overrides)``.

    The two placeholder values CompVis configs use for "nothing here" (``__is_first_stage__``,
    ``__is_unconditional__``) return None. Errors name the target and the offending parameter.
    """
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if not isinstance(config, Mapping) and not hasattr(config, "get"):
        raise ConfigError(f"expected a config mapping with a 'target' key, got {config!r}")
    if "target" not in config:
        raise ConfigError(f"config has no 'target' key (keys: {', '.join(map(str, config.keys()))})")
    target = config["target"]
    obj = get_obj_from_str(target)
    params = _to_container(config.get("params"))
    params.update(overrides)
    _check_params(obj, target, params)
    return obj(**params)
