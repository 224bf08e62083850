"""ShapesWorld: a procedural world of one coloured shape on a background, with exact ground truth.

It is small enough for the whole Instruct2Dream method to run on a laptop CPU: a toy InstructPix2Pix base model
learns generic edits ("replace the circle with a star", "make the square red") from `ShapesEditDataset`, and is
then personalized on the *subject* — one star whose striped pattern no base prompt can describe. Because every
image is rendered from a `Scene`, metrics on edits (`subject_score`, `background_change`) are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset


SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (25, 25, 30),
    (70, 70, 80),
    (150, 150, 160),
    (30, 50, 95),
    (95, 60, 45),
    (60, 90, 70),
)
SUBJECT_SHAPE = "star"
SUBJECT_STRIPES = ((235, 30, 200), (20, 225, 235))  # magenta / cyan: neither is a colour word of the world
SUBJECT_CHECKS = ((110, 20, 170), (255, 160, 200))  # purple / pink checkerboard
SUBJECT_DOTS = ((0, 130, 130), (255, 200, 140))  # peach dots on teal
# Fills no base prompt can describe (never in the base model's data): "subject" is the original striped subject.
PATTERNS = ("subject", "checkered", "dotted")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: a background, and an object ``shape`` at centre (cx, cy) with radius ``r``.

    ``fill`` is a colour name of `COLOURS`, or a subject pattern of `PATTERNS` (``"subject"``: magenta/cyan
    diagonal stripes, ``"checkered"``: a purple/pink checkerboard, ``"dotted"``: peach dots on teal). The background
    is ``bg_top`` → ``bg_bottom`` (equal colours: solid; otherwise a vertical gradient).
    """

    shape: str
    fill: str
    cx: float
    cy: float
    r: float
    bg_top: tuple[int, int, int]
    bg_bottom: tuple[int, int, int]
    size: int = 64

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.fill not in PATTERNS and self.fill not in COLOURS:
            raise ValueError(f"unknown fill {self.fill!r}; expected one of {PATTERNS + tuple(COLOURS)}")


def random_scene(rng: np.random.Generator, size: int = 64, shape: str | None = None, fill: str | None = None) -> Scene:
    """A random scene: shape, colour, radius ∈ [size/6, size/3.5], position inside the frame, solid or gradient."""
    r = float(rng.uniform(size / 6, size / 3.5))
    margin = r + 2
    cx, cy = (float(v) for v in rng.uniform(margin, size - margin, size=2))
    top = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bottom = top if rng.random() < 0.5 else BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(
        shape=shape if shape is not None else SHAPES[int(rng.integers(len(SHAPES)))],
        fill=fill if fill is not None else tuple(COLOURS)[int(rng.integers(len(COLOURS)))],
        cx=cx, cy=cy, r=r, bg_top=top, bg_bottom=bottom, size=size,
    )


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixel units) of the polygonal shapes, pointing up."""
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [(cx + q * math.sin(k * math.pi / 5), cy - q * math.cos(k * math.pi / 5)) for k, q in enumerate(radii)]
    raise ValueError(f"no polygon for shape {shape!r}")


def object_mask(scene: Scene) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of the object (rendered at 4× and box-filtered)."""
    big = scene.size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    s = SUPERSAMPLE
    cx, cy, r = scene.cx * s, scene.cy * s, scene.r * s
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_outline(scene.shape, cx, cy, r), fill=255)
    small = canvas.resize((scene.size, scene.size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def background(scene: Scene) -> np.ndarray:
    """Background (H, W, 3) in [0, 1]: solid, or a vertical gradient from ``bg_top`` to ``bg_bottom``."""
    t = np.linspace(0.0, 1.0, scene.size, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    top, bottom = (np.asarray(c, dtype=np.float32) / 255.0 for c in (scene.bg_top, scene.bg_bottom))
    return np.broadcast_to((1 - t) * top + t * bottom, (scene.size, scene.size, 3)).copy()


def fill_pattern(scene: Scene) -> np.ndarray:
    """The object's paint (H, W, 3) in [0, 1]: a flat colour, or a subject pattern anchored to the object.

    Patterns scale with the object (about five stripes, four checks or four rows of dots across it), so every photo
    of a subject shows the same pattern whatever its size and position.
    """
    if scene.fill in COLOURS:
        colour = np.asarray(COLOURS[scene.fill], dtype=np.float32) / 255.0
        return np.broadcast_to(colour, (scene.size, scene.size, 3)).copy()
    y, x = np.mgrid[0 : scene.size, 0 : scene.size].astype(np.float32) + 0.5
    u, v = x - scene.cx, y - scene.cy
    if scene.fill == "subject":
        period = max(scene.r / 2.5, 3.0)
        band = np.floor((u + v) / period).astype(np.int64) % 2  # (H, W)
        palette = SUBJECT_STRIPES
    elif scene.fill == "checkered":
        period = max(scene.r / 2.0, 3.0)
        band = (np.floor(u / period) + np.floor(v / period)).astype(np.int64) % 2
        palette = SUBJECT_CHECKS
    else:  # dotted: a dot of radius 0.3 periods in every cell of a grid centred on the object
        period = max(scene.r / 2.0, 4.0)
        du = u / period - np.round(u / period)
        dv = v / period - np.round(v / period)
        band = (du**2 + dv**2 < 0.3**2).astype(np.int64)
        palette = SUBJECT_DOTS
    colours = np.asarray(palette, dtype=np.float32) / 255.0  # (2, 3)
    return colours[band]


def render(scene: Scene) -> np.ndarray:
    """The image (H, W, 3) in [0, 1]."""
    alpha = object_mask(scene)[..., None]
    return (1 - alpha) * background(scene) + alpha * fill_pattern(scene)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) in [0, 1] → (3, H, W) in [-1, 1] (our batch convention)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))) * 2.0 - 1.0


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, 3) in [0, 1] → an RGB PIL image."""
    return Image.fromarray(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))


def from_pil(image: Image.Image) -> np.ndarray:
    """An RGB PIL image → (H, W, 3) float32 in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def random_edit(rng: np.random.Generator, size: int = 64, colour_edit_p: float = 0.25) -> tuple[Scene, Scene, str]:
    """A generic edit (input scene, target scene, instruction) that keeps position, size and background.

    With probability ``colour_edit_p``: "make the {shape} {colour}"; otherwise "replace the {a} with a {b}"
    (a ≠ b, colour kept). Only the world's flat colours appear: the subject is never in the base model's data.
    """
    source = random_scene(rng, size)
    if rng.random() < colour_edit_p:
        colour = rng.choice([c for c in COLOURS if c != source.fill])
        return source, replace(source, fill=str(colour)), f"make the {source.shape} {colour}"
    shape = rng.choice([s for s in SHAPES if s != source.shape])
    return source, replace(source, shape=str(shape)), f"replace the {source.shape} with a {shape}"


class ShapesEditDataset(Dataset):
    """Generic ShapesWorld edit triplets in the batch format ``{"image": target, "c_concat": input, "caption"}``.

    Item ``i`` is a pure function of (``seed``, ``i``), so the data is unlimited (``length`` only sets the epoch)
    and identical in every worker. ``data_root`` is not read (the world is procedural); it exists because
    ``main.py`` requires the key of every training dataset config.
    """

    def __init__(
        self,
        length: int = 100_000,
        size: int = 64,
        seed: int = 0,
        colour_edit_p: float = 0.25,
        data_root: str | None = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        if size < 32:
            raise ValueError(f"size must be at least 32, got {size}")
        if not 0.0 <= colour_edit_p <= 1.0:
            raise ValueError(f"colour_edit_p must lie in [0, 1], got {colour_edit_p}")
        self.length, self.size, self.seed, self.colour_edit_p = length, size, seed, colour_edit_p
        self.data_root = data_root

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length} items")
        rng = np.random.default_rng([self.seed, i])
        source, target, instruction = random_edit(rng, self.size, self.colour_edit_p)
        return {"image": to_tensor(render(target)), "c_concat": to_tensor(render(source)), "caption": instruction}


def soften(image: np.ndarray) -> np.ndarray:
    """(H, W, C) image blurred by the 3-tap binomial filter [1, 2, 1] / 4 along both axes (edges repeated)."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def aligned_distance(edited: np.ndarray, reference: np.ndarray, inside: np.ndarray, shift: int = 1) -> float:
    """Mean absolute difference inside ``inside`` between ``edited`` and ``reference`` moved by at most ``shift``
    pixels (the best of the (2·shift + 1)² moves)."""
    best = np.inf
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            moved = np.roll(reference, (dy, dx), axis=(0, 1))
            best = min(best, float(np.abs(edited - moved)[inside].mean()))
    return best


def subject_score(edited: np.ndarray, generic: np.ndarray, subject: np.ndarray, mask: np.ndarray) -> float:
    """How much the object looks like the subject rather than a generic instance: d_g / (d_g + d_s) in [0, 1].

    d_g, d_s: mean absolute pixel error inside ``mask`` (H, W) between ``edited`` and the ground-truth renders of a
    generic instance and of the subject at the same place, after softening all three (`soften`) and letting each
    render move by up to one pixel (`aligned_distance`). 1 = the subject's pattern, 0 = the generic instance. The
    tolerance is there because a 64-px editor places a pattern of 3–5 px stripes to within a pixel at best: without
    it the exact subject moved by one pixel scores 0.74, and blurred slightly 0.74 (docs/shapesworld.md, "Metrics").
    """
    inside = mask > 0.5
    if not inside.any():
        raise ValueError("subject_score: empty mask")
    edited, generic, subject = soften(edited), soften(generic), soften(subject)
    d_generic, d_subject = aligned_distance(edited, generic, inside), aligned_distance(edited, subject, inside)
    return d_generic / max(d_generic + d_subject, 1e-8)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Boolean (H, W) mask grown by ``pixels`` (square neighbourhood)."""
    grown = mask.copy()
    for _ in range(pixels):
        padded = np.pad(grown, 1)
        grown = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return grown


def background_change(edited: np.ndarray, source: np.ndarray, object_region: np.ndarray, margin: int = 2) -> float:
    """Edit locality: mean absolute change (in [0, 1] units) outside ``object_region`` grown by ``margin`` pixels."""
    outside = ~dilate(object_region > 0.0, margin)
    if not outside.any():
        raise ValueError("background_change: the object region covers the whole image")
    return float(np.abs(edited - source)[outside].mean())
