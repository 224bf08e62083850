"""Image preprocessing of the evaluation encoders, and the region operations (crop, blank) the metrics need.

The two transforms reproduce the published ``preprocessor_config.json`` of each model, as transformers' PIL image
processors apply them (``ViTImageProcessor`` / ``CLIPImageProcessor``), without transformers' image pipeline:

- DINO ``facebook/dino-vits16``: resize to 224×224 (aspect ratio not kept), bilinear; /255; ImageNet mean/std.
- CLIP ``openai/clip-vit-base-patch32``: resize the short side to 224 (long side truncated to an integer), bicubic;
  centre crop 224×224; /255; OpenAI CLIP mean/std.

Resizing is Pillow's (antialiased, as transformers calls it: ``reducing_gap=None``) on 8-bit RGB images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right/bottom exclusive


@dataclass(frozen=True)
class EncoderTransform:
    """One encoder's preprocessing: resize (``square`` or ``shortest_edge``), optional centre crop, normalize."""

    resize: str
    size: int
    resample: Image.Resampling
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: int | None = None

    def describe(self) -> str:
        """One line for the report."""
        resize = f"{self.size}×{self.size} (squash)" if self.resize == "square" else f"short side {self.size}"
        crop = f", centre crop {self.crop}×{self.crop}" if self.crop else ""
        return (f"resize {resize}, {self.resample.name.lower()}{crop}; /255; "
                f"mean {list(self.mean)}, std {list(self.std)}")


DINO_TRANSFORM = EncoderTransform(
    resize="square", size=224, resample=Image.Resampling.BILINEAR,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
)
CLIP_TRANSFORM = EncoderTransform(
    resize="shortest_edge", size=224, resample=Image.Resampling.BICUBIC, crop=224,
    mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
)


def resized_size(width: int, height: int, transform: EncoderTransform) -> tuple[int, int]:
    """(width, height) after the transform's resize (transformers' rule: the long side is truncated)."""
    if transform.resize == "square":
        return transform.size, transform.size
    if width <= height:
        return transform.size, int(transform.size * height / width)
    return int(transform.size * width / height), transform.size


def center_crop_box(width: int, height: int, crop: int) -> Box:
    """The centred ``crop``×``crop`` window (offsets rounded down), as transformers' ``center_crop``."""
    if crop > width or crop > height:
        raise ValueError(f"cannot centre-crop {crop}x{crop} from a {width}x{height} image")
    left, top = (width - crop) // 2, (height - crop) // 2
    return left, top, left + crop, top + crop


def preprocess(images: Sequence[Image.Image], transform: EncoderTransform) -> torch.Tensor:
    """RGB PIL images → normalized pixel values (B, 3, S, S) for the encoder."""
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    batch = []
    for image in images:
        image = image.convert("RGB")
        image = image.resize(resized_size(*image.size, transform), resample=transform.resample, reducing_gap=None)
        if transform.crop:
            image = image.crop(center_crop_box(*image.size, transform.crop))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S)
        batch.append((pixels.to(torch.float32) / 255.0 - mean) / std)
    return torch.stack(batch)


def mask_box(mask: np.ndarray) -> Box:
    """Bounding box of the True pixels of a (H, W) mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("the mask is empty")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_mask(box: Sequence[float], width: int, height: int) -> np.ndarray:
    """(H, W) boolean mask of a pixel box (left, top, right, bottom), clipped to the image."""
    left, top, right, bottom = (int(round(v)) for v in box)
    left, right = max(0, left), min(width, right)
    top, bottom = max(0, top), min(height, bottom)
    if right <= left or bottom <= top:
        raise ValueError(f"box {list(box)} does not overlap the {width}x{height} image")
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def crop_region(image: Image.Image, mask: np.ndarray | None) -> Image.Image:
    """The subject region: the bounding box of ``mask`` (the whole image without a mask)."""
    return image if mask is None else image.crop(mask_box(mask))


def blank_region(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with the ``mask`` pixels set to black (DreamEditBench's masked background)."""
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    pixels[mask] = 0
    return Image.fromarray(pixels)


def to_unit_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image → float32 (H, W, 3) in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
