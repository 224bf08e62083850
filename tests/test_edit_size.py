"""Edit sizes are InstructPix2Pix's rule applied to the full-resolution, EXIF-oriented size, on every input path.

The oracle `ip2p_size` is the rule of InstructPix2Pix's ``edit_cli.py`` written out here; the pipeline's sizes come
from real files (JPEGs at camera resolution decode at reduced scale, which must not change the size).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.transforms import _decode, edit_size, fit_for_edit, load_for_edit, load_image
from scripts.edit_cli import main as edit_main
from scripts.generate_dataset import Photo, load_photos
from tests.tiny import TINY_CONFIG, save_tiny_checkpoint

RESOLUTIONS = (512, 256, 128)
ORIENTATION = 0x0112


def ip2p_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """InstructPix2Pix's edit size, step by step as in its edit_cli.py (a side it would make 0 becomes 64)."""
    factor = resolution / max(width, height)
    factor = math.ceil(min(width, height) * factor / 64) * 64 / min(width, height)
    width = int((width * factor) // 64) * 64
    height = int((height * factor) // 64) * 64
    return max(width, 64), max(height, 64)


# (width, height, resolution) -> size: the photos, edit_size's docstring, and the 128 px 3:2 case.
PINNED = {
    (6230, 4153, 512): (576, 384),
    (2073, 2771, 512): (320, 512),
    (6240, 4160, 512): (576, 384),
    (779, 520, 512): (512, 384),  # the 1/8 JPEG draft of 6230x4153: why the size must come from the full size
    (49, 49, 512): (448, 448),  # InstructPix2Pix's float rounding: 49 * (512 / 49) < 512
    (6230, 4153, 128): (192, 128),  # a 3:2 photo stays 3:2 at 128 (it came out square from the draft)
    (2073, 2771, 256): (128, 256),
    (4000, 300, 512): (832, 64),
}


@pytest.mark.parametrize("case", PINNED, ids=lambda c: "x".join(map(str, c)))
def test_pinned_sizes(case):
    assert ip2p_size(*case) == PINNED[case]
    assert edit_size(*case) == PINNED[case]


def test_edit_size_is_the_ip2p_rule_over_many_sizes():
    sides = sorted({*range(1, 130), *range(130, 2100, 37), 2073, 2771, 3024, 4032, 4153, 6230, 6240, 9999})
    for resolution in (*RESOLUTIONS, 64, 320, 768):
        for width in sides:
            for height in sides[:: 3 if width % 2 else 5]:
                assert edit_size(width, height, resolution) == ip2p_size(width, height, resolution), (
                    width, height, resolution)


def _gradient(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A horizontal gradient with a vertical one in green (cheap to encode at camera resolution)."""
    width, height = size
    array = np.empty((height, width, 3), dtype=np.uint8)
    array[..., 0] = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    array[..., 1] = np.linspace(255, 0, height, dtype=np.float32)[:, None]
    array[..., 2] = 90
    image = Image.fromarray(array)
    return image.convert(mode) if mode != "RGB" else image


# name -> (stored width, stored height, file suffix, EXIF orientation or None, save options)
FILES = {
    "huge_landscape": (6230, 4153, ".jpg", None, {"quality": 80}),
    "huge_portrait": (2073, 2771, ".jpg", None, {"quality": 80}),
    "docstring": (6240, 4160, ".jpg", None, {"quality": 60, "progressive": True}),
    "extreme_wide": (4000, 300, ".jpg", None, {}),
    "extreme_tall": (300, 4000, ".png", None, {}),
    "odd": (1001, 667, ".jpg", None, {}),
    "odd_png": (333, 517, ".png", None, {}),
    "small": (50, 70, ".jpg", None, {}),
    "tiny_square": (49, 49, ".png", None, {}),
    "gray": (3001, 1999, ".jpg", None, {"mode": "L"}),
    "exif6_portrait": (2771, 2073, ".jpg", 6, {}),  # displayed 2073x2771
    "exif6_extreme": (4000, 300, ".jpg", 6, {}),  # displayed 300x4000
    "exif8": (1999, 1001, ".jpg", 8, {}),
    "exif5_png": (517, 333, ".png", 5, {}),
    "exif3_no_swap": (1001, 667, ".jpg", 3, {}),
}


def _oriented(name: str) -> tuple[int, int]:
    width, height, _, orientation, _ = FILES[name]
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sizes")
    paths = {}
    for name, (width, height, suffix, orientation, options) in FILES.items():
        options = dict(options)
        image = _gradient((width, height), options.pop("mode", "RGB"))
        if orientation is not None:
            exif = Image.Exif()
            exif[ORIENTATION] = orientation
            options["exif"] = exif.tobytes()
        paths[name] = folder / f"{name}{suffix}"
        image.save(paths[name], **options)
    return paths


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_loaded_size_is_the_rule_on_the_full_oriented_size(files, resolution):
    for name, path in files.items():
        with Image.open(path) as raw:  # the files really are what the case says
            assert raw.size == FILES[name][:2]
        expected = ip2p_size(*_oriented(name), resolution)
        image = load_for_edit(path, resolution)
        assert (image.size, image.mode) == (expected, "RGB"), name


def test_jpeg_draft_is_only_a_speed_up(files):
    path = files["huge_landscape"]
    target = ip2p_size(6230, 4153, 512)
    decoded, full = _decode(path, lambda size: edit_size(*size, 512))
    assert full == (6230, 4153)
    # decoded at 1/8 scale (fast), still at least the target in both sides
    assert decoded.size == (779, 520) and decoded.width >= target[0] and decoded.height >= target[1]
    fast = np.asarray(load_for_edit(path, 512), dtype=np.float32)
    exact = np.asarray(fit_for_edit(load_image(path), 512), dtype=np.float32)  # full decode, IP2P's way
    assert fast.shape == exact.shape == (384, 576, 3)
    assert np.abs(fast - exact).mean() < 1.0 and np.abs(fast - exact).max() < 16
    # An EXIF-rotated JPEG is sized by its displayed orientation and drafted in its stored one (to 1/4 here:
    # asking for the displayed 64x832 in stored pixels would not reduce it at all).
    decoded, full = _decode(files["exif6_extreme"], lambda size: edit_size(*size, 512))
    assert full == (300, 4000) and edit_size(*full, 512) == (64, 832) and decoded.size == (75, 1000)


def test_exif_orientation_turns_the_content(files):
    # Orientation 6 = rotate 90° clockwise for display: the stored left edge (dark red) becomes the top.
    image = np.asarray(load_for_edit(files["exif6_portrait"], 256), dtype=np.float32)
    assert image.shape == (256, 128, 3)
    assert image[:8, :, 0].mean() < 40 and image[-8:, :, 0].mean() > 215


def test_generate_dataset_photos_get_the_edit_size(files):
    names = ("huge_landscape", "huge_portrait", "exif6_portrait", "extreme_wide")
    photos = [Photo("subject", files[name]) for name in names]
    readable, images = load_photos(photos, 128, skip_unreadable=False)
    assert [p.path for p in readable] == [files[name] for name in names]
    assert [images[files[name]].size for name in names] == [ip2p_size(*_oriented(name), 128) for name in names]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", seed=1)


@pytest.mark.parametrize(
    "resolution,names",
    [(128, ("huge_landscape", "exif6_portrait")), (256, ("huge_portrait",))],
    ids=["128", "256"],
)
def test_edit_cli_outputs_have_the_ip2p_size(files, tiny_ckpt, tmp_path, resolution, names):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in names:
        (inputs / files[name].name).symlink_to(files[name])
    out = tmp_path / "out"
    code = edit_main(["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--input", str(inputs), "--output",
                      str(out), "--edit", "make it snowy", "--seed", "0", "--steps", "2", "--resolution",
                      str(resolution), "--quiet"])
    assert code == 0
    for name in names:
        assert Image.open(out / f"{name}.png").size == ip2p_size(*_oriented(name), resolution), name
