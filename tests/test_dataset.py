"""Paired editing data: joint crop/flip, alignment of mismatched partners, captions, manifest, construction-time
errors, image modes, and the train+reg epoch of the data module."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageOps
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch.utils.data import Dataset, DistributedSampler

from ldm import util
from ldm.data.datamodule import DataModuleFromConfig, TrainWithRegularization, reg_pair_index, worker_start_method
from ldm.data.personalized_edit import DatasetError, PersonalizedBase
from ldm.data.transforms import (
    PairWindow,
    crop_to_tensor,
    fit_for_edit,
    load_for_box,
    pair_crop_boxes,
    probe_image,
    resampling,
    transform_pair,
)
from ldm.util import instantiate_from_config

RED, GREEN, GREY = (230, 20, 20), (20, 230, 20), (110, 110, 110)


def scene(width: int, height: int, box: tuple[float, float, float, float] = (0.40, 0.40, 0.56, 0.56)) -> Image.Image:
    """Grey image with an asymmetric marker (red block, green block to its right) at the same *relative* place."""
    image = Image.new("RGB", (width, height), GREY)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    mid = (left + right) / 2
    draw.rectangle([left * width, top * height, mid * width - 1, bottom * height - 1], fill=RED)
    draw.rectangle([mid * width, top * height, right * width - 1, bottom * height - 1], fill=GREEN)
    return image


def marker(x: torch.Tensor) -> tuple[float, float, float, float]:
    """(red x, red y, green x, green y) centroids of a (3, H, W) tensor in [-1, 1]."""

    def centroid(mask: torch.Tensor) -> tuple[float, float]:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(xs) > 0, "marker not found"
        return xs.float().mean().item(), ys.float().mean().item()

    return (*centroid(x[0] - x[1] > 0.8), *centroid(x[1] - x[0] > 0.8))


def write_pair(root: Path, prefix: str, source: Image.Image, target: Image.Image, ext0=".png", ext1=".png") -> None:
    root.mkdir(parents=True, exist_ok=True)
    source.save(root / f"{prefix}_0{ext0}", format="PNG" if ext0.lower() == ".png" else "JPEG", quality=95)
    target.save(root / f"{prefix}_1{ext1}", format="PNG" if ext1.lower() == ".png" else "JPEG", quality=95)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> Image.Image:
    return Image.new("RGB", size, color)


# ----------------------------------------------------------------------------------------------- joint crop/flip


def test_joint_crop_and_flip_keep_the_pair_aligned(tmp_path: Path) -> None:
    # Input 960x640 PNG, target 192x128 JPEG: the same scene at 5x different resolution.
    write_pair(tmp_path, "00", scene(960, 640), scene(192, 128), ext1=".jpg")
    ds = PersonalizedBase(tmp_path, size=64, repeats=40, flip_p=0.5)
    flips, positions = 0, set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == item["c_concat"].shape == (3, 64, 64)
        assert item["image"].dtype == torch.float32
        m_target, m_input = marker(item["image"]), marker(item["c_concat"])
        assert np.allclose(m_target, m_input, atol=1.0), (m_target, m_input)
        flips += m_target[2] < m_target[0]  # green left of red: mirrored
        positions.add(round(m_target[0]))
    assert 8 <= flips <= 32  # flips happen, about half the time
    assert len(positions) > 5  # the crop window moves


def test_partners_of_different_aspect_stay_aligned(tmp_path: Path) -> None:
    # A photo and the edit_cli-sized partner made from it (ImageOps.fit crops the photo to a multiple-of-64 aspect).
    for prefix, (w, h) in (("00", (1400, 1000)), ("01", (1000, 1330))):
        photo = scene(w, h)
        generated = fit_for_edit(photo, 512)  # 512x384 (photo's sides cropped) / 448x576 (top and bottom cropped)
        assert abs(generated.width / generated.height - w / h) > 0.02
        write_pair(tmp_path, prefix, generated, photo, ext1=".jpg")
    ds = PersonalizedBase(tmp_path, size=64, repeats=20)
    for i in range(len(ds)):
        item = ds[i]
        assert np.allclose(marker(item["image"]), marker(item["c_concat"]), atol=1.0)


def test_pair_crop_boxes_same_relative_window_for_equal_aspects() -> None:
    box_a, box_b = pair_crop_boxes((6000, 4000), (576, 384), 256, offset=(0.3, 0.9))
    rel_a = np.array(box_a) / [6000, 4000, 6000, 4000]
    rel_b = np.array(box_b) / [576, 384, 576, 384]
    assert np.allclose(rel_a, rel_b)
    assert box_b[3] - box_b[1] == pytest.approx(384)  # short side → out_size: the window spans the full height
    centre_a, _ = pair_crop_boxes((300, 200), (300, 200), 100)
    assert centre_a == pytest.approx((50.0, 0.0, 250.0, 200.0))
    with pytest.raises(ValueError, match="offset"):
        pair_crop_boxes((300, 200), (300, 200), 100, offset=(1.5, 0.0))


def test_transform_pair_in_memory_matches_flip() -> None:
    a, b = scene(90, 60), scene(45, 30)
    plain = transform_pair(a, b, 32, PairWindow((0.0, 0.5), flip=False))
    flipped = transform_pair(a, b, 32, PairWindow((0.0, 0.5), flip=True))
    for x, y in zip(plain, flipped):
        assert torch.equal(x.flip(-1), y)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    scene(2048, 1536).save(path, quality=90)
    size = probe_image(path)
    box = pair_crop_boxes(size, size, 64)[0]
    image = load_for_box(path, size, box, 64)
    assert image.size == (256, 192)  # JPEG draft at 1/8: the window still has ≥ 64 px
    fast = crop_to_tensor(image, box, 64, size)
    full = crop_to_tensor(Image.open(path).convert("RGB"), box, 64)
    assert (fast - full).abs().mean() < 0.02


# ----------------------------------------------------------------------------------------------- captions


def test_caption_templates(tmp_path: Path) -> None:
    write_pair(tmp_path, "00", solid(GREY), solid(GREY))
    words = dict(placeholder_token="cat", identifier="zwx", source_word="dog", size=16)
    assert PersonalizedBase(tmp_path, **words)[0]["caption"] == "replace the dog with a zwx cat"
    assert PersonalizedBase(tmp_path, reg=True, **words)[0]["caption"] == "replace the dog with a cat"
    assert PersonalizedBase(tmp_path, data_set="val", **words)[0]["caption"] == "replace the dog with a zwx cat"
    custom = PersonalizedBase(tmp_path, template="turn the {source} into {identifier} {class_word} ({class})", **words)
    assert custom[0]["caption"] == "turn the dog into zwx cat (cat)"
    seed_default = PersonalizedBase(tmp_path, size=16)  # the seed's hard-coded words are the defaults
    assert seed_default[0]["caption"] == "replace the wolf with a sks dog"
    with pytest.raises(ValueError, match="placeholder"):
        PersonalizedBase(tmp_path, template="replace the {animal}", **words)


def test_manifest_preferred_over_file_names(tmp_path: Path) -> None:
    write_pair(tmp_path, "00", solid(RED), solid(RED))  # ignored: the manifest defines the pairs
    write_pair(tmp_path / "gen", "a", solid(GREEN), solid(GREEN), ext1=".jpg")
    write_pair(tmp_path / "gen", "b", solid(GREY), solid(GREY))
    records = [
        {"input": "gen/a_0.png", "target": "gen/a_1.jpg", "instruction": "make it a zwx cat", "seed": 3, "steps": 20},
        {"input": "gen/b_0.png", "target": "gen/b_1.png", "instruction": "add a zwx cat", "cfg_text": 7.5},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n\n")
    ds = PersonalizedBase(tmp_path, size=16, repeats=1, identifier="zwx")
    assert [p.input.name for p in ds.pairs] == ["a_0.png", "b_0.png"]
    assert [ds[i]["caption"] for i in range(2)] == ["make it a zwx cat", "add a zwx cat"]  # instruction wins
    assert ds[0]["image"][1].mean() > 0.5  # green target from the manifest, not the red 00 pair


def test_several_folders_are_read_one_after_the_other(tmp_path: Path) -> None:
    """A list of folders (main.py --data_root twice): the generated training pairs and labelled pairs made by another
    model, each folder with its own captions (a manifest, or the template for a folder of NN_0/NN_1 files)."""
    write_pair(tmp_path / "made", "00", solid(RED), solid(RED))
    write_pair(tmp_path / "made", "01", solid(GREEN), solid(GREEN))
    write_pair(tmp_path / "labelled", "a", solid(GREY), solid(GREY))
    (tmp_path / "labelled" / "pairs.jsonl").write_text(json.dumps(
        {"input": "a_0.png", "target": "a_1.png", "instruction": "replace the dog with a zwx cat (labelled)"}) + "\n")
    words = dict(placeholder_token="cat", identifier="zwx", source_word="dog", size=16, repeats=2)
    ds = PersonalizedBase([tmp_path / "made", str(tmp_path / "labelled")], **words)
    assert [(p.input.parent.name, p.input.name) for p in ds.pairs] == [
        ("made", "00_0.png"), ("made", "01_0.png"), ("labelled", "a_0.png")]
    assert (ds.num_images, len(ds)) == (3, 6)
    assert [ds[i]["caption"] for i in range(3)] == ["replace the dog with a zwx cat"] * 2 + [
        "replace the dog with a zwx cat (labelled)"]
    assert ds[1]["image"][1].mean() > 0.5  # the green pair of the first folder
    reversed_order = PersonalizedBase([tmp_path / "labelled", tmp_path / "made"], **words)
    assert reversed_order.pairs == ds.pairs[2:] + ds.pairs[:2]
    with pytest.raises(ValueError, match="more than once"):
        PersonalizedBase([tmp_path / "made", tmp_path / "made"], **words)
    with pytest.raises(ValueError, match="empty list"):
        PersonalizedBase([], **words)
    solid(GREY).save(tmp_path / "labelled" / "b_0.png")  # no partner, but the manifest defines that folder
    solid(GREY).save(tmp_path / "made" / "02_0.png")  # no partner in the scanned folder: a problem
    error = assert_problems([tmp_path / "labelled", tmp_path / "made", tmp_path / "gone"], "02_0.png", "gone",
                            "does not exist")
    assert len(error.problems) == 2


# ----------------------------------------------------------------------------------------------- errors


def assert_problems(root: Path, *needles: str, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        PersonalizedBase(root, size=16, **kwargs)
    for needle in needles:
        assert needle.lower() in str(info.value).lower(), (needle, str(info.value))
    return info.value


def test_every_problem_is_reported_at_construction_naming_the_file(tmp_path: Path) -> None:
    write_pair(tmp_path, "00", solid(GREY), solid(GREY))
    solid(GREY).save(tmp_path / "01_0.png")  # no target
    solid(GREY).save(tmp_path / "02_1.jpg")  # no input
    (tmp_path / "03_0.png").write_bytes(b"")  # 0 bytes
    solid(GREY).save(tmp_path / "03_1.png")
    (tmp_path / "04_0.png").write_text("not an image")  # unreadable
    solid(GREY).save(tmp_path / "04_1.png")
    solid(GREY, (6, 30)).save(tmp_path / "05_0.png")  # short side 6 < min_size 8
    solid(GREY).save(tmp_path / "05_1.png")
    scene(200, 150).save(tmp_path / "06_0.jpg")
    (tmp_path / "06_1.jpg").write_bytes((tmp_path / "06_0.jpg").read_bytes()[:-300])  # truncated scan data
    scene(200, 150).save(tmp_path / "07_0.png")
    (tmp_path / "07_1.png").write_bytes((tmp_path / "07_0.png").read_bytes()[:-300])  # truncated PNG
    solid(GREY).save(tmp_path / "photo.png")  # not a pair name
    error = assert_problems(
        tmp_path, "01_0.png", "02_1.jpg", "03_0.png", "0 bytes", "04_0.png", "05_0.png", "min_size", "06_1.jpg",
        "truncated", "07_1.png", "photo.png",
    )
    assert len(error.problems) == 8


def test_missing_or_empty_data_root(tmp_path: Path) -> None:
    assert_problems(tmp_path / "nope", str(tmp_path / "nope"), "does not exist")
    with pytest.raises(ValueError, match="data_root is not set"):
        PersonalizedBase(None)
    assert_problems(tmp_path, str(tmp_path), "no image pairs")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    solid(GREY).save(tmp_path / "sub" / "00_0.png")
    assert_problems(tmp_path, "no image pairs")  # non-images and subfolders are not pairs


def test_bad_manifest_lines_name_the_line(tmp_path: Path) -> None:
    write_pair(tmp_path, "00", solid(GREY), solid(GREY))
    lines = [
        json.dumps({"input": "00_0.png", "target": "00_1.png", "instruction": "ok"}),
        "{not json",
        json.dumps({"input": "00_0.png", "target": "missing_1.png", "instruction": "x"}),
        json.dumps({"input": "00_0.png", "target": "00_1.png"}),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    error = assert_problems(
        tmp_path, "pairs.jsonl line 2: invalid JSON", "line 3", "missing_1.png", "line 4", "instruction"
    )
    assert len(error.problems) == 3


def test_too_small_threshold(tmp_path: Path) -> None:
    # Default min_size = size // 2: a 384x576 generated partner of a photo is fine at 256, a 100 px thumbnail not.
    write_pair(tmp_path, "00", ImageOps.fit(scene(600, 900), (384, 576)), scene(600, 900), ext1=".jpg")
    assert PersonalizedBase(tmp_path, size=256).min_size == 128
    scene(100, 150).save(tmp_path / "00_0.png")
    with pytest.raises(DatasetError, match="00_0.png: 100x150 is smaller than min_size 128"):
        PersonalizedBase(tmp_path, size=256)
    assert PersonalizedBase(tmp_path, size=256, min_size=64).num_images == 1


def test_bad_parameters(tmp_path: Path) -> None:
    write_pair(tmp_path, "00", solid(GREY), solid(GREY))
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        PersonalizedBase(tmp_path, size=16, interpolation="cubic")
    with pytest.raises(ValueError, match="size"):
        PersonalizedBase(tmp_path, size=None)
    with pytest.raises(ValueError, match="flip_p"):
        PersonalizedBase(tmp_path, size=16, flip_p=2.0)
    assert resampling("linear") == Image.Resampling.BILINEAR  # the seed crashed on Pillow >= 10 here
    ds = PersonalizedBase(tmp_path, size=16, repeats=3)
    with pytest.raises(IndexError):
        ds[3]


def test_legacy_parameters_are_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_pair(tmp_path, "00", solid(GREY), solid(GREY))
    util._reported_legacy.clear()
    with caplog.at_level(logging.INFO, logger="ldm.data.personalized_edit"):
        for _ in range(2):
            PersonalizedBase(tmp_path, size=16, per_image_tokens=False, coarse_class_text="red", mixing_prob=0.25)
    assert sum("coarse_class_text='red'" in r.message for r in caplog.records) == 1
    assert not any("per_image_tokens" in r.message or "mixing_prob" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------------------------- files and modes


def test_discovery_is_sorted_and_ignores_non_pairs(tmp_path: Path) -> None:
    for prefix in ("10", "02", "my_pic"):
        write_pair(tmp_path, prefix, solid(GREY), solid(GREY), ext0=".JPG", ext1=".png")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "._02_0.jpg").write_bytes(b"\0\5\26\7")  # macOS AppleDouble file: hidden, not an image
    (tmp_path / "sub").mkdir()
    ds = PersonalizedBase(tmp_path, size=16, repeats=2)
    assert [p.input.name for p in ds.pairs] == ["02_0.JPG", "10_0.JPG", "my_pic_0.JPG"]
    assert [p.target.name for p in ds.pairs] == ["02_1.png", "10_1.png", "my_pic_1.png"]
    assert len(ds) == 6


def test_png_bytes_under_jpg_name(tmp_path: Path) -> None:
    scene(60, 40).save(tmp_path / "00_0.jpg", format="PNG")
    scene(120, 80).save(tmp_path / "00_1.jpeg", format="JPEG", quality=95)
    item = PersonalizedBase(tmp_path, size=32, data_set="val")[0]
    assert np.allclose(marker(item["image"]), marker(item["c_concat"]), atol=1.0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    photo = scene(300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": store the pixels rotated counter-clockwise
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "00_1.jpg", quality=95, exif=exif.tobytes())
    photo.resize((150, 100)).save(tmp_path / "00_0.png")
    assert probe_image(tmp_path / "00_1.jpg") == (300, 200)
    (tmp_path / "extra").mkdir()  # subfolders are not part of the dataset
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "extra" / "rotated.png", exif=exif.tobytes())
    assert probe_image(tmp_path / "extra" / "rotated.png") == (300, 200)  # PNG eXIf chunk too
    ds = PersonalizedBase(tmp_path, size=32, repeats=5)
    for i in range(len(ds)):
        item = ds[i]
        assert np.allclose(marker(item["image"]), marker(item["c_concat"]), atol=1.0)


def _palette_image() -> Image.Image:
    image = Image.new("P", (24, 20), 0)
    image.putpalette([110, 110, 110] * 256)
    return image


MODES = {  # mode: (uniform image, extension, the grey level it must load as)
    "L": (lambda: Image.new("L", (24, 20), 110), ".png", 110),
    "LA": (lambda: Image.new("LA", (24, 20), 0), ".png", 255),  # fully transparent: composited on white
    "RGBA": (lambda: Image.new("RGBA", (24, 20), 0), ".png", 255),
    "P": (_palette_image, ".png", 110),
    "CMYK": (lambda: Image.new("CMYK", (24, 20), (0, 0, 0, 127)), ".jpg", 128),
    "I;16": (lambda: Image.fromarray(np.full((20, 24), 32768, np.uint16)), ".png", 128),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes_convert_to_rgb(mode: str, tmp_path: Path) -> None:
    make, ext, grey = MODES[mode]
    make().save(tmp_path / f"00_0{ext}")
    assert Image.open(tmp_path / f"00_0{ext}").mode == mode
    solid(GREY).save(tmp_path / "00_1.png")
    x = PersonalizedBase(tmp_path, size=16, data_set="val")[0]["c_concat"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, grey / 127.5 - 1), atol=0.03)


# ----------------------------------------------------------------------------------------------- randomness


def test_validation_is_deterministic_centre_crop(tmp_path: Path) -> None:
    write_pair(tmp_path, "00", scene(90, 60), scene(180, 120))
    ds = PersonalizedBase(tmp_path, size=32, data_set="val", repeats=10)
    assert len(ds) == 1  # no repeats outside training
    first, second = ds[0], ds[0]
    assert torch.equal(first["image"], second["image"])
    expected_input, expected_target = transform_pair(scene(90, 60), scene(180, 120), 32)
    assert torch.allclose(first["image"], expected_target, atol=1e-6)
    assert torch.allclose(first["c_concat"], expected_input, atol=1e-6)


def test_training_items_reproducible_from_torch_seed(tmp_path: Path) -> None:
    write_pair(tmp_path, "00", scene(90, 60), scene(180, 120))
    ds = PersonalizedBase(tmp_path, size=32, repeats=8)

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([ds[i]["image"] for i in range(len(ds))])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


# ----------------------------------------------------------------------------------------------- data module

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def colour_dataset(root: Path, n: int) -> Path:
    """n pairs, pair k solid COLORS[k] (input and target), so an item's pair is readable from its pixels."""
    for k in range(n):
        write_pair(root, f"{k:02d}", solid(COLORS[k]), solid(COLORS[k]))
    return root


def pair_ids(images: torch.Tensor) -> list[int]:
    """Pair index of each (B, 3, H, W) item from its mean colour."""
    palette = torch.tensor(COLORS, dtype=torch.float32) / 127.5 - 1
    means = images.mean(dim=(2, 3))
    return torch.cdist(means, palette).argmin(dim=1).tolist()


def data_config(tmp_path: Path, train_pairs: int = 3, reg_pairs: int = 5, **params) -> dict:
    def dataset(root: Path, **extra) -> dict:
        return {"target": "ldm.data.personalized_edit.PersonalizedBase", "params": {"data_root": str(root), **extra}}

    train_root = colour_dataset(tmp_path / "train", train_pairs)
    reg_root = colour_dataset(tmp_path / "reg", reg_pairs)
    return {
        "target": "ldm.data.datamodule.DataModuleFromConfig",
        "params": {
            "batch_size": 2,
            "num_workers": 0,
            "train": dataset(train_root, size=16, repeats=4, placeholder_token="cat", identifier="zwx"),
            "reg": dataset(reg_root, size=16, repeats=10, reg=True, placeholder_token="cat"),
            "validation": dataset(train_root, size=16, data_set="val", placeholder_token="cat", identifier="zwx"),
            **params,
        },
    }


def test_datamodule_epoch_pairs_train_with_evenly_used_reg(tmp_path: Path) -> None:
    dm = instantiate_from_config(data_config(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 12  # 3 train pairs x 4 repeats (not min(len(train), len(reg)) as in the seed)
    train_ids: list[int] = []
    reg_ids: list[int] = []
    for batch in loader:
        assert isinstance(batch, list) and len(batch) == 2
        train, reg = batch
        assert train["image"].shape == train["c_concat"].shape == reg["image"].shape == (2, 3, 16, 16)
        assert train["caption"] == ["replace the wolf with a zwx cat"] * 2
        assert reg["caption"] == ["replace the wolf with a cat"] * 2
        train_ids += pair_ids(train["image"])
        reg_ids += pair_ids(reg["c_concat"])
    assert Counter(train_ids) == {0: 4, 1: 4, 2: 4}  # train repeats respected
    reg_counts = Counter(reg_ids)
    assert set(reg_counts) == set(range(5)) and max(reg_counts.values()) - min(reg_counts.values()) <= 1
    val_batch = next(iter(dm.val_dataloader()))
    assert isinstance(val_batch, dict) and val_batch["image"].shape == (2, 3, 16, 16)
    assert is_overridden("val_dataloader", dm) and not is_overridden("test_dataloader", dm)  # Lightning: no test


def test_reg_pairing_even_varied_and_ddp_split() -> None:
    counts = Counter(reg_pair_index(i, 17) for i in range(18 * 100))  # golden_dog: 18 train pairs x 100, 17 reg
    assert set(counts.values()) <= {105, 106}
    partners = {reg_pair_index(i, 17) for i in range(0, 1800, 18)}  # every item of train pair 0
    assert len(partners) > 10

    class Index:  # item i → i, so the couples are visible
        num_images = 4

        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> int:
            return i

    ds = TrainWithRegularization(Index(24), Index(40))
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        seen.append([ds[i] for i in sampler])
    assert not {t for t, _ in seen[0]} & {t for t, _ in seen[1]}  # ranks see different samples
    assert sorted(seen[0] + seen[1]) == sorted(ds[i] for i in range(24))  # same couples as one process
    assert Counter(r for _, r in seen[0] + seen[1]) == {0: 6, 1: 6, 2: 6, 3: 6}


def test_datamodule_order_and_augmentation_follow_its_seed_not_the_workers(tmp_path: Path) -> None:
    """An epoch's batches are a function of the data module's seed and the epoch: the same with 0 or 2 workers,
    whatever the global RNG state, different for another seed or another epoch."""

    def epoch(seed: int, workers: int, number: int = 0) -> torch.Tensor:
        config = data_config(tmp_path, num_workers=workers)
        config["params"]["seed"] = seed
        dm = instantiate_from_config(config)
        dm.setup("fit")
        torch.manual_seed(1000 + seed + workers)  # the global RNG must not matter
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(number)
        if workers:
            assert loader.persistent_workers and loader.worker_init_fn is not None
        return torch.cat([torch.cat([t["image"], r["image"]]) for t, r in loader])

    first = epoch(5, workers=2)
    assert torch.equal(first, epoch(5, workers=0))
    assert not torch.equal(first, epoch(6, workers=2))
    assert not torch.equal(first, epoch(5, workers=2, number=1))


class ParentPid(Dataset):
    """Each item is the process id of the process that started the worker loading it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return os.getppid()


def test_datamodule_workers_are_not_forked_from_the_training_process(tmp_path: Path) -> None:
    """Forking a process with threads can deadlock the child (CPython 3.11, python/cpython#112275: a DDP rank hung
    this way in the test suite); the workers are forked from a fork server instead."""
    assert worker_start_method() == "forkserver"  # Linux and macOS have one
    dm = instantiate_from_config(data_config(tmp_path, num_workers=1))
    assert dm.num_workers == 1
    parents = {int(pid) for batch in dm._loader(ParentPid(), shuffle=False) for pid in batch}
    assert len(parents) == 1 and os.getpid() not in parents


def test_datamodule_legacy_config_and_missing_splits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = data_config(tmp_path, num_workers=96, wrap=False)
    del config["params"]["reg"], config["params"]["validation"]
    with caplog.at_level(logging.WARNING):
        dm = instantiate_from_config(config)
    assert dm.num_workers <= (os.cpu_count() or 1)
    assert any("num_workers=96" in r.message for r in caplog.records)
    dm.num_workers = 0
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, dict)  # without reg: plain train batches
    assert not is_overridden("val_dataloader", dm)  # not bound: Lightning skips validation
    with pytest.raises(ValueError, match="reg"):
        DataModuleFromConfig(batch_size=1, reg=config["params"]["train"])


class Recorder(pl.LightningModule):
    """Writes each rank's (train pair, reg pair) ids and its count of dict validation batches to out/rank<r>.json."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen: list[list[int]] = []
        self.val_dicts = 0

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        train, reg = batch
        self.seen += [list(p) for p in zip(pair_ids(train["image"]), pair_ids(reg["image"]))]
        return (self.w**2).sum()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_dicts += isinstance(batch, dict)

    def on_train_end(self) -> None:
        record = {"seen": self.seen, "val_dicts": self.val_dicts}
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_lightning_ddp_ranks_see_different_couples(tmp_path: Path) -> None:
    pl.seed_everything(23)
    dm = instantiate_from_config(data_config(tmp_path, batch_size=1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, enable_model_summary=False,
    )
    trainer.fit(Recorder(tmp_path), dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["val_dicts"] > 0 for r in ranks)  # validation batches are plain dicts
    seen = [tuple(couple) for r in ranks for couple in r["seen"]]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 6  # 12 items split over 2 ranks
    assert Counter(t for t, _ in seen) == {0: 4, 1: 4, 2: 4}
    reg_counts = Counter(r for _, r in seen)
    assert max(reg_counts.values()) - min(reg_counts.values()) <= 1


def test_seed_finetune_config_data_section(tmp_path: Path) -> None:
    from tests.reference import reference_config

    data = reference_config("seed-v1-finetune_unfrozen.yaml").data
    assert data.target == "main.DataModuleFromConfig"  # main.py re-exports ldm.data.datamodule's class
    data.target = "ldm.data.datamodule.DataModuleFromConfig"
    for name, n in (("train", 3), ("reg", 2)):
        for k in range(n):
            write_pair(tmp_path / name, f"{k:02d}", solid(COLORS[k], (160, 130)), solid(COLORS[k], (160, 130)))
    # What main.py does with --data_root, --reg_data_root, --class_word and the new identifier/source flags.
    for split, root in (("train", "train"), ("reg", "reg"), ("validation", "train")):
        params = data.params[split].params
        params.data_root, params.placeholder_token = str(tmp_path / root), "cat"
        params.identifier, params.source_word = "zwx", "dog"
    dm = instantiate_from_config(data)
    dm.num_workers = 0
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 300  # 3 pairs x repeats 100
    train, reg = next(iter(loader))
    assert train["image"].shape == reg["c_concat"].shape == (1, 3, 256, 256)
    assert train["caption"] == ["replace the dog with a zwx cat"] and reg["caption"] == ["replace the dog with a cat"]
    assert len(dm.val_dataloader().dataset) == 3  # validation: no repeats
