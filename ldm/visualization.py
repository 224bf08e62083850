"""Image grids for sweeps, training logs and reports (no torchvision: a grid is a few lines of PIL)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT, LABEL_SIZE = 17, 13  # pixels; at Pillow's default 10 px a space is 2 px wide and labels read as one word


def labelled_grid(
    images: Sequence[Image.Image],
    ncols: int,
    labels: Sequence[str] | None = None,
    padding: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile ``images`` row-major into ``ncols`` columns, each with an optional caption strip underneath."""
    if not images:
        raise ValueError("labelled_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    ncols = max(1, min(ncols, len(images)))
    nrows = (len(images) + ncols - 1) // ncols
    cell_w = max(im.width for im in images)
    label_h = LABEL_HEIGHT if labels is not None else 0
    cell_h = max(im.height for im in images) + label_h
    grid = Image.new("RGB", (ncols * cell_w + (ncols + 1) * padding, nrows * cell_h + (nrows + 1) * padding), background)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=LABEL_SIZE)
    for index, image in enumerate(images):
        row, col = divmod(index, ncols)
        x = padding + col * (cell_w + padding)
        y = padding + row * (cell_h + padding)
        grid.paste(image.convert("RGB"), (x, y))
        if labels is not None:
            text = _fit_text(labels[index], font, image.width - 4)
            draw.text((x + 2, y + image.height + 1), text, fill=(0, 0, 0), font=font)
    return grid


def _fit_text(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits in ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
