"""Benchmark: one InstructPix2Pix edit, ours vs diffusers' pipeline, same weights, steps and sampler (not a test).

Both sides run Euler sampling with three-way guidance on the same image and initial noise, alternating, in one
process; prints a markdown table of median times and the ratio ours / diffusers.

    .venv/bin/python bench/bench_edit.py            # tiny model, and the full-size UNet at a 32x32 latent
    .venv/bin/python bench/bench_edit.py --no-full
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.transforms import image_to_tensor  # noqa: E402
from ldm.editing import edit_latents  # noqa: E402
from tests.oracle import diffusers_ip2p_pipeline  # noqa: E402
from tests.tiny import build_tiny_model, tiny_config  # noqa: E402

FULL_UNET = dict(model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                 num_heads=8, context_dim=768)


def case(name: str, overrides: dict, pixels: int, steps: int, repeats: int) -> str:
    params = {"use_ema": False}
    config = tiny_config(**params)
    if overrides:
        config.model.params.unet_config.params.update(overrides)
        config.model.params.cond_stage_config.params.text_config.update(hidden_size=768, projection_dim=768,
                                                                        num_attention_heads=12, intermediate_size=3072)
    from ldm.util import instantiate_from_config
    from tests.tiny import randomize_

    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(config.model)).eval()
    with tempfile.TemporaryDirectory() as workdir:
        pipe = diffusers_ip2p_pipeline(model, config, workdir, image_size=pixels)
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    image = Image.new("RGB", (pixels, pixels), (120, 60, 200))
    noise = torch.randn(1, 4, pixels // 8, pixels // 8, generator=torch.Generator().manual_seed(0))
    prompt = "replace the wolf with a sks dog"

    def ours() -> None:
        edit_latents(model, image_to_tensor(image)[None], [prompt], [7.5], [1.5], [0], steps=steps, sampler="euler",
                     initial_noise=noise)

    def theirs() -> None:
        with torch.no_grad():
            pipe(prompt=prompt, image=image, num_inference_steps=steps, guidance_scale=7.5, image_guidance_scale=1.5,
                 latents=noise.clone(), output_type="latent")

    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    ours(), theirs()  # warm-up
    for _ in range(repeats):
        for label, fn in (("ours", ours), ("diffusers", theirs)):
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    a, b = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    return f"| {name} | {pixels}px ({pixels // 8}x{pixels // 8} latent), {steps} steps | {a:.3f} s | {b:.3f} s | {a / b:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-full", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    rows = [case("tiny", {}, 64, 10, args.repeats)]
    if not args.no_full:
        rows.append(case("full-size UNet", FULL_UNET, 256, 4, max(2, args.repeats // 2)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | input | ours | diffusers | ours / diffusers |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
