"""Benchmark: training-pair generation throughput (pairs per minute) of scripts/generate_dataset.py (not a test).

Runs the generator's own loop (`generate`: batched reverse edits, decode, two atomic PNG writes and one manifest
line per pair) on real photos from scikit-image, with models built from their configs with random weights (no
checkpoint file): the tiny test config, and the full-size InstructPix2Pix model (UNet 860 M + VAE + CLIP text
encoder, about 1.07 B parameters, 4.3 GB in fp32) at a small resolution. Model construction is timed apart.

    .venv/bin/python bench/bench_generate.py             # tiny + full size (full size needs ~10 GiB RAM)
    .venv/bin/python bench/bench_generate.py --no-full   # tiny only
    .venv/bin/python bench/bench_generate.py --device cuda --full-resolution 512 --full-steps 20
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.data.transforms import fit_for_edit  # noqa: E402
from ldm.editing import resolve_device  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from ldm.data.pair_generation import Pair, Photo, generate, pair_seed  # noqa: E402
from ldm.data.pair_store import PairStore  # noqa: E402

logger = logging.getLogger("bench_generate")


def build_model(config_path: Path, device: torch.device) -> tuple[Any, float, int]:
    """The model of ``config_path`` with random weights, on ``device``; returns it, build seconds, parameter count."""
    start = time.perf_counter()
    config = OmegaConf.load(config_path)
    config.model.params.pop("ckpt_path", None)
    config.model.params["use_ema"] = False
    model = instantiate_from_config(config.model).to(device).eval()
    return model, time.perf_counter() - start, sum(p.numel() for p in model.parameters())


def photos(resolution: int) -> dict[Path, Any]:
    """Three real photos (scikit-image) of different aspect ratios, fitted as the generator fits them."""
    from PIL import Image
    from skimage import data

    arrays = {"astronaut.png": data.astronaut(), "chelsea.png": data.chelsea(), "coffee.png": data.coffee()}
    return {Path(name): fit_for_edit(Image.fromarray(a), resolution) for name, a in arrays.items()}


def time_case(model: Any, resolution: int, steps: int, batch: int, count: int, device: torch.device) -> float:
    """Seconds per pair over ``count`` pairs (after one warm-up batch), written to a temporary output folder."""
    images = photos(resolution)
    names = list(images)
    record = {"steps": steps, "sampler": "euler_ancestral", "precision": "fp16" if device.type == "cuda" else "fp32",
              "cfg_text": 7.5, "cfg_image": 1.5}

    def plan(n: int, offset: int) -> list[Pair]:
        # Same-size batches: one photo per case keeps every batch full (the real run groups photos by size).
        photo = Photo("subject", names[0], "-")
        return [Pair(offset + i, photo, pair_seed(0, offset + i), "train", "replace the dog with a wolf",
                     "replace the wolf with a sks dog", "input") for i in range(n)]

    with tempfile.TemporaryDirectory() as tmp:
        folder = PairStore(Path(tmp) / "pairs")
        folder.open(force=False, photo_dirs=[])
        try:
            generate(model, plan(batch, 0), images, folder, record, batch, quiet=True)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(model, plan(count, batch), images, folder, record, batch, quiet=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / count
        finally:
            folder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-full", action="store_true", help="skip the full-size model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--tiny-resolution", type=int, default=256)
    parser.add_argument("--tiny-steps", type=int, default=20)
    parser.add_argument("--full-resolution", type=int, default=64)
    parser.add_argument("--full-steps", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8, help="timed pairs per case")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to time")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("generate_dataset").setLevel(logging.WARNING)
    device = resolve_device(args.device)
    torch.manual_seed(0)

    cases = [("tiny", REPO / "configs/tiny/ip2p-tiny.yaml", args.tiny_resolution, args.tiny_steps)]
    if not args.no_full:
        cases.append(("full", REPO / "configs/instruct-pix2pix/generate.yaml", args.full_resolution, args.full_steps))
    rows = []
    for name, config, resolution, steps in cases:
        model, build_s, params = build_model(config, device)
        logger.info("%s: %.0f M parameters, built in %.1f s", name, params / 1e6, build_s)
        size = photos(resolution)[Path("astronaut.png")].size
        for batch in args.batch:
            per_pair = time_case(model, resolution, steps, batch, max(args.pairs, batch), device)
            rows.append((name, params, f"{size[0]}x{size[1]}", steps, batch, per_pair, build_s))
            logger.info("%s batch %d: %.3f s per pair", name, batch, per_pair)
        del model

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {device.type} ({where}), "
        f"{torch.get_num_threads()} CPU threads",
        "",
        "| model | params | pair size | steps | batch | s / pair | pairs / min | build (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, params, size, steps, batch, per_pair, build_s in rows:
        lines.append(f"| {name} | {params / 1e6:.0f} M | {size} | {steps} | {batch} | {per_pair:.3f} | "
                     f"{60 / per_pair:.1f} | {build_s:.1f} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
