#!/usr/bin/env python
"""Training harness (CompVis ``main.py`` flags on Lightning 2): DreamBooth fine-tuning of InstructPix2Pix.

    python main.py --base configs/dreambooth/train.yaml -t --actual_resume models/instruct-pix2pix/instruct-pix2pix-00-22000.ckpt \\
        -n my_dog --gpus 0, --data_root data/my_dog/training --reg_data_root data/my_dog/regularization \\
        --class_word dog --source_word wolf

Writes ``logs/<timestamp>_<name>/`` with ``configs/`` (the merged YAML), ``checkpoints/`` (``step=NNNNNN.ckpt``
every ``lightning.modelcheckpoint.params.every_n_train_steps`` and ``last.ckpt``, all resumable),
``images/train/`` (edits of validation pairs by the current model), ``metrics.csv`` and
``export/model.safetensors`` (the fine-tuned weights alone, original layout, loadable by ``scripts/edit_cli.py``);
a LoRA run (``--lora_rank``) writes ``export/lora.safetensors`` instead (the adapter alone, kohya/A1111 layout).
Any ``a.b=c`` argument overrides the merged config, e.g. ``model.params.reg_weight=0``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.callbacks import AtomicCheckpointIO, ImageLogger, ResumingCSVLogger, SetupCallback, StepCheckpoint  # noqa: E402  (config targets main.*)
from ldm.data.datamodule import DataModuleFromConfig  # noqa: E402
from ldm.cli import HelpFormatter, exit_status  # noqa: E402
from ldm.errors import UsageError  # noqa: E402
from ldm.run_settings import learning_rate, trainer_settings  # noqa: E402

__all__ = ["DataModuleFromConfig", "ImageLogger", "SetupCallback", "main"]

logger = logging.getLogger("main")
RUN_TIMESTAMP_ENV = "INSTRUCT2DREAM_RUN_TIMESTAMP"
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "16", "bf16", "64")
OPTIMIZERS = ("adamw", "adamw8bit")  # ldm.optim.OPTIMIZERS (not imported here: --help stays fast)
DEFAULT_SEED = 23
# What a resumed run may change: how long it trains. Everything else comes from the run's saved configs.
RESUMABLE_CHANGES = ("lightning.trainer.max_steps",)


def str2bool(value: str) -> bool:
    """argparse type for the CompVis boolean flags (``-t``, ``--no-test``, ``--scale_lr True``)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune InstructPix2Pix DreamBooth-style (CompVis main.py flags on Lightning 2). "
        "Extra arguments of the form a.b=c override the merged config.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for the log dir")
    parser.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?",
                        help="resume from a log dir or from a checkpoint inside <logdir>/checkpoints")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                        help="configs, merged left to right; then a.b=c overrides")
    parser.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    parser.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?",
                        help="skip testing after training (only runs when the config has a test set)")
    parser.add_argument("-s", "--seed", type=int, default=None,
                        help=f"seed for everything (default: the config's top-level 'seed', else {DEFAULT_SEED}; "
                        "a resumed run keeps its own)")
    parser.add_argument("-f", "--postfix", type=str, default="", help="appended to the log dir name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="root folder of the log dirs")
    parser.add_argument("--scale_lr", type=str2bool, const=True, default=False, nargs="?",
                        help="lr = accumulate_grad_batches * devices * nodes * batch_size * base_learning_rate")
    parser.add_argument("--datadir_in_name", type=str2bool, const=True, default=False, nargs="?",
                        help="prefix the log dir name with the data folder's name")
    parser.add_argument("--actual_resume", type=str, default=None,
                        help="initial weights (.ckpt/.safetensors, original layout), e.g. the InstructPix2Pix checkpoint")
    parser.add_argument("--init_ema", action="store_true",
                        help="start from the EMA UNet weights of --actual_resume instead of its training weights")
    parser.add_argument("--data_root", type=str, action="append", default=None,
                        help="folder of training pairs (also validation); repeat it to train on the pairs of several "
                             "folders, read one after the other")
    parser.add_argument("--reg_data_root", type=str, default=None, help="folder of regularization pairs")
    parser.add_argument("--class_word", type=str, default=None, help="class noun of the subject, e.g. dog")
    parser.add_argument("--identifier", type=str, default=None, help="rare token meaning the subject (default sks)")
    parser.add_argument("--source_word", type=str, default=None, help="the class the edits replace, e.g. wolf")
    parser.add_argument("--gpus", type=str, default=None, help="GPU ids, e.g. '0,' or '0,1' (DDP for several)")
    parser.add_argument("--num_nodes", type=int, default=None, help="nodes for multi-node DDP")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps to train")
    parser.add_argument("--precision", type=str, default=None, choices=PRECISIONS, help="Lightning precision")
    parser.add_argument("--export_ema", type=str2bool, const=True, default=None, nargs="?",
                        help="export the EMA weights (default: EMA when the model keeps one)")
    memory = parser.add_argument_group(
        "fitting in GPU memory",
        "each of these writes into the run's config (model.params.*), so a resumed run keeps it")
    memory.add_argument("--lora_rank", type=int, default=None,
                        help="train LoRA adapters of this rank instead of the UNet weights (model.params.lora_config); "
                        "the run ends with export/lora.safetensors (kohya/A1111 layout)")
    memory.add_argument("--lora_alpha", type=float, default=None,
                        help="LoRA alpha (scale alpha/rank; unset: the rank)")
    memory.add_argument("--lora_targets", type=str, default=None,
                        help="comma-separated UNet module names to adapt "
                        "(unset: to_q,to_k,to_v,to_out.0, i.e. every attention)")
    memory.add_argument("--lora_text_encoder", type=str2bool, const=True, default=None, nargs="?",
                        help="also put adapters on the text encoder's attention "
                        "(otherwise it stays frozen in a LoRA run)")
    memory.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="adamw8bit keeps AdamW's two moments in 8 bits (bitsandbytes): 6 bytes less per trained "
                        "parameter (model.params.optimizer; unset: adamw)")
    memory.add_argument("--gradient_checkpointing", type=str2bool, const=True, default=None, nargs="?",
                        help="recompute UNet activations in the backward pass "
                        "(model.params.unet_config.params.use_checkpoint)")
    memory.add_argument("--frozen_dtype", choices=("fp16", "bf16"), default=None,
                        help="hold the frozen VAE (and a frozen text encoder) in half precision "
                        "(model.params.frozen_dtype)")
    memory.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet in place (same checkpoint keys; the first steps compile)")
    memory.add_argument("--strategy", type=str, default=None,
                        help="Lightning strategy (lightning.trainer.strategy): ddp, fsdp (CUDA only), "
                        "deepspeed_stage_2 (deepspeed must be installed), ...")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = get_parser()
    opt, unknown = parser.parse_known_args(argv)
    bad = [u for u in unknown if "=" not in u or u.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like model.params.reg_weight=0)")
    if opt.name and opt.resume:
        parser.error("-n/--name and -r/--resume cannot be used together: a resumed run keeps its name")
    if opt.max_steps is not None and opt.max_steps < 1:
        parser.error(f"--max_steps must be positive, got {opt.max_steps}")
    return opt, unknown


def resolve_resume(resume: str) -> tuple[Path, Path]:
    """``-r`` value → (log dir, checkpoint); a log dir means its ``checkpoints/last.ckpt``."""
    path = Path(resume)
    if not path.exists():
        raise UsageError(f"--resume {resume}: no such file or folder")
    if path.is_file():
        if path.parent.name != "checkpoints":
            raise UsageError(f"--resume {resume}: a checkpoint must sit in <logdir>/checkpoints/")
        return path.parent.parent, path
    ckpt = path / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UsageError(f"--resume {resume}: no checkpoints/last.ckpt in this log dir")
    return path, ckpt


def load_configs(paths: list[str], overrides: list[str]) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    configs = []
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"config not found: {path}")
        try:
            configs.append(OmegaConf.load(path))
        except (OmegaConfBaseException, ValueError) as err:
            raise UsageError(f"cannot parse config {path}: {err}") from err
    try:
        return OmegaConf.merge(*configs, OmegaConf.from_dotlist(overrides))
    except (OmegaConfBaseException, ValueError) as err:
        raise UsageError(f"bad config override {' '.join(overrides)}: {err}") from err


def apply_data_flags(config: Any, opt: argparse.Namespace) -> None:
    """Write --data_root, --reg_data_root, --class_word, --identifier, --source_word into the dataset configs."""
    sections = config.get("data", {}).get("params", {})
    train_roots = opt.data_root[0] if opt.data_root and len(opt.data_root) == 1 else opt.data_root
    roots = {"train": train_roots, "validation": train_roots, "reg": opt.reg_data_root}
    words = {"placeholder_token": opt.class_word, "identifier": opt.identifier, "source_word": opt.source_word}
    given = [("--data_root", root) for root in opt.data_root or []] + [("--reg_data_root", opt.reg_data_root)]
    for flag, folder in given:
        if folder is not None and not Path(folder).is_dir():
            raise UsageError(f"{flag} {folder}: no such folder")
    for name in ("train", "reg", "validation"):
        if name not in sections:
            continue
        params = sections[name].setdefault("params", {})
        if roots[name] is not None:
            params["data_root"] = roots[name]
        for key, value in words.items():
            if value is not None:
                params[key] = value
    if opt.identifier is not None:
        from ldm.modules.encoders.identifier import warn_about_identifier

        warn_about_identifier(opt.identifier)
    if "reg" in sections and opt.reg_data_root is None and "data_root" not in sections.reg.get("params", {}):
        raise UsageError("the config has a regularization set: pass --reg_data_root (or remove data.params.reg)")
    if "train" in sections and opt.data_root is None and "data_root" not in sections.train.get("params", {}):
        raise UsageError("pass --data_root with the training pairs")


def apply_model_flags(config: Any, opt: argparse.Namespace) -> None:
    """Write the memory flags (LoRA, optimizer, gradient checkpointing, frozen dtype) into ``model.params``."""
    from omegaconf import OmegaConf

    if "model" not in config:
        return
    params = config.model.setdefault("params", {})
    lora = {"rank": opt.lora_rank, "alpha": opt.lora_alpha, "text_encoder": opt.lora_text_encoder,
            "targets": [t.strip() for t in opt.lora_targets.split(",") if t.strip()] if opt.lora_targets else None}
    given = {key: value for key, value in lora.items() if value is not None}
    if given:
        if opt.lora_rank is None and params.get("lora_config") is None:
            raise UsageError("--lora_alpha, --lora_targets and --lora_text_encoder need --lora_rank "
                             "(or a model.params.lora_config in the config)")
        if opt.lora_rank is not None and opt.lora_rank < 1:
            raise UsageError(f"--lora_rank must be at least 1, got {opt.lora_rank}")
        if opt.lora_targets is not None and not given.get("targets"):
            raise UsageError(f"--lora_targets {opt.lora_targets!r}: name at least one module, e.g. to_q,to_v")
        merged = OmegaConf.to_container(params.get("lora_config") or OmegaConf.create(), resolve=True)
        params["lora_config"] = {**merged, **given}
    if opt.optimizer is not None:
        params["optimizer"] = opt.optimizer
    if opt.frozen_dtype is not None:
        params["frozen_dtype"] = opt.frozen_dtype
    if opt.gradient_checkpointing is not None:
        if "unet_config" not in params:
            raise UsageError("--gradient_checkpointing: the config has no model.params.unet_config")
        params.unet_config.setdefault("params", {})["use_checkpoint"] = bool(opt.gradient_checkpointing)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def check_unchanged(saved: Any, now: Any, where: str) -> None:
    """A resumed run keeps its configs: name every value the flags, -b configs or overrides would change."""
    from omegaconf import OmegaConf

    before = flatten(OmegaConf.to_container(saved, resolve=True))
    after = flatten(OmegaConf.to_container(now, resolve=True))
    changed = [key for key in sorted(set(before) | set(after))
               if before.get(key) != after.get(key) and key not in RESUMABLE_CHANGES]
    if changed:
        lines = [f"{key}: {before.get(key, '<unset>')!r} in the run, {after.get(key, '<unset>')!r} now" for key in changed]
        raise UsageError(f"--resume keeps the run's settings ({where}), but these would change:\n  " + "\n  ".join(lines)
                         + "\nleave those flags out to continue the run, or start a new run with them")


def main(argv: list[str] | None = None) -> int:
    opt, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The frozen VAE (and text encoder) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Lightning's own pytree code uses a class torch deprecates: nothing a user of main.py can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    return exit_status(run, opt, overrides)


def check_something_to_do(opt: argparse.Namespace, config: Any) -> None:
    """Without -t there must be a test set to run (and no --no-test)."""
    if not opt.train and (opt.no_test or "test" not in config.get("data", {}).get("params", {})):
        raise UsageError("nothing to do: pass -t/--train to train (or resume training with -r LOGDIR -t)")


def resolve_run(opt: argparse.Namespace, overrides: list[str], now: str
                ) -> tuple[Path, Path | None, Any, Any, dict[str, Any], int]:
    """(log dir, checkpoint to resume or None, config, lightning config, Trainer settings, seed) for a new or a
    resumed run.

    A new run takes its seed from ``--seed``, else the config's top-level ``seed``, else 23, and records it in the
    saved config. A resumed run takes config, seed and devices from its log dir; flags that would change them are
    an error (`check_unchanged`), except ``--max_steps``.
    """
    from omegaconf import OmegaConf

    if not opt.resume:
        if not opt.base:
            raise UsageError("give at least one config with -b/--base (e.g. configs/dreambooth/train.yaml)")
        name = "_" + opt.name if opt.name else "_" + Path(opt.base[0]).stem
        prefix = Path(os.path.normpath(opt.data_root[0])).name if opt.datadir_in_name and opt.data_root else ""
        logdir = Path(opt.logdir) / f"{prefix}{now}{name}{opt.postfix}"
        config = load_configs(opt.base, overrides)
        check_something_to_do(opt, config)
        lightning_config = config.pop("lightning", OmegaConf.create())
        apply_data_flags(config, opt)
        apply_model_flags(config, opt)
        seed = opt.seed if opt.seed is not None else int(config.get("seed", DEFAULT_SEED))
        config.seed = seed
        if opt.actual_resume is not None:
            if not Path(opt.actual_resume).is_file():
                raise UsageError(f"--actual_resume {opt.actual_resume}: no such file")
            config.model.params.ckpt_path = str(opt.actual_resume)
            config.model.params.init_from_ema = bool(opt.init_ema)
        settings = trainer_settings(opt, lightning_config)
        # Record the resolved devices and precision, so that a resumed run can keep them.
        for key in ("accelerator", "devices", "strategy", "precision", "num_nodes", "max_steps"):
            if key in settings:
                OmegaConf.update(lightning_config, f"trainer.{key}", settings[key], force_add=True)
        return logdir, None, config, lightning_config, settings, seed

    logdir, resume_ckpt = resolve_resume(opt.resume)
    saved_paths = [sorted(glob.glob(str(logdir / "configs" / f"*-{kind}.yaml")))[-1:] for kind in ("project", "lightning")]
    if not saved_paths[0]:
        raise UsageError(f"--resume {opt.resume}: no configs/*-project.yaml in {logdir}")
    saved = load_configs(saved_paths[0] + saved_paths[1], [])
    config = load_configs(saved_paths[0] + saved_paths[1] + list(opt.base), overrides)
    check_something_to_do(opt, config)
    apply_data_flags(config, opt)
    apply_model_flags(config, opt)
    saved_lightning = saved.pop("lightning", OmegaConf.create())
    lightning_config = config.pop("lightning", OmegaConf.create())
    saved_settings, settings = trainer_settings(argparse.Namespace(**{**vars(opt), "gpus": None, "num_nodes": None,
                                                                      "precision": None, "max_steps": None,
                                                                      "strategy": None}),
                                                saved_lightning), trainer_settings(opt, lightning_config)
    check_unchanged(saved, config, f"{saved_paths[0][0]} and the flags given now")
    check_unchanged(OmegaConf.create({"lightning": {"trainer": saved_settings}}),
                    OmegaConf.create({"lightning": {"trainer": settings}}), "its devices and precision")
    if "seed" in config:
        seed = int(config.seed)
        if opt.seed is not None and opt.seed != seed:
            raise UsageError(f"--seed {opt.seed}: the run {logdir} was started with seed {seed}, which a resumed run "
                             "keeps; leave out --seed")
    else:  # runs from before the seed was recorded
        seed = opt.seed if opt.seed is not None else DEFAULT_SEED
        logger.warning("%s records no seed: resuming with --seed %d", saved_paths[0][0], seed)
        config.seed = seed
    config.model.params.pop("ckpt_path", None)  # the checkpoint restores every weight
    return logdir, resume_ckpt, config, lightning_config, settings, seed


def run_timestamp() -> str:
    """This run's timestamp; DDP re-runs this script for the other ranks, which reuse the first rank's (one log dir)."""
    now = os.environ.get(RUN_TIMESTAMP_ENV) or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    os.environ[RUN_TIMESTAMP_ENV] = now
    return now


def build_model(config: Any, lr: float, seed: int, compile_unet: bool) -> Any:
    """The model of ``config.model``, trained at ``lr`` with noise drawn from ``seed``; ``compile_unet``: compiled."""
    from ldm.util import instantiate_from_config

    model = instantiate_from_config(config.model, learning_rate=lr, train_seed=seed)
    if compile_unet:
        from ldm.editing import compile_unet as compile_model

        compile_model(model)
    return model


def build_callbacks(opt: argparse.Namespace, now: str, logdir: Path, config: Any, lightning_config: Any) -> list[Any]:
    """Run setup, checkpoints (``lightning.modelcheckpoint``), LR monitor, progress bar and the config's callbacks."""
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar

    from ldm.util import instantiate_from_config

    ckptdir, cfgdir = logdir / "checkpoints", logdir / "configs"
    checkpoint_params = OmegaConf.to_container(
        OmegaConf.select(lightning_config, "modelcheckpoint.params", default=OmegaConf.create()), resolve=True
    )
    checkpoint = StepCheckpoint(**{"dirpath": str(ckptdir), "filename": "{step:06d}", "save_last": True,
                                   "save_top_k": -1, "every_n_train_steps": 500, **checkpoint_params})
    callbacks: list[Any] = [
        SetupCallback(bool(opt.resume), now, str(logdir), str(ckptdir), str(cfgdir), config, lightning_config),
        checkpoint,
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(),
    ]
    for cb_config in lightning_config.get("callbacks", {}).values():
        params = {"save_dir": str(logdir)} if cb_config.get("target", "").endswith("ImageLogger") else {}
        callbacks.append(instantiate_from_config(cb_config, **params))
    return callbacks


def build_loggers(logdir: Path) -> list[Any]:
    """``metrics.csv`` (kept across resumes), and TensorBoard when it is installed."""
    loggers: list[Any] = [ResumingCSVLogger(save_dir=str(logdir), name="", version="")]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger

        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(save_dir=str(logdir), name="tensorboard", version=""))
    except ImportError:
        pass
    return loggers


def export_trained(model: Any, logdir: Path, config: Any, ema: bool | None) -> None:
    """Write ``export/lora.safetensors`` (a LoRA run) or ``export/model.safetensors`` (the fine-tuned weights)."""
    from omegaconf import OmegaConf

    from ldm.export import export_lora, export_weights

    if getattr(model, "lora", None) is not None:
        export = export_lora(model, logdir / "export" / "lora.safetensors", ema=ema)
        logger.info("LoRA adapter: %s (apply it with scripts/edit_cli.py --lora, or merge it with "
                    "scripts/export.py --merge)", export)
    else:
        export = export_weights(model, logdir / "export" / "model.safetensors", ema=ema,
                                config=OmegaConf.to_yaml(config))
        logger.info("fine-tuned weights: %s", export)


def run(opt: argparse.Namespace, overrides: list[str]) -> int:
    import pytorch_lightning as pl

    from ldm.util import instantiate_from_config

    now = run_timestamp()
    logdir, resume_ckpt, config, lightning_config, settings, seed = resolve_run(opt, overrides, now)
    has_test = "test" in config.get("data", {}).get("params", {})
    if "model" not in config:
        raise UsageError(f"no 'model' section in {', '.join(opt.base) or opt.resume}")
    pl.seed_everything(seed, workers=True)

    data = instantiate_from_config(config.data, seed=seed)
    data.prepare_data()  # builds and validates the datasets: every bad file is reported before the model loads
    model = build_model(config, learning_rate(config, settings, opt.scale_lr), seed, opt.compile)
    callbacks = build_callbacks(opt, now, logdir, config, lightning_config)
    trainer = pl.Trainer(**settings, default_root_dir=str(logdir), logger=build_loggers(logdir), callbacks=callbacks,
                         plugins=[AtomicCheckpointIO()], log_every_n_steps=1)
    if opt.train:
        trainer.fit(model, data, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
        if trainer.global_rank == 0 and not trainer.interrupted:
            export_trained(model, logdir, config, opt.export_ema)
    if not opt.no_test and has_test and not trainer.interrupted:
        trainer.test(model, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
