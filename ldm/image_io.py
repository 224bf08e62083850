"""Images on disk: finding inputs, and edits whose PNGs carry their settings as JSON in an ``instruct2dream`` chunk."""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import MissingFileError, UsageError
from ldm.fileio import atomic_path

logger = logging.getLogger(__name__)

METADATA_KEY = "instruct2dream"
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".png": "PNG"}


def image_format(path: str | os.PathLike[str]) -> str:
    """PIL format name for an output suffix (.png, .jpg, .jpeg, .webp)."""
    return FORMATS[Path(path).suffix.lower()]


def write_png(image: Image.Image, path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    """Write ``image`` as a PNG at ``path`` (in place) with ``metadata`` as JSON in its text chunk."""
    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    image.save(path, format="PNG", pnginfo=info)


def save_image(image: Image.Image, path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    """Write ``image`` atomically in the format of ``path``'s suffix; PNGs carry ``metadata`` (`write_png`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".png":
            write_png(image, tmp, metadata)
        else:
            fmt = image_format(path)
            image.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``instruct2dream`` JSON of a PNG written by `save_image`; ``{}`` when there is none."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(METADATA_KEY)
    except (OSError, ValueError):
        return {}
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        logger.warning("%s: unreadable %s metadata ignored", path, METADATA_KEY)
        return {}
    return data if isinstance(data, dict) else {}


def find_images(spec: str, option: str) -> list[Path]:
    """An image file, the image files of a folder (sorted), or those matching a glob pattern."""
    from ldm.data.transforms import is_image_file  # here: it imports torch, which the scripts' --help does without

    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
        if not found:
            raise UsageError(f"{option} {spec}: the folder holds no image files")
        return found
    matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file() and is_image_file(p))
    if not matches:
        raise MissingFileError(f"{option} {spec}: no such file or folder, and no image matches it as a pattern")
    return matches
