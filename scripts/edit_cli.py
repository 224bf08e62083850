#!/usr/bin/env python
"""Edit images with an InstructPix2Pix model (the released checkpoint or one fine-tuned with main.py).

    python scripts/edit_cli.py --input photo.jpg --output out.png --edit "replace the wolf with a sks dog"
    python scripts/edit_cli.py --input photos/ --output edited/ --edit "make it snowy" --seed 42
    python scripts/edit_cli.py --input "photos/*.jpg" --output sweep/ --edit "..." --cfg-text 5 7.5 --cfg-image 1.2 1.5
    python scripts/edit_cli.py --input photo.jpg --output out.png --edit "replace the wolf with a sks dog" \
        --contrast "replace the wolf with a dog"

A list of guidance scales edits every image once per (text, image) pair and also writes a labelled grid. Every
output PNG records its settings (seed included) in a text chunk named ``instruct2dream``. Inputs are never
overwritten; existing outputs only with --overwrite. ``--contrast`` adds contrast guidance: what the instruction asks
beyond the contrast instruction (the identifier beyond the class word) is amplified by ``--cfg-contrast``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.cli import (CONTRAST_MIN_SIGMA, DEFAULT_CFG_CONTRAST, HelpFormatter, add_lora_args,  # noqa: E402
                     add_model_args, add_sampling_args, check_lora_args, check_sampling_args, contrast_settings,
                     run_cli)
from ldm.errors import UsageError  # noqa: E402


@dataclass(frozen=True)
class Job:
    """One edit: an input image under one pair of guidance scales, written to ``output``."""

    source: Path
    cfg_text: float
    cfg_image: float
    output: Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Edit images following a text instruction (InstructPix2Pix, three-way classifier-free guidance).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--input", required=True, help="an image file, a folder of images, or a quoted glob pattern")
    parser.add_argument("--output", required=True, help="output image file (one input, one setting) or folder")
    parser.add_argument("--edit", required=True, help='the instruction, e.g. "replace the wolf with a sks dog"')
    add_model_args(parser, "model weights (.ckpt or .safetensors, original layout)")
    add_sampling_args(parser, sweep=True, seed=None, seed_help="random seed (default: drawn at random and recorded)")
    parser.add_argument("--contrast", default=None, metavar="TEXT",
                        help='contrast instruction, e.g. "replace the wolf with a dog" for a sks dog: adds '
                             '--cfg-contrast × (prediction for --edit − prediction for TEXT), one more model branch '
                             'per step')
    parser.add_argument("--cfg-contrast", type=float, default=None,
                        help=f"contrast guidance scale s_C (needs --contrast; default {DEFAULT_CFG_CONTRAST:g})")
    parser.add_argument("--contrast-min-sigma", type=float, default=None,
                        help="no contrast guidance at the steps below this noise level (needs --contrast; default "
                             f"{CONTRAST_MIN_SIGMA:g}: the last two of 12 steps, where it only exaggerates detail)")
    parser.add_argument("--batch-size", type=int, default=1, help="edits per model call (same-size images only)")
    add_lora_args(parser, "LoRA file (kohya/A1111 layout, e.g. a LoRA run's export/lora.safetensors) merged into "
                  "the weights at load; repeat for several")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    check_sampling_args(parser, args)
    check_lora_args(parser, args)
    check_contrast_args(parser, args)
    return args


def check_contrast_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--cfg-contrast`` / ``--contrast-min-sigma`` need ``--contrast``; fill the defaults."""
    if args.contrast is None:
        for flag in ("cfg_contrast", "contrast_min_sigma"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} needs --contrast")
        return
    if args.cfg_contrast is None:
        args.cfg_contrast = DEFAULT_CFG_CONTRAST
    if args.contrast_min_sigma is None:
        args.contrast_min_sigma = CONTRAST_MIN_SIGMA
    if args.contrast_min_sigma < 0:
        parser.error(f"--contrast-min-sigma must be at least 0, got {args.contrast_min_sigma}")


def plan_jobs(inputs: list[Path], output: str, cfg_text: list[float], cfg_image: list[float]) -> tuple[list[Job], dict]:
    """Decide every output path; returns the jobs and, for sweeps, ``{input: grid path}``."""
    from ldm.image_io import FORMATS

    combos = list(itertools.product(cfg_text, cfg_image))
    sweep = len(combos) > 1
    out = Path(output)
    single_file = out.suffix.lower() in FORMATS and not out.is_dir()  # the suffixes `save_image` writes
    if single_file and len(inputs) > 1:
        raise UsageError(f"--output {out} is a file name but --input has {len(inputs)} images: give a folder")
    stems: dict[str, Path] = {}
    for source in inputs:
        if source.stem in stems and not single_file:
            raise UsageError(f"inputs {stems[source.stem]} and {source} would write the same output name")
        stems[source.stem] = source
    jobs, grids = [], {}
    for source in inputs:
        if single_file:
            folder, stem, suffix = out.parent, out.stem, out.suffix
        else:
            folder, stem, suffix = out, source.stem, ".png"
        if sweep:
            grids[source] = folder / f"{stem}_grid{suffix}"
            for t, i in combos:
                jobs.append(Job(source, t, i, folder / f"{stem}_txt{t:g}_img{i:g}{suffix}"))
        else:
            jobs.append(Job(source, combos[0][0], combos[0][1], folder / f"{stem}{suffix}"))
    return jobs, grids


def check_outputs(jobs: list[Job], grids: dict, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to write over an input, ever, or over an existing output without ``--overwrite``."""
    targets = [job.output for job in jobs] + list(grids.values())
    sources = {p.resolve() for p in inputs}
    clashes = [t for t in targets if t.resolve() in sources]
    if clashes:
        raise UsageError(f"refusing to overwrite input image(s): {', '.join(map(str, clashes))}")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        shown = ", ".join(map(str, existing[:5])) + (" …" if len(existing) > 5 else "")
        raise UsageError(f"{len(existing)} output file(s) already exist ({shown}); pass --overwrite to replace them")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ldm.data.transforms import image_to_tensor, load_for_edit, tensor_to_image
    from ldm.editing import (compile_unet, decode_to_images, edit_latents, load_model, resolve_device,
                             resolve_precision, same_size_batches)
    from ldm.image_io import find_images, save_image
    from ldm.lora import lora_scales
    from ldm.visualization import labelled_grid

    scales = lora_scales(args.lora, args.lora_scale)
    missing = [path for path in args.lora if not Path(path).is_file()]
    if missing:
        raise UsageError(f"--lora {missing[0]}: no such file")
    inputs = find_images(args.input, "--input")
    jobs, grids = plan_jobs(inputs, args.output, args.cfg_text, args.cfg_image)
    check_outputs(jobs, grids, inputs, args.overwrite)
    # Read every image before the (slow) model load, so a bad file fails fast and by name.
    images = {p: load_for_edit(p, args.resolution) for p in inputs}

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    logging.info("seed %d, device %s, precision %s", seed, device, precision)
    loaded = load_model(args.config, args.ckpt, ema=args.ema, device=device, tokenizer=args.tokenizer,
                        loras=list(zip(args.lora, scales)))
    if args.compile:
        compile_unet(loaded.model)

    metadata_base = {
        "edit": args.edit, "seed": seed, "steps": args.steps, "sampler": args.sampler,
        "resolution": args.resolution, "ckpt": loaded.ckpt_path.name, "ema": loaded.used_ema,
    }
    metadata_base.update(contrast_settings(args.contrast, args.cfg_contrast, args.contrast_min_sigma, 0)[0])
    if args.lora:
        metadata_base["lora"] = [{"file": Path(path).name, "scale": scale} for path, scale in zip(args.lora, scales)]
    results: dict[Job, object] = {}
    # Same-size edits share a batch; the seed makes each edit independent of how it was batched.
    batches = same_size_batches(jobs, lambda job: images[job.source].size, args.batch_size)
    with tqdm(total=len(jobs), desc="editing", unit="image", disable=args.quiet) as bar:
        for batch in batches:
            pixels = torch.stack([image_to_tensor(images[job.source]) for job in batch]).to(device)
            latents = edit_latents(
                loaded.model, pixels, [args.edit] * len(batch), [j.cfg_text for j in batch],
                [j.cfg_image for j in batch], [seed] * len(batch), steps=args.steps, sampler=args.sampler,
                precision=precision, progress=not args.quiet and len(jobs) == 1,
                **contrast_settings(args.contrast, args.cfg_contrast, args.contrast_min_sigma, len(batch))[1],
            )
            for job, x in zip(batch, decode_to_images(loaded.model, latents, precision)):
                image = tensor_to_image(x)
                save_image(image, job.output, {**metadata_base, "cfg_text": job.cfg_text, "cfg_image": job.cfg_image,
                                               "input": job.source.name})
                results[job] = image
                bar.update(1)
    for source, grid_path in grids.items():
        cells = [job for job in jobs if job.source == source]
        ncols = len(set(job.cfg_image for job in cells))
        grid = labelled_grid([results[j] for j in cells], ncols, [f"T {j.cfg_text:g} I {j.cfg_image:g}" for j in cells])
        save_image(grid, grid_path, {**metadata_base, "cfg_text": args.cfg_text, "cfg_image": args.cfg_image,
                                     "input": source.name})
    for job in jobs:
        print(job.output)
    for grid_path in grids.values():
        print(grid_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
