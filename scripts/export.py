#!/usr/bin/env python
"""Export the weights of a checkpoint (e.g. ``logs/<run>/checkpoints/last.ckpt``) as a safetensors file.

    python scripts/export.py logs/<run>/checkpoints/last.ckpt my_dog.safetensors [--ema | --no-ema]
    python scripts/export.py logs/<lora run>/checkpoints/last.ckpt my_dog_lora.safetensors          # the adapter
    python scripts/export.py logs/<lora run>/checkpoints/last.ckpt my_dog.safetensors --merge       # base + adapter
    python scripts/export.py base.ckpt merged.safetensors --merge --lora a.safetensors --lora-scale 0.8

The output holds the weights alone, in the original CompVis key layout (no optimizer state, no EMA copy): the UNet
weights are the EMA ones with --ema (default: when the checkpoint has them; with --lora files, the weights they were
trained on, when they record it). ``scripts/edit_cli.py`` loads it directly.
A LoRA run's checkpoint exports its adapter (kohya/A1111 layout, as the run's ``export/lora.safetensors``), or with
--merge the full weights with the adapter merged in. ``--merge --lora FILE`` merges LoRA files into any weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.cli import add_ema_args, add_lora_args, check_lora_args, exit_status  # noqa: E402
from ldm.errors import UsageError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="input .ckpt or .safetensors")
    parser.add_argument("output", help="output .safetensors")
    add_ema_args(parser, "export")
    parser.add_argument("--merge", action="store_true",
                        help="write full weights with the LoRA adapters merged in: those of a LoRA run's checkpoint "
                        "and the --lora files (W += scale * alpha/rank * up @ down)")
    add_lora_args(parser, "LoRA file to merge (with --merge)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    if args.lora and not args.merge:
        parser.error("--lora files are merged into the weights: add --merge")
    check_lora_args(parser, args)
    if Path(args.output).suffix != ".safetensors":
        parser.error(f"output must end in .safetensors, got {args.output}")
    return args


def run(args: argparse.Namespace) -> int:
    from ldm.checkpoint import read_checkpoint, save_safetensors, unwrap_state_dict
    from ldm.export import weights_for_export
    from ldm.lora import (LoraSettings, apply_lora_files, is_peft_state, lora_metadata, lora_scales, merge_lora_,
                          recorded_base_ema, split_peft_state)

    output, source = Path(args.output), Path(args.checkpoint)
    if output.exists() and not args.overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    if output.resolve() == source.resolve():
        raise UsageError("output and input are the same file")
    scales = lora_scales(args.lora, args.lora_scale)
    checkpoint = read_checkpoint(source)
    state = unwrap_state_dict(checkpoint, str(source))
    metadata = {"format": "instruct2dream", "source": source.name}
    if is_peft_state(state):
        if "lora" not in checkpoint:
            raise UsageError(f"{source} holds LoRA adapters but not their settings: use the run's .ckpt checkpoint")
        saved = checkpoint["lora"]
        settings = LoraSettings.from_config({k: saved[k] for k in ("rank", "alpha", "targets", "text_encoder",
                                                                   "text_encoder_targets") if k in saved})
        state, adapter = split_peft_state(state, settings.lora_alpha, ema=bool(args.ema))
        if not args.merge:
            base = saved.get("base_checkpoint", {}) or {}
            save_safetensors(adapter, output, lora_metadata(settings, base.get("path"), base.get("sha256"),
                                                            base.get("ema"), source=source.name))
            print(output)
            return 0
        merge_lora_(state, adapter, 1.0, source=f"{source} (its adapter)")
        metadata["lora"] = "merged"
    else:
        if args.merge and not args.lora:
            raise UsageError(f"--merge: {source} has no LoRA adapters; name LoRA files with --lora")
        ema = args.ema if args.ema is not None or not args.lora else recorded_base_ema(args.lora)
        state = weights_for_export(state, ema)
    if args.lora:
        state = {k: v.clone() if v.is_floating_point() else v for k, v in state.items()}  # never write into the input
        apply_lora_files(state, args.lora, scales)
        metadata["lora"] = ", ".join(f"{Path(p).name}@{s:g}" for p, s in zip(args.lora, scales))
    save_safetensors(state, output, metadata)
    print(output)
    return 0


def main(argv: list[str] | None = None) -> int:
    return exit_status(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
