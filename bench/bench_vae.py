"""Benchmark: our AutoencoderKL against diffusers' AutoencoderKL with the same weights (not a test).

Both models come from the same CompVis ``ddconfig``; diffusers gets our state dict (under the original
``first_stage_model.`` prefix) through its own single-file converters. Each case times ``encode`` (posterior
moments) and ``decode`` under ``inference_mode``, alternating the two models, and reports the median.
Prints a markdown table of times and ratios (ours / diffusers).

    .venv/bin/python bench/bench_vae.py              # tiny + full size (SD v1 VAE, 84 M parameters)
    .venv/bin/python bench/bench_vae.py --no-full    # tiny only
"""

from __future__ import annotations

import argparse
import copy
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

from ldm.models.autoencoder import AutoencoderKL  # noqa: E402

logger = logging.getLogger("bench_vae")

TINY = dict(  # f = 8, mid-block attention only (what diffusers' converter maps)
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
)  # fmt: skip
FULL = dict(  # SD v1 / InstructPix2Pix first_stage_config.ddconfig
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)  # fmt: skip


def build_pair(ddconfig: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our VAE (random weights, GroupNorm affines perturbed) and diffusers' VAE loaded from the converted dict."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    ours = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    prefixed = {f"first_stage_model.{k}": v.clone() for k, v in ours.state_dict().items()}
    ae_params = {"embed_dim": 4, "ddconfig": ddconfig}
    original_config = {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": {"params": ae_params}}}}
    config = create_vae_diffusers_config_from_ldm(copy.deepcopy(original_config), dict(prefixed))
    converted = convert_ldm_vae_checkpoint(dict(prefixed), config)
    theirs = DiffusersAutoencoderKL(**config).eval()
    theirs.load_state_dict(converted, strict=True)
    return ours.to(device), theirs.to(device)


def op_fns(
    ours: torch.nn.Module, theirs: torch.nn.Module, op: str, data: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """The two calls to time: posterior moments of an image batch, or images from a latent batch."""
    if op == "encode":
        return (lambda: ours.encode(data).parameters), (lambda: theirs.encode(data).latent_dist.parameters)
    return (lambda: ours.decode(data)), (lambda: theirs.decode(data).sample)


def time_pair(fns: tuple[Callable[[], Any], Callable[[], Any]], warmup: int, reps: int) -> tuple[float, float]:
    """Median seconds of each function, runs alternated so drifts hit both alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(reps):
            for fn, acc in zip(fns, times):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                acc.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def rel_diff(fns: tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]) -> float:
    """max |ours - diffusers| / max |diffusers| (sanity check that the same network is timed)."""
    with torch.inference_mode():
        a, b = fns[0](), fns[1]()
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-full", action="store_true", help="skip the full-size cases")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image sizes (pixels)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each full-size case")
    parser.add_argument("--tiny-reps", type=int, default=10, help="timed repetitions of each tiny case")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    device = torch.device(args.device)

    cases = [("tiny", TINY, 2, args.tiny_reps)]
    if not args.no_full:
        cases.append(("full", FULL, 1, args.reps))
    rows = []
    for name, ddconfig, warmup, reps in cases:
        start = time.perf_counter()
        ours, theirs = build_pair(ddconfig, device)
        logger.info("%s: built both models in %.1f s", name, time.perf_counter() - start)
        factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        for size in args.sizes:
            inputs = {
                "encode": torch.rand(1, 3, size, size, device=device) * 2 - 1,
                "decode": torch.randn(1, 4, size // factor, size // factor, device=device),
            }
            for op, data in inputs.items():
                fns = op_fns(ours, theirs, op, data)
                rel = rel_diff(fns)
                t_ours, t_theirs = time_pair(fns, warmup, reps)
                rows.append((name, size, op, t_ours, t_theirs, rel))
                logger.info("%s %d px %s: ours %.4f s, diffusers %.4f s", name, size, op, t_ours, t_theirs)
        del ours, theirs

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    lines = [
        f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads, {where}{load}, batch 1, fp32",
        "",
        "| model | pixels | op | ours (ms) | diffusers (ms) | ours / diffusers | rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size, op, t_ours, t_theirs, rel in rows:
        ms_ours, ms_theirs, ratio = t_ours * 1e3, t_theirs * 1e3, t_ours / t_theirs
        lines.append(f"| {name} | {size} | {op} | {ms_ours:.1f} | {ms_theirs:.1f} | {ratio:.2f} | {rel:.1e} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
