"""ldm/data/paste_back.py: the generated pixels survive only where the edit changed the photo."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldm.data.paste_back import paste_back, scales


def _scene(size: tuple[int, int], shift: float) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """A real photo (a gradient and a square) and its "edit": the square replaced by a disc elsewhere, and every
    pixel tinted by ``shift`` (a colour cast). Returns both and the mask of the pixels the edit really changed."""
    width, height = size
    ramp = np.linspace(40, 200, width, dtype=np.float32)
    real = np.stack([np.tile(ramp, (height, 1)), np.full((height, width), 90.0), np.full((height, width), 150.0)], -1)
    photo = Image.fromarray(real.astype(np.uint8))
    ImageDraw.Draw(photo).rectangle([width // 8, height // 8, width // 4, height // 4], fill=(250, 250, 20))
    tinted = Image.fromarray(np.clip(np.asarray(photo, dtype=np.float32) + shift * 255, 0, 255).astype(np.uint8))
    edit = tinted.copy()
    ImageDraw.Draw(edit).ellipse([width // 2, height // 2, width // 2 + height // 4, height // 2 + height // 4],
                                 fill=(20, 200, 240))
    changed = np.any(np.asarray(edit) != np.asarray(tinted), axis=-1)
    return edit, photo, changed


@pytest.mark.parametrize("size", [(64, 64), (512, 344), (300, 700)], ids=["shapesworld", "landscape", "portrait"])
def test_keeps_the_edit_only_where_it_changed_the_photo(size):
    edit, photo, changed = _scene(size, shift=0.03)
    mixed = np.asarray(paste_back(edit, photo, threshold=0.08), dtype=np.int16)
    edit_px, photo_px = np.asarray(edit, dtype=np.int16), np.asarray(photo, dtype=np.int16)
    sigma, grow = scales(size[1], size[0])
    # Inside the new object, farther than the feathering (3σ) from its edge: the edit, exactly.
    core = ~_grow(~changed, int(3 * sigma) + 2)
    assert core.sum() >= 9
    assert np.abs(mixed - edit_px)[core].max() <= 1
    # Far from it (beyond the blurred difference, the growth and the feathering): the real photo, exactly — the
    # colour cast is gone.
    far = ~_box_around(changed, grow + int(6 * sigma) + 2)
    assert np.abs(mixed - photo_px)[far].max() <= 1
    assert np.abs(edit_px - photo_px)[far].mean() > 6  # the edit did tint it


def test_identical_images_and_a_high_threshold_give_the_photo():
    edit, photo, _ = _scene((96, 64), shift=0.0)
    assert np.array_equal(np.asarray(paste_back(photo, photo, 0.08)), np.asarray(photo))
    assert np.array_equal(np.asarray(paste_back(edit, photo, 0.99)), np.asarray(photo))


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"the edit is \(64, 32\), the photo \(64, 64\)"):
        paste_back(Image.new("RGB", (64, 32)), Image.new("RGB", (64, 64)), 0.1)


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` (4-neighbour steps), for the expectations."""
    from ldm.data.shapesworld import dilate

    return dilate(mask, pixels)


def _box_around(mask: np.ndarray, margin: int) -> np.ndarray:
    """The bounding box of ``mask`` widened by ``margin`` pixels on each side, as a mask."""
    ys, xs = np.nonzero(mask)
    box = np.zeros_like(mask)
    box[max(ys.min() - margin, 0) : ys.max() + margin + 1, max(xs.min() - margin, 0) : xs.max() + margin + 1] = True
    return box
