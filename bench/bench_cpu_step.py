"""Benchmark: one DreamBooth fine-tuning step of the ShapesWorld model on the CPU, before and after the speed-ups.

Random weights from ``configs/shapesworld/personalize.yaml`` (no download), batch 4 subject pairs + 4 regularization
pairs at 64 px, full fine-tune (UNet and text encoder), AdamW. Cases, each adding one change:

* ``two calls``: a UNet call per batch, per-tensor AdamW (``foreach=False``), contiguous weights (before 2026-12-05)
* ``joint``: subject and prior batch in one UNet call (``joint_step``, what ``training_step`` does)
* ``joint + fused AdamW``: torch's fused AdamW kernel (what ``ldm.optim.build_optimizer`` picks on CPU and CUDA)
* ``joint + fused + channels_last``: ``model.params.channels_last`` (the ShapesWorld configs)

Median seconds per step over ``--steps`` after one warm-up step, and the ratio to the first case. Then the
``reg_weight=0`` step of the last case (the subject batch trained; the prior batch only logged, through a UNet call
without a graph) with the prior term computed on every step and on every 5th (``model.params.reg_log_every``):
mean seconds per step over ``--steps`` (not a test):

    python bench/bench_cpu_step.py --out bench/cpu-step.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.util import instantiate_from_config  # noqa: E402
from ldm.models.diffusion.losses import prior_preservation_loss  # noqa: E402

CASES = (("two calls", False, False, False), ("joint", True, False, False),
         ("joint + fused AdamW", True, True, False), ("joint + fused + channels_last", True, True, True))


def batch(generator: torch.Generator, caption: str, size: int = 4) -> dict:
    return {"image": torch.rand(size, 3, 64, 64, generator=generator) * 2 - 1,
            "c_concat": torch.rand(size, 3, 64, 64, generator=generator) * 2 - 1, "caption": [caption] * size}


def shapesworld_model(channels_last: bool = True) -> torch.nn.Module:
    """The ShapesWorld fine-tuning model with random weights (seed 0), in training mode."""
    config = OmegaConf.load(REPO / "configs/shapesworld/personalize.yaml").model
    config.params.channels_last = channels_last
    torch.manual_seed(0)
    return instantiate_from_config(config).train()


def timed_steps(optimizer: torch.optim.Optimizer, steps: int, step: Callable[..., None]) -> list[float]:
    """Seconds of ``steps`` training steps after one warm-up: ``step(i, train, reg, generators)`` (losses and
    backward) on fresh subject and prior batches, then the optimizer step."""
    data = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        train, reg = batch(data, "replace the circle with a sks star"), batch(data, "replace the circle with a star")
        generators = torch.Generator().manual_seed(2 * i), torch.Generator().manual_seed(2 * i + 1)
        start = time.perf_counter()
        step(i, train, reg, generators)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def seconds_per_step(joint: bool, fused: bool, channels_last: bool, steps: int) -> float:
    """Median seconds per prior-preservation step of one case of `CASES`."""
    model = shapesworld_model(channels_last)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True) if fused else torch.optim.AdamW(
        params, lr=1e-5, foreach=False)

    def step(i, train, reg, generators):
        if joint:
            (loss_train, _), (loss_reg, _) = model.joint_step(train, reg, generators)
        else:
            loss_train, _ = model.shared_step(train, generators[0])
            loss_reg, _ = model.shared_step(reg, generators[1])
        prior_preservation_loss(loss_train, loss_reg, 1.0).backward()

    return statistics.median(timed_steps(optimizer, steps, step))


def seconds_per_noreg_step(log_every: int, steps: int) -> float:
    """Mean seconds per ``reg_weight=0`` step (as `training_step` runs it) when the logged-only prior term is
    computed on every ``log_every``-th step; the ShapesWorld config's channels-last weights, fused AdamW."""
    model = shapesworld_model()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, fused=True)

    def step(i, train, reg, generators):
        model.shared_step(train, generators[0])[0].backward()
        if i % log_every == 0:
            with torch.no_grad():
                model.shared_step(reg, generators[1])

    return statistics.mean(timed_steps(optimizer, steps, step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps per case", "",
             "| case | s / step | ratio to 'two calls' |", "|---|---|---|"]
    first = None
    for name, joint, fused, channels_last in CASES:
        seconds = seconds_per_step(joint, fused, channels_last, args.steps)
        first = first or seconds
        lines.append(f"| {name} | {seconds:.3f} | {seconds / first:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", "| reg_weight=0, prior term logged on | s / step | ratio to 'every step' |", "|---|---|---|"]
    every = None
    for log_every in (1, 5):
        seconds = seconds_per_noreg_step(log_every, args.steps)
        every = every or seconds
        lines.append(f"| {'every step' if log_every == 1 else f'every {log_every}th step'} | {seconds:.3f} | "
                     f"{seconds / every:.2f} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
