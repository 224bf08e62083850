"""Command-line pieces the scripts share: model, sampling and LoRA flags, their checks, and the error exit."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from ldm.errors import UserError

DEFAULT_CKPT = "models/instruct-pix2pix/instruct-pix2pix-00-22000.ckpt"
DEFAULT_CONFIG = "configs/instruct-pix2pix/generate.yaml"
SAMPLER_NAMES = ("euler_ancestral", "euler", "ddim")  # ldm.editing.edit_latents (not imported: --help stays fast)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: ldm.editing.resolve_precision
DEFAULT_CFG_CONTRAST = 2.0  # the s_C chosen in ShapesWorld (docs/shapesworld.md, "Thirteenth session")
CONTRAST_MIN_SIGMA = 0.4  # ldm.editing.CONTRAST_MIN_SIGMA (not imported: --help stays fast)



def contrast_settings(contrast: str | None, cfg_contrast: float, min_sigma: float, batch: int) -> tuple[dict, dict]:
    """Contrast guidance of one edit call: (what the PNG metadata records, `ldm.editing.edit_latents` keyword
    arguments for ``batch`` images); both empty without a contrast instruction."""
    if not contrast:
        return {}, {}
    metadata = {"contrast": contrast, "cfg_contrast": cfg_contrast, "contrast_min_sigma": min_sigma}
    kwargs = {"contrast_prompts": [contrast] * batch, "contrast_scales": [cfg_contrast] * batch,
              "contrast_min_sigma": min_sigma}
    return metadata, kwargs

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows each option's default, except "not given" (None, or the empty list of a repeatable
    flag): there the help itself says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        not_given = action.default is None or action.default == []
        return action.help if not_given else super()._get_help_string(action)


def add_ema_args(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--ema`` / ``--no-ema`` (``args.ema``: True, False, or None for "EMA when the checkpoint has a complete
    copy"); ``verb`` says what is done with the weights ("use", "export", "convert")."""
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help=f"{verb} the checkpoint's EMA UNet weights (error if it has none); with neither flag: the "
                          "EMA weights when the checkpoint has a complete copy")
    ema.add_argument("--no-ema", dest="ema", action="store_false", default=None,
                     help=f"{verb} the checkpoint's training (non-EMA) UNet weights")


def add_model_args(parser: argparse.ArgumentParser, ckpt_help: str) -> None:
    """``--ckpt --config --device --precision --ema/--no-ema --compile --tokenizer`` (`ldm.editing.load_model`)."""
    parser.add_argument("--ckpt", default=DEFAULT_CKPT, help=ckpt_help)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="model config (YAML, target/params)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast precision; auto = fp16 on CUDA, fp32 elsewhere")
    add_ema_args(parser, "use")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (slow first call; pays off over many edits)")
    parser.add_argument("--tokenizer", default=None,
                        help="local CLIP tokenizer folder for offline machines (see README, 'Offline tokenizer')")


def add_sampling_args(parser: argparse.ArgumentParser, *, sweep: bool, seed: int | None, seed_help: str) -> None:
    """``--steps --resolution --cfg-text --cfg-image --sampler --seed`` (`ldm.editing.edit_latents`).

    ``sweep``: the guidance scales take several values (a list each).
    """
    parser.add_argument("--steps", type=int, default=100, help="sampling steps")
    parser.add_argument("--resolution", type=int, default=512,
                        help="about this many pixels on the long side; both sides become multiples of 64")
    scales = (("--cfg-text", 7.5, "text guidance scale s_T"), ("--cfg-image", 1.5, "image guidance scale s_I"))
    for flag, default, name in scales:
        if sweep:
            parser.add_argument(flag, type=float, nargs="+", default=[default],
                                help=f"{name}; several values make a sweep")
        else:
            parser.add_argument(flag, type=float, default=default, help=name)
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="euler_ancestral", help="sampler")
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)


def add_lora_args(parser: argparse.ArgumentParser, lora_help: str) -> None:
    """``--lora FILE`` (repeatable) and ``--lora-scale S`` (`ldm.lora.lora_scales`)."""
    parser.add_argument("--lora", action="append", default=[], metavar="FILE", help=lora_help)
    parser.add_argument("--lora-scale", type=float, action="append", default=[], metavar="S",
                        help="strength of the --lora files: one value for all, or one per --lora in order (default 1)")


def check_lora_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--lora-scale`` without ``--lora`` is a parser error."""
    if args.lora_scale and not args.lora:
        parser.error("--lora-scale needs --lora")


def check_sampling_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--steps``, ``--resolution`` and ``--batch-size`` (those the parser has) below their minimum are errors."""
    for name, minimum in (("steps", 1), ("resolution", 64), ("batch_size", 1)):
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def exit_status(run_fn: Callable[..., int], *args: Any) -> int:
    """``run_fn(*args)``; a `UserError` prints one line (``error: ...``) and gives exit status 2."""
    try:
        return run_fn(*args)
    except UserError as err:  # the user's input: the message alone; anything else is a bug and keeps its traceback
        sys.stderr.write(f"error: {err}\n")
        return 2


def run_cli(run_fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a CLI's ``run_fn(args)`` with logging set up (``--quiet``: warnings only) and `exit_status`."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    return exit_status(run_fn, args)
