"""Benchmark: our UNetModel against diffusers' UNet2DConditionModel with the same weights (not a test).

Both models are built from the same CompVis UNet params; diffusers gets our state dict through its own
converters. Each case times forward (``no_grad``) and forward+backward, alternating the two models, and
reports the median. Prints a markdown table of times and ratios (ours / diffusers).

    .venv/bin/python bench/bench_unet.py             # tiny + full size (full size needs ~14 GiB RAM)
    .venv/bin/python bench/bench_unet.py --no-full   # tiny only
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

logger = logging.getLogger("bench_unet")

TINY = dict(
    image_size=32,
    in_channels=8,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    use_checkpoint=False,
    legacy=False,
)
FULL = dict(  # InstructPix2Pix generate.yaml unet_config, without gradient checkpointing
    image_size=32,
    in_channels=8,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    use_checkpoint=False,
    legacy=False,
)


def build_pair(params: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our UNet with noisy (non-zero) weights and diffusers' UNet loaded from the converted state dict."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    ours = UNetModel(**params)
    with torch.no_grad():
        for p in ours.parameters():
            if not p.any():  # zero-initialised layers: give them weights so outputs are non-trivial
                p.normal_(0.0, 0.02)
    prefixed = {f"model.diffusion_model.{k}": v.clone() for k, v in ours.state_dict().items()}
    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    config = create_unet_diffusers_config_from_ldm(original_config, prefixed, image_size=256)
    converted = convert_ldm_unet_checkpoint(dict(prefixed), config)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(converted, strict=True, assign=True)
    return ours.train(), theirs.train()


def inputs(params: dict[str, Any], batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (B, C_in, size, size), timesteps (B,), context (B, 77, D)."""
    x = torch.randn(batch, params["in_channels"], size, size)
    t = torch.linspace(10, 900, batch).long()
    c = torch.randn(batch, 77, params["context_dim"])
    return x, t, c


def step_fn(model: torch.nn.Module, is_ours: bool, args: tuple, backward: bool) -> Callable[[], None]:
    """One timed call: forward under no_grad, or forward + backward of the output's mean square."""
    x, t, c = args

    def run() -> None:
        if backward:
            out = model(x, t, c) if is_ours else model(x, t, c).sample
            out.float().square().mean().backward()
            for p in model.parameters():
                p.grad = None
        else:
            with torch.no_grad():
                model(x, t, c) if is_ours else model(x, t, c).sample

    return run


def time_pair(fns: tuple[Callable[[], None], Callable[[], None]], warmup: int, reps: int) -> list[list[float]]:
    """Seconds of each run of each function; runs alternate (and swap order) so drifts hit both alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[], []]
    for rep in range(reps):
        for k in (0, 1) if rep % 2 == 0 else (1, 0):
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return times


def fmt(times: list[float]) -> str:
    """Run times as a short list for the log."""
    return "[" + ", ".join(f"{t:.3f}" for t in times) + "]"


def check_parity(ours: torch.nn.Module, theirs: torch.nn.Module, args: tuple) -> float:
    """Relative max difference of the two outputs (sanity check that the same network is timed)."""
    with torch.no_grad():
        a = ours(*args)
        b = theirs(*args).sample
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-full", action="store_true", help="skip the full-size (860 M parameter) cases")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each full-size case")
    parser.add_argument("--tiny-reps", type=int, default=20, help="timed repetitions of each tiny case")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    cases: list[tuple[str, dict[str, Any], list[tuple[int, int]], int, int]] = [
        ("tiny", TINY, [(2, 8), (2, 32)], 3, args.tiny_reps)
    ]
    if not args.no_full:
        cases.append(("full", FULL, [(1, 8), (1, 32)], 1, args.reps))
    for name, params, shapes, warmup, reps in cases:
        start = time.perf_counter()
        ours, theirs = build_pair(params)
        logger.info("%s: built both models in %.1f s", name, time.perf_counter() - start)
        for batch, size in shapes:
            data = inputs(params, batch, size)
            rel = check_parity(ours, theirs, data)
            for backward in (False, True):
                fns = (step_fn(ours, True, data, backward), step_fn(theirs, False, data, backward))
                ours_times, theirs_times = time_pair(fns, warmup, reps)
                mode = "fwd+bwd" if backward else "fwd"
                shape = f"{batch}x{params['in_channels']}x{size}x{size}"
                rows.append((name, shape, mode, ours_times, theirs_times, rel))
                logger.info("%s %s %s: ours %s, diffusers %s s", name, shape, mode, fmt(ours_times), fmt(theirs_times))
        del ours, theirs

    lines = [
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "",
        "| model | input | pass | ours (s, median) | diffusers (s, median) | ours / diffusers | ratio of minima "
        "| rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, shape, mode, ours_times, theirs_times, rel in rows:
        t_ours, t_theirs = statistics.median(ours_times), statistics.median(theirs_times)
        min_ratio = min(ours_times) / min(theirs_times)
        lines.append(
            f"| {name} | {shape} | {mode} | {t_ours:.4f} | {t_theirs:.4f} | {t_ours / t_theirs:.2f} "
            f"| {min_ratio:.2f} | {rel:.1e} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
