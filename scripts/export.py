#!/usr/bin/env python
"""Export the weights of a checkpoint (e.g. ``logs/<run>/checkpoints/last.ckpt``) as a safetensors file.

    python scripts/export.py logs/<run>/checkpoints/last.ckpt my_dog.safetensors [--ema | --no-ema]

The output holds the weights alone, in the original CompVis key layout (no optimizer state, no EMA copy): the UNet
weights are the EMA ones with --ema (default: when the checkpoint has them). ``scripts/edit_cli.py`` loads it directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="input .ckpt or .safetensors")
    parser.add_argument("output", help="output .safetensors")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="export the EMA UNet weights")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="export the training UNet weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)

    from ldm.checkpoint import CheckpointError, load_state_dict_file, save_safetensors
    from ldm.export import weights_for_export

    output = Path(args.output)
    if output.suffix != ".safetensors":
        parser.error(f"output must end in .safetensors, got {output}")
    if output.exists() and not args.overwrite:
        print(f"error: {output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if output.resolve() == Path(args.checkpoint).resolve():
        print("error: output and input are the same file", file=sys.stderr)
        return 2
    try:
        state = weights_for_export(load_state_dict_file(args.checkpoint), args.ema)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_safetensors(state, output, {"format": "instruct2dream", "source": Path(args.checkpoint).name})
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
