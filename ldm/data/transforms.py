"""Image IO and geometry shared by editing, pair generation and training: load, size rules, tensors ↔ images."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageLoadError(UserError, ValueError):
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


def _existing_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path; `ImageLoadError` naming it when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"image file is empty (0 bytes): {path}")
    return path


def _decode(
    path: str | os.PathLike[str], min_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image as RGB with its EXIF orientation applied; returns it and its full oriented (width, height).

    ``min_size(full_size)`` names the oriented size the decoded image must at least have; a JPEG then decodes at
    1/2, 1/4 or 1/8 scale when that still leaves it (DCT scaling: large photos load fast). Other formats, and
    JPEGs without ``min_size``, decode at full size. Raises `ImageLoadError` naming the file.
    """
    path = _existing_file(path)
    try:
        with Image.open(path) as image:
            swapped = image.getexif().get(_ORIENTATION_TAG) in _TRANSPOSING_ORIENTATIONS
            full_size = (image.height, image.width) if swapped else image.size
            if min_size is not None and image.format == "JPEG":
                need_w, need_h = min_size(full_size)
                # draft() takes the size in stored (pre-orientation) pixels and keeps at least that many
                image.draft("RGB", (need_h, need_w) if swapped else (need_w, need_h))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image), full_size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err


def load_image(path: str | os.PathLike[str], max_side: int | None = None) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied; ``max_side`` lets JPEG decode at reduced scale.

    With ``max_side`` a JPEG may come back at 1/2–1/8 of its size, both sides still at least ``max_side`` (or
    its full size where smaller). Raises `ImageLoadError` naming the file when it is missing, empty or not an image.
    """
    min_size = None if max_side is None else (lambda full: (max_side, max_side))
    return _decode(path, min_size)[0]


def edit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """InstructPix2Pix's edit size (its ``edit_cli.py``): long side about ``resolution``, sides multiples of 64.

    The short side is rounded *up* to a multiple of 64 and the scale follows it, so the long side may exceed
    ``resolution`` (6240×4160 at 512 → 576×384; 2073×2771 → 320×512). Give the image's full-resolution,
    EXIF-oriented size (`load_for_edit` does): a reduced JPEG decode rounds differently (779×520 → 512×384).
    The arithmetic is InstructPix2Pix's own floating point, rounding quirks included (49×49 at 512 → 448×448,
    because 49 · (512 / 49) < 512); only a side it would make 0 becomes 64.
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


def fit_for_edit(image: Image.Image, resolution: int, full_size: tuple[int, int] | None = None) -> Image.Image:
    """Centre-crop to the aspect of `edit_size` and resize with Lanczos (IP2P's ``ImageOps.fit``).

    ``full_size``: the (width, height) the size rule sees when ``image`` is a reduced decode of a larger image
    (default: ``image.size``).
    """
    size = edit_size(*(full_size or image.size), resolution)
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def load_for_edit(path: str | os.PathLike[str], resolution: int) -> Image.Image:
    """Load an image fitted to its InstructPix2Pix edit size, computed on its full-resolution oriented size.

    A JPEG decodes at reduced scale only down to the edit size (never below), then is fitted to it exactly.
    """
    image, full_size = _decode(path, lambda full: edit_size(*full, resolution))
    return fit_for_edit(image, resolution, full_size)


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


# --------------------------------------------------------------------------------------------------------------
# Paired crop/flip for training: one window and one flip decision shared by the input and the target of a pair.

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resampling(name: str) -> Image.Resampling:
    """Map a config name (``linear``, ``bilinear``, ``bicubic``, ``lanczos``, ``nearest``) to a PIL filter."""
    try:
        return RESAMPLING[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {', '.join(RESAMPLING)}") from None


def _jpeg_is_complete(path: Path) -> bool:
    """True when the JPEG's entropy-coded data is followed by an end-of-image marker (i.e. it is not truncated).

    Marker segments are skipped by their length up to the first start-of-scan, so an EXIF thumbnail's own
    end marker does not count; inside scan data a 0xFF byte is always stuffed, so 0xFFD9 means the real end
    (searched from the back: it is normally the last two bytes).
    """
    data = path.read_bytes()
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan
            return data.rfind(b"\xff\xd9", pos) != -1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length field
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def probe_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Check that a file is a readable image and return its (width, height) after EXIF orientation.

    Cheap enough for hundreds of files, without decoding JPEG or PNG: a JPEG is checked by its header and marker
    structure (truncation), a PNG by its chunk checksums (``verify``); other formats are decoded. Raises
    `ImageLoadError` naming the file.
    """
    path = _existing_file(path)
    try:
        with Image.open(path) as image:
            is_jpeg = image.format in ("JPEG", "MPO")
            width, height = image.size
            if image.format == "PNG":
                # A PNG's eXIf chunk precedes the pixel data; reading it later would decode the whole image.
                orientation = image.getexif().get(_ORIENTATION_TAG) if "exif" in image.info else None
                image.verify()
            else:
                if not is_jpeg:
                    image.load()
                orientation = image.getexif().get(_ORIENTATION_TAG)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err
    if is_jpeg and not _jpeg_is_complete(path):
        raise ImageLoadError(f"JPEG data is truncated (no end-of-image marker): {path}")
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def _fit_box(size: tuple[int, int], aspect: float) -> Box:
    """The centred box of aspect ``aspect`` (w/h) touching two sides of ``size`` (what ``ImageOps.fit`` keeps)."""
    width, height = size
    if width / height > aspect:
        kept = height * aspect
        return ((width - kept) / 2, 0.0, (width + kept) / 2, float(height))
    kept = width / aspect
    return (0.0, (height - kept) / 2, float(width), (height + kept) / 2)


def pair_crop_boxes(
    size_a: tuple[int, int], size_b: tuple[int, int], out_size: int, offset: tuple[float, float] = (0.5, 0.5)
) -> tuple[Box, Box]:
    """One square crop window of a pair, as a pixel box in each image's own coordinates.

    The pair's common field is the smaller image (fewer pixels) whole, and the centred region of the larger image
    with the smaller one's aspect: the region ``ImageOps.fit`` keeps, which is how InstructPix2Pix's edit_cli and
    our generator derive a generated image from a photo. With equal aspects the field is both images whole. The
    field is scaled so its short side is ``out_size`` (aspect-preserving resize), and the window sits at
    ``offset`` = (u, v) in [0, 1]² of the free range: (0.5, 0.5) is the centre crop. Both boxes cover the same
    *relative* part of the field, so partners of very different resolutions stay aligned.
    """
    if not (0.0 <= offset[0] <= 1.0 and 0.0 <= offset[1] <= 1.0):
        raise ValueError(f"crop offset must lie in [0, 1]², got {offset}")
    if min(*size_a, *size_b) <= 0:
        raise ValueError(f"invalid image sizes {size_a}, {size_b}")
    a_is_small = size_a[0] * size_a[1] < size_b[0] * size_b[1]
    small = size_a if a_is_small else size_b
    aspect = small[0] / small[1]
    small_field: Box = (0.0, 0.0, float(small[0]), float(small[1]))
    large_field = _fit_box(size_b if a_is_small else size_a, aspect)
    # The field resized so that its short side is out_size, and the window inside it, relative to the field.
    field_w, field_h = (out_size * aspect, float(out_size)) if aspect >= 1 else (float(out_size), out_size / aspect)
    x0 = offset[0] * (field_w - out_size)
    y0 = offset[1] * (field_h - out_size)
    rel = (x0 / field_w, y0 / field_h, (x0 + out_size) / field_w, (y0 + out_size) / field_h)

    def place(field: Box) -> Box:
        left, top, right, bottom = field
        w, h = right - left, bottom - top
        return (left + rel[0] * w, top + rel[1] * h, left + rel[2] * w, top + rel[3] * h)

    box_small, box_large = place(small_field), place(large_field)
    return (box_small, box_large) if a_is_small else (box_large, box_small)


@dataclass(frozen=True)
class PairWindow:
    """One crop position (``offset`` in [0, 1]², see `pair_crop_boxes`) and one flip decision for a whole pair."""

    offset: tuple[float, float] = (0.5, 0.5)
    flip: bool = False

    @classmethod
    def draw(
        cls, rng: random.Random | torch.Generator | None, flip_p: float, random_crop: bool = True
    ) -> PairWindow:
        """Draw a window from ``rng`` (None: torch's default generator, i.e. the DataLoader worker's seed).

        Always three draws, so the stream does not depend on the options.
        """
        if isinstance(rng, random.Random):
            u, v, coin = rng.random(), rng.random(), rng.random()
        else:
            u, v, coin = torch.rand(3, generator=rng, dtype=torch.float64).tolist()
        return cls(offset=(u, v) if random_crop else (0.5, 0.5), flip=coin < flip_p)


def _draft_factor(full_size: tuple[int, int], loaded_size: tuple[int, int]) -> tuple[float, float]:
    """Pixel scale from full-resolution coordinates to a (possibly JPEG-draft-reduced) decoded image."""
    for step in (1, 2, 4, 8):
        if all((full + step - 1) // step == loaded for full, loaded in zip(full_size, loaded_size)):
            return 1.0 / step, 1.0 / step
    return loaded_size[0] / full_size[0], loaded_size[1] / full_size[1]


def load_for_box(
    path: str | os.PathLike[str], full_size: tuple[int, int], box: Box, out_size: int
) -> Image.Image:
    """Load an image as RGB (EXIF-oriented), letting JPEG decode at 1/2–1/8 scale while ``box`` keeps ≥ out_size px.

    ``full_size`` is the oriented full-resolution size (`probe_image`) that ``box`` refers to.
    """
    box_side = min(box[2] - box[0], box[3] - box[1])
    needed = math.ceil(min(full_size) * out_size / max(box_side, 1e-6))
    return load_image(path, max_side=max(needed, 1))


def crop_to_tensor(
    image: Image.Image,
    box: Box,
    out_size: int,
    full_size: tuple[int, int] | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    flip: bool = False,
) -> torch.Tensor:
    """Resample ``box`` of ``image`` to out_size² (PIL ``reduce`` first on big shrinks), flip → (3, S, S) in [-1, 1].

    ``box`` is in ``full_size`` coordinates (default: the image's own size) and is scaled to the decoded image.
    """
    if full_size is not None and tuple(full_size) != image.size:
        sx, sy = _draft_factor(full_size, image.size)
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    out = image.resize((out_size, out_size), resample=resample, box=box, reducing_gap=3.0)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image_to_tensor(out)


def load_pair(
    paths: tuple[str | os.PathLike[str], str | os.PathLike[str]],
    sizes: tuple[tuple[int, int], tuple[int, int]],
    out_size: int,
    window: PairWindow,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load two partner images and apply the same ``window`` (crop position and flip) → two (3, S, S) tensors.

    ``sizes`` are the oriented full-resolution sizes from `probe_image`.
    """
    boxes = pair_crop_boxes(sizes[0], sizes[1], out_size, window.offset)
    return tuple(  # type: ignore[return-value]
        crop_to_tensor(load_for_box(path, size, box, out_size), box, out_size, size, resample, window.flip)
        for path, size, box in zip(paths, sizes, boxes)
    )


def transform_pair(
    image_a: Image.Image,
    image_b: Image.Image,
    out_size: int,
    window: PairWindow = PairWindow(),
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`load_pair` for images already in memory (RGB, oriented)."""
    box_a, box_b = pair_crop_boxes(image_a.size, image_b.size, out_size, window.offset)
    return (
        crop_to_tensor(image_a, box_a, out_size, resample=resample, flip=window.flip),
        crop_to_tensor(image_b, box_b, out_size, resample=resample, flip=window.flip),
    )
