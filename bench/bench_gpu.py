"""Benchmark on one GPU: full-size InstructPix2Pix editing and fine-tuning, ours vs diffusers (not a test).

Random weights (no download): the model of ``configs/instruct-pix2pix/generate.yaml`` / ``configs/dreambooth/
train.yaml``; diffusers' pipeline gets the same weights through its own single-file converters (``tests/oracle.py``).

* edit: one 512x512 edit, 50 Euler steps, three-way guidance, same image and noise; fp32 and fp16 autocast, eager
  and ``torch.compile`` of the UNet (compile time = the first call's extra time); median of ``--repeats``.
* fine-tune: ``--train-steps`` DreamBooth steps at 256 px, batch 1 train + 1 reg (``joint_step``: one UNet call on
  both, as ``training_step``), prior-preservation sum, AdamW; full fine-tune fp32 and bf16 autocast, with and without
  gradient checkpointing; seconds per step and peak CUDA memory (``torch.cuda.max_memory_allocated``).

    python bench/bench_gpu.py --out bench/gpu-out/bench_gpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.data.transforms import image_to_tensor  # noqa: E402
from ldm.editing import edit_latents  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from tests.oracle import diffusers_ip2p_pipeline  # noqa: E402
from tests.tiny import randomize_  # noqa: E402

PROMPT = "replace the wolf with a sks dog"


def build(config_path: Path, device: torch.device, **params: Any) -> tuple[Any, Any]:
    config = OmegaConf.load(config_path)
    config.model.params.pop("ckpt_path", None)
    config.model.params.update(use_ema=False, **params)
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(config.model)).to(device)
    return model, config


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` later calls), in seconds, CUDA-synchronized."""
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def edit_rows(args: argparse.Namespace, device: torch.device) -> list[str]:
    from PIL import Image

    steps, repeats, size = args.edit_steps, args.repeats, args.edit_size
    model, config = build(Path(args.edit_config), device)
    model.eval()
    with tempfile.TemporaryDirectory() as workdir:
        pipe = diffusers_ip2p_pipeline(model, config, workdir, image_size=size).to(device)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (size, size), (120, 60, 200))
    noise = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    rows = []
    for precision, mode in (m.split(":") for m in args.modes):
        def ours() -> None:
            edit_latents(model, image_to_tensor(image)[None].to(device), [PROMPT], [7.5], [1.5], [0], steps=steps,
                         sampler="euler", precision=precision, initial_noise=noise.to(device))

        def theirs() -> None:
            autocast = torch.autocast(device.type, dtype=torch.float16) if precision == "fp16" else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                pipe(prompt=PROMPT, image=image, num_inference_steps=steps, guidance_scale=7.5,
                     image_guidance_scale=1.5, latents=noise.clone().to(device), output_type="latent")

        if mode == "compiled":
            model.model.diffusion_model = torch.compile(model.model.diffusion_model)
            pipe.unet = torch.compile(pipe.unet)
        (first_a, a), (first_b, b) = timed(ours, repeats), timed(theirs, repeats)
        rows.append(f"| edit {size} px, {steps} steps | {precision} {mode} | {a:.3f} s | {b:.3f} s | {a / b:.2f} | "
                    f"{first_a - a:.1f} s / {first_b - b:.1f} s |")
        if mode == "compiled":  # back to the eager modules
            model.model.diffusion_model = model.model.diffusion_model._orig_mod
            pipe.unet = pipe.unet._orig_mod
    del model, pipe
    return rows


def train_rows(args: argparse.Namespace, device: torch.device) -> list[str]:
    steps, size = args.train_steps, args.train_size
    rows = []
    cases = [("full, fp32", {}, None), ("full, bf16 autocast", {}, torch.bfloat16),
             ("full, fp32 + gradient checkpointing", {"use_checkpoint": True}, None),
             ("full, bf16 + gradient checkpointing", {"use_checkpoint": True}, torch.bfloat16)]
    for label, unet_params, dtype in cases:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        config = OmegaConf.load(args.train_config)
        config.model.params.unet_config.params.update(unet_params)
        config.model.params.pop("ckpt_path", None)
        config.model.params.update(use_ema=False)
        torch.manual_seed(0)
        model = randomize_(instantiate_from_config(config.model)).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        generator = torch.Generator().manual_seed(0)

        def batch() -> dict[str, Any]:
            return {"image": torch.rand(1, 3, size, size, generator=generator).to(device) * 2 - 1,
                    "c_concat": torch.rand(1, 3, size, size, generator=generator).to(device) * 2 - 1,
                    "caption": [PROMPT]}

        def step(i: int) -> None:
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                generators = torch.Generator().manual_seed(2 * i), torch.Generator().manual_seed(2 * i + 1)
                (loss_train, _), (loss_reg, _) = model.joint_step(batch(), batch(), generators)
            (loss_train + loss_reg).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(0)
        sync()
        start = time.perf_counter()
        for i in range(1, steps + 1):
            step(i)
        sync()
        per_step = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append(f"| fine-tune {size} px, batch 1+1 | {label} | {per_step * 1000:.0f} ms | {peak:.1f} GiB |")
        del model, optimizer, params
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    parser.add_argument("--edit-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--modes", nargs="+", default=["fp32:eager", "fp16:eager", "fp16:compiled"],
                        help="edit cases, precision:mode with precision fp32|fp16 and mode eager|compiled")
    parser.add_argument("--skip", nargs="*", default=[], choices=["edit", "train"])
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a dry run with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and sizes (dry run of the code paths)")
    args = parser.parse_args()
    full = not args.tiny
    args.edit_config = REPO / "configs" / ("instruct-pix2pix/generate.yaml" if full else "tiny/ip2p-tiny.yaml")
    args.train_config = REPO / "configs" / ("dreambooth/train.yaml" if full else "tiny/dreambooth-tiny.yaml")
    args.edit_size, args.train_size = (512, 256) if full else (64, 64)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: CUDA is not available (use --device cpu --tiny for a dry run)")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    lines = [f"{name}, torch {torch.__version__}", ""]
    if "edit" not in args.skip:
        lines += ["| job | precision, mode | ours | diffusers | ours / diffusers | compile time ours / diffusers |",
                  "|---|---|---|---|---|---|", *edit_rows(args, device), ""]
    if "train" not in args.skip:
        lines += ["| job | configuration | time per step | peak CUDA memory |", "|---|---|---|---|",
                  *train_rows(args, device)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
