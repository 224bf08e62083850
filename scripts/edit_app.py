#!/usr/bin/env python
"""Edit photos in the browser: a Gradio page over the same model and settings as ``scripts/edit_cli.py``.

    python scripts/edit_app.py --ckpt logs/<run>/export/model.safetensors          # then open http://127.0.0.1:7860
    python scripts/edit_app.py --ckpt base.ckpt --lora logs/<run>/export/lora.safetensors --port 8000

The model is loaded once, when the process starts; every edit reuses it (one at a time). Upload a photo, type the
instruction and run: the result is the edit at InstructPix2Pix's size for the photo (as edit_cli), downloadable as a
PNG whose ``instruct2dream`` text chunk records the settings, seed included. A CFG sweep edits once per pair of
listed text / image guidance scales and shows a labelled grid. Nothing is fetched from the network (no analytics, no
share link, no web fonts); the page is served on 127.0.0.1 unless ``--host`` says otherwise. Needs the ``app`` extra
(``pip install -e .[app]``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.cli import (CONTRAST_MIN_SIGMA, DEFAULT_CFG_CONTRAST, SAMPLER_NAMES, HelpFormatter,  # noqa: E402
                     add_lora_args, add_model_args, check_lora_args, check_sampling_args, contrast_settings, run_cli)
from ldm.errors import UsageError, UserError  # noqa: E402

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ldm.editing import LoadedModel

logger = logging.getLogger("edit_app")

MAX_SWEEP_TILES = 16
MAX_UPLOAD_SIZE = "100mb"  # bytes of one upload; the pixel count has its own limit (--max-megapixels)
SEED_MAX = 2**31 - 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Edit photos in the browser following a text instruction (InstructPix2Pix).",
        formatter_class=HelpFormatter,
    )
    add_model_args(parser, "model weights (.ckpt or .safetensors, original layout)")
    add_lora_args(parser, "LoRA file (kohya/A1111 layout) merged into the weights at load; repeat for several")
    parser.add_argument("--steps", type=int, default=100, help="the page's initial number of sampling steps")
    parser.add_argument("--resolution", type=int, default=512,
                        help="the page's initial edit size: about this many pixels on the long side")
    parser.add_argument("--max-megapixels", type=float, default=50.0,
                        help="refuse uploaded photos with more pixels than this (millions)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    check_sampling_args(parser, args)
    if args.max_megapixels <= 0:
        parser.error(f"--max-megapixels must be positive, got {args.max_megapixels}")
    check_lora_args(parser, args)
    return args


def parse_scales(text: str, what: str) -> list[float]:
    """``"5, 7.5 10"`` → ``[5.0, 7.5, 10.0]``: guidance scales separated by commas or spaces."""
    values = []
    for item in (part for part in re.split(r"[,\s]+", text.strip()) if part):
        try:
            values.append(float(item))
        except ValueError:
            raise UsageError(f"{what}: {item!r} is not a number (give values like 5, 7.5, 10)") from None
    if not values:
        raise UsageError(f"{what}: give at least one value, e.g. 5, 7.5, 10")
    return values


def unreadable_message(name: str) -> str:
    """The page's message for an upload that is not a readable image."""
    return f"“{name}” is not an image that can be read: upload a photo (JPEG, PNG, WebP, …)."


@dataclass
class EditResult:
    """What one run of the page produced: the image shown, the PNG files to download, the seed used."""

    shown: Path
    files: list[Path]
    seed: int
    size: tuple[int, int]
    seconds: float
    number: int


@dataclass
class Editor:
    """The model of one app process, loaded once, and the edits made with it (written under ``out_dir``)."""

    loaded: LoadedModel
    device: torch.device
    precision: str
    out_dir: Path
    max_pixels: float
    loras: list[tuple[str, float]] = field(default_factory=list)
    edits: int = 0

    def edit(
        self,
        photo: str | os.PathLike[str] | None,
        instruction: str,
        *,
        seed: int,
        steps: int,
        cfg_text: list[float],
        cfg_image: list[float],
        sampler: str = "euler_ancestral",
        resolution: int = 512,
        contrast: str = "",
        cfg_contrast: float = DEFAULT_CFG_CONTRAST,
        on_tile: Callable[[int, int], None] | None = None,
    ) -> EditResult:
        """Edit ``photo`` once per (text, image) guidance pair, as edit_cli would; raises `UserError` on bad input.

        One pair writes ``<stem>_seed<S>.png``; several write one PNG per pair and a labelled grid (shown first).
        A non-empty ``contrast`` instruction adds contrast guidance of scale ``cfg_contrast`` (edit_cli's
        ``--contrast`` / ``--cfg-contrast``).
        """
        from ldm.data.transforms import image_to_tensor, tensor_to_image
        from ldm.editing import decode_to_images, edit_latents
        from ldm.image_io import save_image
        from ldm.visualization import labelled_grid

        if photo is None:
            raise UsageError("Upload a photo first.")
        if not instruction or not instruction.strip():
            raise UsageError("Type an instruction first, e.g. “make it snowy”.")
        if sampler not in SAMPLER_NAMES:
            raise UsageError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLER_NAMES)}")
        if not 1 <= steps <= 1000:
            raise UsageError(f"Steps must be between 1 and 1000, got {steps}.")
        if resolution < 64:
            raise UsageError(f"Resolution must be at least 64, got {resolution}.")
        if not 0 <= seed <= SEED_MAX:
            raise UsageError(f"The seed must be between 0 and {SEED_MAX}, got {seed}.")
        contrast = contrast.strip()
        combos = list(itertools.product(cfg_text, cfg_image))
        if len(combos) > MAX_SWEEP_TILES:
            raise UsageError(f"A sweep of {len(cfg_text)} × {len(cfg_image)} = {len(combos)} edits is more than "
                             f"{MAX_SWEEP_TILES}: give fewer guidance values.")
        source = Path(photo)
        image = self._load_photo(source, resolution)

        start = time.perf_counter()
        self.edits += 1
        folder = self.out_dir / f"{self.edits:04d}"
        metadata = {
            "edit": instruction, "seed": seed, "steps": steps, "sampler": sampler, "resolution": resolution,
            "ckpt": self.loaded.ckpt_path.name, "ema": self.loaded.used_ema,
        }
        if self.loras:
            metadata["lora"] = [{"file": Path(path).name, "scale": scale} for path, scale in self.loras]
        contrast_metadata, contrast_kwargs = contrast_settings(contrast, cfg_contrast, CONTRAST_MIN_SIGMA, 1)
        metadata.update(contrast_metadata)
        pixels = image_to_tensor(image).unsqueeze(0).to(self.device)
        tiles, files = [], []
        for index, (text_scale, image_scale) in enumerate(combos):
            latents = edit_latents(self.loaded.model, pixels, [instruction], [text_scale], [image_scale], [seed],
                                   steps=steps, sampler=sampler, precision=self.precision, **contrast_kwargs)
            tile = tensor_to_image(decode_to_images(self.loaded.model, latents, self.precision)[0])
            name = f"{source.stem}_seed{seed}" + (f"_txt{text_scale:g}_img{image_scale:g}" if len(combos) > 1 else "")
            files.append(folder / f"{name}.png")
            save_image(tile, files[-1], {**metadata, "cfg_text": text_scale, "cfg_image": image_scale,
                                         "input": source.name})
            tiles.append(tile)
            if on_tile is not None:
                on_tile(index + 1, len(combos))
        if len(combos) > 1:
            grid = labelled_grid(tiles, len(cfg_image), [f"T {t:g} I {i:g}" for t, i in combos])
            files.insert(0, folder / f"{source.stem}_seed{seed}_grid.png")
            save_image(grid, files[0], {**metadata, "cfg_text": cfg_text, "cfg_image": cfg_image,
                                        "input": source.name})
        seconds = time.perf_counter() - start
        logger.info("edit %d: %s, %d image(s), seed %d, %.1f s", self.edits, source.name, len(combos), seed, seconds)
        return EditResult(files[0], files, seed, image.size, seconds, self.edits)

    def _load_photo(self, path: Path, resolution: int) -> Image.Image:
        """The uploaded photo at its edit size (`load_for_edit`, as edit_cli); a clear message when it is not a
        readable image or has more pixels than the limit."""
        from ldm.data.transforms import ImageLoadError, load_for_edit, probe_image

        try:
            width, height = probe_image(path)
            if width * height > self.max_pixels:
                raise UsageError(f"“{path.name}” is too large: {width}×{height} is {width * height / 1e6:.0f} "
                                 f"megapixels, the limit is {self.max_pixels / 1e6:g}. Upload a smaller photo.")
            return load_for_edit(path, resolution)
        except ImageLoadError:
            raise UsageError(unreadable_message(path.name)) from None


def build_ui(editor: Editor, args: argparse.Namespace) -> Any:
    """The page: photo, instruction and settings on the left; the result, the seed used and the download right."""
    import gradio as gr
    from PIL import Image

    def checked_upload(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """gradio's own decoding of an upload (``gr.Image.preprocess``) with its errors turned into one clear line.

        Wrapped on the instance: a ``gr.Image`` subclass would make gradio write a ``.pyi`` stub beside this file.
        """
        def preprocess(payload: Any) -> Any:
            try:
                return decode(payload)
            except Image.DecompressionBombError:
                raise gr.Error("The photo is too large (too many pixels): upload a smaller one.",
                               print_exception=False) from None
            except Exception:  # noqa: BLE001 — whatever gradio's decoding raised, the user gets one clear line
                name = getattr(payload, "orig_name", None) or "the upload"
                raise gr.Error(unreadable_message(name), print_exception=False) from None
        return preprocess

    def run(photo: str | None, instruction: str, seed: float | None, randomize: bool, steps: float | None,
            text_scale: float, image_scale: float, sweep: bool, sweep_text: str, sweep_image: str, sampler: str,
            resolution: float | None, contrast: str, cfg_contrast: float,
            progress: gr.Progress = gr.Progress()) -> tuple[str, int, int, list[str], str]:
        try:
            if randomize:
                seed = random.randint(0, SEED_MAX)
            elif seed is None:
                raise UsageError("Enter a seed, or tick “Randomize seed”.")
            if steps is None or resolution is None:
                raise UsageError("Enter the number of steps and the resolution.")
            cfg_text = parse_scales(sweep_text, "Text CFG values") if sweep else [float(text_scale)]
            cfg_image = parse_scales(sweep_image, "Image CFG values") if sweep else [float(image_scale)]
            result = editor.edit(photo, instruction, seed=int(seed), steps=int(steps), cfg_text=cfg_text,
                                 cfg_image=cfg_image, sampler=sampler, resolution=int(resolution),
                                 contrast=contrast or "", cfg_contrast=float(cfg_contrast),
                                 on_tile=lambda done, total: progress(done / total, desc=f"edit {done} of {total}"))
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        status = (f"Edit {result.number}: {result.size[0]}×{result.size[1]}, seed {result.seed}, "
                  f"{len(cfg_text) * len(cfg_image)} image(s) in {result.seconds:.1f} s")
        return str(result.shown), result.seed, result.seed, [str(p) for p in result.files], status

    with gr.Blocks(title="Instruct2Dream", analytics_enabled=False) as page:
        gr.Markdown(f"## Instruct2Dream\nModel: `{editor.loaded.ckpt_path.name}`"
                    + "".join(f" + LoRA `{Path(p).name}` × {s:g}" for p, s in editor.loras))
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Photo", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="photo")
                photo.preprocess = checked_upload(photo.preprocess)
                instruction = gr.Textbox(label="Instruction", placeholder="replace the wolf with a sks dog",
                                         elem_id="instruction")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=42, precision=0, minimum=0, maximum=SEED_MAX,
                                     elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                steps = gr.Slider(1, max(200, args.steps), value=args.steps, step=1, label="Steps", elem_id="steps")
                text_scale = gr.Slider(1.0, 20.0, value=7.5, step=0.1, label="Text CFG (s_T)", elem_id="cfg-text")
                image_scale = gr.Slider(0.5, 5.0, value=1.5, step=0.05, label="Image CFG (s_I)", elem_id="cfg-image")
                with gr.Accordion("CFG sweep", open=False):
                    sweep = gr.Checkbox(label="Sweep: one edit per (text, image) pair, shown as a grid",
                                        elem_id="sweep")
                    sweep_text = gr.Textbox(label="Text CFG values", value="5, 7.5, 10", elem_id="sweep-text")
                    sweep_image = gr.Textbox(label="Image CFG values", value="1.2, 1.5", elem_id="sweep-image")
                with gr.Accordion("More settings", open=False):
                    sampler = gr.Dropdown(list(SAMPLER_NAMES), value="euler_ancestral", label="Sampler",
                                          elem_id="sampler")
                    resolution = gr.Number(label="Resolution (long side, about)", value=args.resolution, precision=0,
                                           minimum=64, elem_id="resolution")
                    contrast = gr.Textbox(label="Contrast instruction (optional), e.g. “replace the wolf with a "
                                                "dog” for a sks dog: amplifies what the instruction asks beyond it",
                                          elem_id="contrast")
                    cfg_contrast = gr.Slider(0.0, 10.0, value=DEFAULT_CFG_CONTRAST, step=0.1,
                                             label="Contrast CFG (s_C)", elem_id="cfg-contrast")
                button = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column():
                result = gr.Image(label="Result", type="filepath", format="png", interactive=False,
                                  buttons=["download", "fullscreen"], elem_id="result")  # no share: it uploads
                status = gr.Markdown(elem_id="status")
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="seed-used")
                files = gr.File(label="Download (PNG, settings in its metadata)", file_count="multiple",
                                interactive=False, elem_id="download")
        inputs = [photo, instruction, seed, randomize, steps, text_scale, image_scale, sweep, sweep_text,
                  sweep_image, sampler, resolution, contrast, cfg_contrast]
        button.click(run, inputs, [result, seed_used, seed, files, status], concurrency_limit=1)
        instruction.submit(run, inputs, [result, seed_used, seed, files, status], concurrency_limit=1)
    return page


def serve(args: argparse.Namespace) -> int:
    """Load the model once, then serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
    try:
        import gradio  # noqa: F401 — checked before the (slow) model load
    except ImportError:
        raise UsageError("the browser editor needs gradio: pip install -e '.[app]'") from None
    from ldm.editing import compile_unet, load_model, resolve_device, resolve_precision
    from ldm.lora import lora_scales

    loras = list(zip(args.lora, lora_scales(args.lora, args.lora_scale)))
    missing = [path for path, _ in loras if not Path(path).is_file()]
    if missing:
        raise UsageError(f"--lora {missing[0]}: no such file")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    loaded = load_model(args.config, args.ckpt, ema=args.ema, device=device, tokenizer=args.tokenizer, loras=loras)
    if args.compile:
        compile_unet(loaded.model)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests to the page
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops like Ctrl-C: the server closes, files go
    with tempfile.TemporaryDirectory(prefix="instruct2dream-app-") as out_dir:
        editor = Editor(loaded, device, precision, Path(out_dir), args.max_megapixels * 1e6, loras)
        page = build_ui(editor, args)
        logger.info("serving on http://%s:%d (device %s, precision %s)", args.host, args.port, device, precision)
        try:
            page.queue(default_concurrency_limit=1).launch(
                server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                max_file_size=MAX_UPLOAD_SIZE, allowed_paths=[out_dir], footer_links=[], quiet=args.quiet,
            )
        except OSError as err:  # the port is taken, or the address is not this machine's
            raise UsageError(f"cannot serve on {args.host}:{args.port}: {err}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(serve, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
