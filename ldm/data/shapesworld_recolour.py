"""ShapesWorld training pairs whose stand-in object is recoloured at random each time a pair is drawn.

A training pair's input is the base model's reverse edit of a subject photo: a circle of the base model's choosing
(the "stand-in") where the subject was. If every stand-in has one of a few looks, the fine-tune can learn the
identifier as "sks + a blue circle → the subject" and, with prior preservation, lose it on held-out circles of other
colours (docs/shapesworld.md, "Eighth session"). `generate_dataset.py --vary_template` answers that with the base
model's own colour edits, a handful of fixed colours per photo; here the stand-in gets a new colour at every draw
(a colour of the world or any colour), so that only the text can tell "sks <class>" from "<class>". It needs no
ground truth: the stand-in is found from the pair itself, as the part of the region the edit changed that stands
out from the input's background, and the background of a ShapesWorld image is the same along each row (solid or a
vertical gradient). That is what makes this a ShapesWorld tool; for real photos `--vary_template` is the general one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ldm.data.personalized_edit import PersonalizedBase
from ldm.data.shapesworld import COLOURS

logger = logging.getLogger(__name__)

WORLD_COLOURS = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0  # (6, 3)


def row_background(image: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """Background (3, H, W) of ``image`` (3, H, W): per row, the median of its pixels outside ``changed`` (H, W).

    A row that the changed region covers entirely takes the nearest row that it does not.
    """
    masked = image.masked_fill(changed[None], float("nan"))
    rows = masked.nanmedian(dim=2).values  # (3, H)
    valid = ~rows[0].isnan()  # (H,)
    if not valid.any():
        raise ValueError("the edit changed every row of the input: no background left to recolour against")
    index = torch.arange(rows.shape[1])
    known = index[valid]
    nearest = known[(index[:, None] - known[None]).abs().argmin(dim=1)]  # (H,)
    return rows[:, nearest, None].expand_as(image).clone()


def recolour_stand_in(source: torch.Tensor, target: torch.Tensor, colour: torch.Tensor, threshold: float = 0.08,
                      contrast: float = 0.12) -> torch.Tensor:
    """The input ``source`` (3, H, W) in [0, 1] with its stand-in object repainted in ``colour`` (3,).

    The changed region is where ``source`` and ``target`` differ by more than ``threshold`` (a pasted-back pair is
    equal outside it); the stand-in is the part of it farther than ``contrast`` from the row background. Each pixel
    of the changed region is shifted by its coverage α (its distance to the background over that of the stand-in's
    core) times (colour − the core's mean colour), so shading and anti-aliased edges keep their shape.
    Returns ``source`` unchanged when no stand-in is found.
    """
    changed = (source - target).abs().amax(dim=0) > threshold  # (H, W)
    if not changed.any():
        return source
    background = row_background(source, changed)
    distance = (source - background).abs().amax(dim=0)  # (H, W)
    stand_in = changed & (distance > contrast)
    if int(stand_in.sum()) < 4:
        return source
    core = stand_in & (distance >= distance[stand_in].median())
    mean = source[:, core].mean(dim=1)  # (3,)
    reach = (mean[:, None, None] - background).norm(dim=0).clamp_min(1e-3)  # (H, W)
    alpha = ((source - background).norm(dim=0) / reach).clamp(0.0, 1.0) * changed  # (H, W)
    return (source + alpha[None] * (colour - mean)[:, None, None]).clamp(0.0, 1.0)


class RecolouredStandIns(PersonalizedBase):
    """`PersonalizedBase` whose inputs have their stand-in recoloured (`recolour_stand_in`) at each draw.

    With probability ``recolour_p`` an item is recoloured: with probability ``world_colour_p`` to one of the six
    world colours, else to a uniformly random RGB colour (0.5 and 0.5: the setting measured on five seeds in
    docs/shapesworld.md). Draws use torch's default generator, which the data module seeds per item, so runs and their
    resumption stay exact; ``recolour_p=0`` draws nothing. Only for ``data_set="train"``.
    """

    def __init__(self, *args: Any, recolour_p: float = 0.5, world_colour_p: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, value in (("recolour_p", recolour_p), ("world_colour_p", world_colour_p)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        self.recolour_p = recolour_p
        self.world_colour_p = world_colour_p
        logger.info("RecolouredStandIns: stand-ins recoloured with probability %.2f", recolour_p)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        if self.data_set != "train" or self.recolour_p == 0.0:
            return item  # no draw either: the items and the generator's state are PersonalizedBase's
        draws = torch.rand(2)
        if draws[0] >= self.recolour_p:
            return item
        if draws[1] < self.world_colour_p:
            colour = WORLD_COLOURS[int(torch.randint(len(WORLD_COLOURS), ()))]
        else:
            colour = torch.rand(3)
        source, target = (item["c_concat"] + 1) / 2, (item["image"] + 1) / 2
        item["c_concat"] = recolour_stand_in(source, target, colour) * 2 - 1
        return item
