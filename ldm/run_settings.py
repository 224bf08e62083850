"""Lightning Trainer settings of a training run, from the config's ``lightning.trainer`` and ``main.py``'s flags."""

from __future__ import annotations

import argparse
import importlib.util
import logging
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.errors import UsageError

logger = logging.getLogger(__name__)


def check_strategy(strategy: str, settings: dict[str, Any]) -> None:
    """Refuse, with the reason, strategies that cannot run here (before Lightning builds the model)."""
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(f"--strategy {strategy}: deepspeed is not installed "
                         "(pip install deepspeed, on a CUDA machine)")
    if strategy.startswith("fsdp") and str(settings.get("accelerator")) not in ("gpu", "cuda"):
        raise UsageError(f"--strategy {strategy}: Lightning's FSDP shards across CUDA devices only; "
                         "use ddp on the CPU, or --gpus")


def trainer_settings(opt: argparse.Namespace, lightning_config: Any) -> dict[str, Any]:
    """Lightning Trainer kwargs: the config's ``lightning.trainer`` plus the device/length flags."""
    settings = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    if opt.gpus is not None:
        try:
            ids = [int(i) for i in str(opt.gpus).replace(" ", "").split(",") if i != ""]
        except ValueError:
            ids = []
        if not ids:
            raise UsageError(f"--gpus {opt.gpus!r}: give GPU ids such as '0,' or '0,1'")
        settings.update(accelerator="gpu", devices=ids)
        if len(ids) > 1 or (opt.num_nodes or 1) > 1:
            settings.setdefault("strategy", "ddp")
    settings.setdefault("accelerator", "cpu")
    settings.setdefault("devices", 1)
    if str(settings["accelerator"]) in ("gpu", "cuda") and not torch.cuda.is_available():
        asked = f"--gpus {opt.gpus}" if opt.gpus is not None else f"lightning.trainer.accelerator={settings['accelerator']}"
        raise UsageError(f"{asked}: CUDA is not available here (torch {torch.__version__}); "
                         "leave out --gpus to train on the CPU")
    for key in ("max_steps", "precision", "num_nodes", "strategy"):
        if getattr(opt, key, None) is not None:
            settings[key] = getattr(opt, key)
    if "strategy" in settings:
        check_strategy(str(settings["strategy"]), settings)
    settings.setdefault("max_steps", -1)
    settings.pop("gpus", None)
    settings.pop("resume_from_checkpoint", None)
    # The training sampler splits the data across ranks itself (exact resumption, ldm.data.sampler).
    settings["use_distributed_sampler"] = False
    return settings


def device_count(settings: dict[str, Any]) -> int:
    """Devices per node of the Trainer ``settings``."""
    devices = settings.get("devices", 1)
    return len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else 1


def learning_rate(config: Any, settings: dict[str, Any], scale_lr: bool) -> float:
    """``base_learning_rate``, times accumulation x devices x nodes x batch size with ``--scale_lr``."""
    batch_size = int(config.get("data", {}).get("params", {}).get("batch_size", 1))
    base_lr = float(config.model.get("base_learning_rate", 1.0e-4))
    accumulate = int(settings.get("accumulate_grad_batches", 1))
    scale = accumulate * device_count(settings) * int(settings.get("num_nodes", 1)) * batch_size
    lr = scale * base_lr if scale_lr else base_lr
    logger.info("learning rate %.3g (%s)", lr, f"{scale} x {base_lr:.3g}" if scale_lr else "base_learning_rate")
    return lr
