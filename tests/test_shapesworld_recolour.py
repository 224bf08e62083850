"""The stand-in recolouring of ShapesWorld training pairs: what it repaints, what it leaves alone, and its seeding."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ldm.data import shapesworld as sw
from ldm.data.personalized_edit import PersonalizedBase
from ldm.data.shapesworld_recolour import RecolouredStandIns, recolour_stand_in, row_background

GRADIENT = dict(bg_top=(30, 50, 95), bg_bottom=(150, 150, 160))


def pair(fill: str = "green", **changes) -> tuple[torch.Tensor, torch.Tensor, sw.Scene]:
    """A stand-in circle (input) and the dotted subject triangle at its place (target), (3, H, W) in [0, 1]."""
    circle = sw.Scene(shape="circle", fill=fill, cx=24.0, cy=30.0, r=14.0, **GRADIENT)
    circle = replace(circle, **changes)
    subject = replace(circle, shape="triangle", fill="dotted")
    as_tensor = lambda s: torch.from_numpy(sw.render(s).transpose(2, 0, 1).copy())  # noqa: E731
    return as_tensor(circle), as_tensor(subject), circle


def test_the_stand_in_takes_the_new_colour_and_nothing_else_changes():
    source, target, circle = pair("green")
    blue = torch.tensor(sw.COLOURS["blue"], dtype=torch.float32) / 255
    out = recolour_stand_in(source, target, blue)
    inside = torch.from_numpy(sw.object_mask(replace(circle, r=circle.r - 1.5)) > 0.99)  # the circle's interior
    outside = torch.from_numpy(sw.object_mask(replace(circle, r=circle.r + 1.5)) == 0)
    want = torch.from_numpy(sw.render(replace(circle, fill="blue")).transpose(2, 0, 1).copy())
    assert (out - want).abs()[:, inside].max() < 0.02  # the interior is the blue circle's
    assert (out - want).abs().amax(0).mean() < 0.01  # and so is the whole image, edges included, nearly
    assert torch.equal(out[:, outside], source[:, outside])  # the background is untouched, gradient and all
    assert not torch.equal(out, source)


def test_a_white_stand_in_on_a_dark_row_background_can_become_any_colour():
    source, target, circle = pair("white", bg_top=(25, 25, 30), bg_bottom=(25, 25, 30))
    colour = torch.tensor([0.9, 0.1, 0.6])
    out = recolour_stand_in(source, target, colour)
    inside = torch.from_numpy(sw.object_mask(replace(circle, r=circle.r - 1.5)) > 0.99)
    assert (out[:, inside] - colour[:, None]).abs().max() < 0.02


def test_a_pair_without_a_change_or_a_stand_in_is_returned_as_is():
    source, target, _ = pair()
    assert torch.equal(recolour_stand_in(source, source.clone(), torch.zeros(3)), source)
    # the target differs, but the input there is background only: no stand-in to repaint
    background = torch.from_numpy(sw.background(sw.Scene(shape="circle", fill="red", cx=0, cy=0, r=1, **GRADIENT))
                                  .transpose(2, 0, 1).copy())
    assert torch.equal(recolour_stand_in(background, target, torch.zeros(3)), background)


def test_row_background_fills_a_fully_changed_row_from_the_nearest_row():
    image = torch.arange(8, dtype=torch.float32).repeat(3, 6, 1).transpose(1, 2)  # (3, 8, 6): row r has value r
    changed = torch.zeros(8, 6, dtype=torch.bool)
    changed[3] = True  # all of row 3
    changed[5, :4] = True  # most of row 5
    image[:, 5, :4] = 99.0  # the changed pixels must not count
    background = row_background(image, changed)
    assert background[0, :, 0].tolist() == [0, 1, 2, 2, 4, 5, 6, 7]  # row 3 from row 2 (nearest; ties: the first)
    with pytest.raises(ValueError, match="every row"):
        row_background(image, torch.ones(8, 6, dtype=torch.bool))


def write_pairs(root, count: int = 3):
    """A pairs.jsonl folder of ``count`` ShapesWorld pairs (circle → dotted triangle), 64 px."""
    root.mkdir()
    rows = []
    for i, fill in enumerate(["green", "white", "red", "orange"][:count]):
        source, target, _ = pair(fill, cx=20.0 + 6 * i)
        for side, image in (("0", source), ("1", target)):
            sw.to_pil(image.numpy().transpose(1, 2, 0)).save(root / f"{i:03d}_{side}.png")
        rows.append({"input": f"{i:03d}_0.png", "target": f"{i:03d}_1.png",
                     "instruction": "replace the circle with a sks triangle"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def dataset(root, **kwargs) -> RecolouredStandIns:
    return RecolouredStandIns(root, size=64, repeats=4, flip_p=0.0, center_crop=True, placeholder_token="triangle",
                              source_word="circle", **kwargs)


def test_dataset_recolours_inputs_per_draw_reproducibly_and_never_the_targets(tmp_path):
    root = write_pairs(tmp_path / "pairs")
    plain, recoloured = dataset(root, recolour_p=0.0), dataset(root, recolour_p=1.0)
    base = PersonalizedBase(root, size=64, repeats=4, flip_p=0.0, center_crop=True, placeholder_token="triangle",
                            source_word="circle")
    for i in range(len(base)):  # recolour_p = 0: the plain dataset's items, exactly
        assert all(torch.equal(plain[i][k], base[i][k]) for k in ("image", "c_concat"))
    torch.manual_seed(0)
    items = [recoloured[i] for i in range(len(recoloured))]
    torch.manual_seed(0)
    assert all(torch.equal(a["c_concat"], b["c_concat"]) for a, b in zip(items, (recoloured[i] for i in range(12))))
    colours = set()
    for i, item in enumerate(items):
        reference = plain[i]
        assert torch.equal(item["image"], reference["image"]) and item["caption"] == reference["caption"]
        changed = (reference["c_concat"] - reference["image"]).abs().amax(0) > 0.16  # the edit's region
        assert torch.equal(item["c_concat"][:, ~changed], reference["c_concat"][:, ~changed])
        colours.add(tuple(np.round(item["c_concat"][:, 32, 20 + 6 * (i % 3)].numpy(), 2)))  # the circle's centre
    assert len(colours) >= 10  # twelve draws of three pairs: new colours, not three fixed looks


@pytest.mark.parametrize("name", ["recolour_p", "world_colour_p"])
def test_probabilities_outside_zero_one_are_errors(tmp_path, name):
    with pytest.raises(ValueError, match=name):
        dataset(write_pairs(tmp_path / "pairs", 1), **{name: 1.5})
