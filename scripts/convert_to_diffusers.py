#!/usr/bin/env python
"""Convert a checkpoint (original CompVis layout) to a diffusers InstructPix2Pix folder, tokenizer included.

    python scripts/convert_to_diffusers.py --ckpt logs/<run>/checkpoints/last.ckpt --out my_dog_diffusers
    python scripts/convert_to_diffusers.py --ckpt my_dog.safetensors --out my_dog_diffusers --half
    python scripts/convert_to_diffusers.py --ckpt base.ckpt --lora my_dog_lora.safetensors --lora-scale 0.8 --out out

The checkpoint is a training checkpoint, a file written by scripts/export.py, or the released InstructPix2Pix one;
it is loaded as scripts/edit_cli.py loads it (--ema/--no-ema, --lora, --tokenizer mean the same), then written with
diffusers' ``save_pretrained``. Load the folder offline with::

    StableDiffusionInstructPix2PixPipeline.from_pretrained(FOLDER)

Every component config is derived from --config, nothing is fetched. The scheduler is InstructPix2Pix's
(EulerAncestralDiscreteScheduler with the model's noise schedule). The folder is written under a temporary name and
renamed when complete; an existing non-empty folder is only replaced with --overwrite. Needs diffusers
(``pip install 'instruct2dream[convert]'``).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.cli import DEFAULT_CONFIG, HelpFormatter, add_ema_args, add_lora_args, check_lora_args, run_cli  # noqa: E402
from ldm.errors import MissingFileError, UsageError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--ckpt", required=True,
                        help="model weights (.ckpt or .safetensors, original layout): a training checkpoint, a "
                        "scripts/export.py output or the released InstructPix2Pix checkpoint")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="model config (YAML) the checkpoint belongs to")
    parser.add_argument("--out", required=True, help="diffusers folder to write")
    add_ema_args(parser, "convert")
    add_lora_args(parser, "LoRA file (kohya/A1111 layout) merged into the weights before converting; repeatable")
    parser.add_argument("--half", action="store_true", help="write float16 weights (half the size)")
    parser.add_argument("--tokenizer", default=None,
                        help="CLIP tokenizer (local folder or hub id) to use and save; default: the config's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    args = parser.parse_args(argv)
    check_lora_args(parser, args)
    return args


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder without ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def folder_written_atomically(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on error it is removed.

    An existing ``out`` is removed only once the new folder is in place (and put back if that fails).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_source(config, override: str | None) -> str:
    """The tokenizer our text encoder loads: --tokenizer, else the config's ``tokenizer``, else its ``version``."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    params = config.model.params.cond_stage_config.get("params") or {}
    default = inspect.signature(FrozenCLIPEmbedder).parameters["version"].default
    return str(override or params.get("tokenizer") or params.get("version") or default)


@contextmanager
def library_progress_bars(shown: bool) -> Iterator[None]:
    """transformers' and diffusers' own progress bars ("Writing model shards" on save) on or off inside the block,
    as they were after it."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    before = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        _show_progress_bars(library, shown)
    try:
        yield
    finally:
        for library, enabled in zip(libraries, before):
            _show_progress_bars(library, enabled)


def _show_progress_bars(library: ModuleType, enabled: bool) -> None:
    """``enable_progress_bar`` / ``disable_progress_bar`` of a transformers- or diffusers-style logging module."""
    (library.enable_progress_bar if enabled else library.disable_progress_bar)()


def run(args: argparse.Namespace) -> int:
    import torch
    from omegaconf import OmegaConf

    from ldm.diffusers_export import build_pipeline, check_convertible, import_diffusers
    from ldm.editing import load_model
    from ldm.lora import lora_scales
    from ldm.modules.encoders.tokenizer import load_clip_tokenizer

    out = Path(args.out)
    scales = lora_scales(args.lora, args.lora_scale)
    for path in [args.config, args.ckpt, *args.lora]:
        if not Path(path).is_file():
            raise MissingFileError(f"{path}: no such file")
    check_out(out, args.overwrite)
    config = OmegaConf.load(args.config)
    if "model" not in config:
        raise UsageError(f"{args.config}: no 'model' section")
    check_convertible(config)
    import_diffusers()
    source = tokenizer_source(config, args.tokenizer)
    with library_progress_bars(shown=not args.quiet), folder_written_atomically(out) as tmp:
        # The tokenizer first (a missing one fails fast), saved where the model then loads it from: the folder gets
        # the very tokenizer the converted text encoder was used with.
        try:
            tokenizer = load_clip_tokenizer(source)
        except (OSError, ValueError) as err:
            raise UsageError(f"tokenizer {source!r}: {err}") from err
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        logging.info("loading %s (config %s)", args.ckpt, args.config)
        loaded = load_model(args.config, args.ckpt, ema=args.ema, loras=list(zip(args.lora, scales)),
                            tokenizer=str(tmp / "tokenizer"))
        logging.info("converting to diffusers' layout (%s weights)", "float16" if args.half else "float32")
        pipeline = build_pipeline(loaded.model, config, torch.float16 if args.half else torch.float32)
        logging.info("writing %s", out)
        pipeline.save_pretrained(str(tmp))
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
