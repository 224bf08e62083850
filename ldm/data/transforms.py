"""Image IO and geometry shared by editing, pair generation and training: load, size rules, tensors ↔ images."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageLoadError(ValueError):
    """An image file is missing, empty or cannot be decoded."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, RGBA, P, CMYK, I;16, F, …) to 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str], max_side: int | None = None) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied; ``max_side`` lets JPEG decode at reduced scale.

    Raises `ImageLoadError` naming the file when it is missing, empty or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as image:
            if max_side is not None and image.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale when that still leaves max_side pixels: large photos load fast.
                image.draft("RGB", (max_side, max_side))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err


def edit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """InstructPix2Pix's edit size: scale so the long side is about ``resolution``, both sides multiples of 64.

    The short side is rounded *up* to a multiple of 64 and the scale follows it, so the long side may exceed
    ``resolution`` (6240×4160 at 512 → 576×384).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid image size {width}x{height}")
    if resolution < 64:
        raise ValueError(f"resolution must be at least 64, got {resolution}")
    factor = resolution / max(width, height)
    short = min(width, height)
    factor = math.ceil(short * factor / 64) * 64 / short
    new_w = int((width * factor) // 64) * 64
    new_h = int((height * factor) // 64) * 64
    return max(new_w, 64), max(new_h, 64)


def fit_for_edit(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to the aspect of `edit_size` and resize with Lanczos (IP2P's ``ImageOps.fit``)."""
    size = edit_size(image.width, image.height, resolution)
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] → RGB PIL image (values clamped, rounded to 8 bits)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True for a file name with a known image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
