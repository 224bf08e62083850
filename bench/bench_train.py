"""Benchmark: one UNet training step (forward, MSE to a target, backward, AdamW), ours vs diffusers (not a test).

Same weights (diffusers gets ours through its own converter), same inputs, same optimizer settings, in one process.
Tiny and full-size UNet, 8x8 and 32x32 latents, gradient checkpointing on and off. For each case: median step time
of each model, the ratio ours / diffusers, and the peak RSS of each model's steps (VmHWM, reset between models).
The full-size models are built one after the other (both at once with their AdamW state would not fit in 24 GB).

    .venv/bin/python bench/bench_train.py             # tiny + full size (needs ~15 GB RAM, ~10 minutes on 2 cores)
    .venv/bin/python bench/bench_train.py --no-full
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_unet import FULL, TINY, build_pair, inputs  # noqa: E402
from procmem import peak_rss, reset_peak_rss  # noqa: E402


def train_steps(model: torch.nn.Module, is_ours: bool, args: tuple, steps: int) -> list[float]:
    """``steps`` timed AdamW steps after one untimed step (which allocates the optimizer state)."""
    x, t, c = args
    target = torch.randn(x.shape[0], 4, *x.shape[2:], generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        out = model(x, t, c) if is_ours else model(x, t, c).sample
        torch.nn.functional.mse_loss(out, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    del optimizer
    return times


def case(name: str, params: dict, size: int, checkpointing: bool, steps: int) -> str:
    params = {**params, "use_checkpoint": checkpointing}
    ours, theirs = build_pair(params)
    if checkpointing:
        theirs.enable_gradient_checkpointing()
    args = inputs(params, 1, size)
    results = {}
    for label, model, is_ours in (("ours", ours, True), ("diffusers", theirs, False)):
        gc.collect()
        reset_peak_rss()
        times = train_steps(model, is_ours, args, steps)
        results[label] = (statistics.median(times), peak_rss() / 2**30)
    del ours, theirs
    gc.collect()
    (a, ram_a), (b, ram_b) = results["ours"], results["diffusers"]
    ckpt = "on" if checkpointing else "off"
    return (f"| {name} | {size}x{size} | {ckpt} | {a:.3f} s | {b:.3f} s | {a / b:.2f} | {ram_a:.2f} GiB | "
            f"{ram_b:.2f} GiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-full", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = [case("tiny", copy.deepcopy(TINY), size, ckpt, args.steps) for size in (8, 32) for ckpt in (False, True)]
    if not args.no_full:
        rows += [case("full", copy.deepcopy(FULL), size, ckpt, max(2, args.steps // 2))
                 for size in (8, 32) for ckpt in (False, True)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1")
    print("| UNet | latent | grad. ckpt | ours | diffusers | ours / diffusers | peak RSS ours | peak RSS diffusers |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
