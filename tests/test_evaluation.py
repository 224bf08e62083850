"""Edit evaluation (ldm/evaluation, scripts/evaluate.py): preprocessing, encoders, metric math, the CLI, training.

The encoders are tiny random-weight DINO / CLIP models saved with ``save_pretrained`` (the loading-by-folder path
runs); the preprocessing is checked against transformers' image processors configured like the published
``facebook/dino-vits16`` and ``openai/clip-vit-base-patch32`` preprocessor configs, on scikit-image's real photos.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import MissingFileError, UsageError
from ldm.evaluation.metrics import (PSNR_CAP, cosine_matrix, masked_l1, masked_psnr, masked_ssim, mean_similarity,
                                    ssim_centres, target_caption)
from ldm.evaluation.models import load_clip, load_dino
from ldm.evaluation.preprocessing import CLIP_TRANSFORM, DINO_TRANSFORM, blank_region, box_mask, mask_box, preprocess
from ldm.evaluation.scoring import EditSample, EditScorer
from tests.tiny import REPO

# The published preprocessor_config.json of each model (hub files, as of 2023-2026).
DINO_VITS16_PREPROCESSOR = {
    "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224,
}
CLIP_B32_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


@pytest.fixture(scope="module")
def processors():
    from transformers import CLIPImageProcessor, ViTImageProcessor

    return ViTImageProcessor.from_dict(DINO_VITS16_PREPROCESSOR), CLIPImageProcessor.from_dict(CLIP_B32_PREPROCESSOR)


def save_tiny_encoders(folder: Path) -> tuple[Path, Path]:
    """Random-weight DINO (ViT, patch 16) and CLIP (ViT patch 32 + text) folders, CLIP with its tokenizer."""
    from ldm.evaluation.models import random_encoders
    from ldm.modules.encoders.tokenizer import save_clip_tokenizer

    dino, clip = random_encoders(seed=0)
    dino.model.save_pretrained(folder / "dino")
    clip.model.save_pretrained(folder / "clip")
    save_clip_tokenizer(folder / "clip")
    return folder / "dino", folder / "clip"


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def encoders(encoder_dirs):
    return load_dino(str(encoder_dirs[0])), load_clip(str(encoder_dirs[1]))


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("name, crop", [("astronaut", None), ("chelsea", None), ("coffee", None),
                                        ("coffee", (37, 11, 190, 350)), ("rocket", (0, 0, 640, 101))])
def test_preprocessing_equals_the_published_processors(processors, name, crop):
    vit, clip = processors
    image = _photo(name)
    image = image.crop(crop) if crop else image
    for processor, transform in ((vit, DINO_TRANSFORM), (clip, CLIP_TRANSFORM)):
        expected = processor(images=[image], return_tensors="pt")["pixel_values"]
        ours = preprocess([image], transform)
        assert ours.shape == expected.shape == (1, 3, 224, 224)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (name, transform.resize)


def test_region_helpers():
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:9, 20:31] = True
    assert mask_box(mask) == (20, 5, 31, 9)
    assert np.array_equal(box_mask((20, 5, 31, 9), 50, 40), mask)
    assert box_mask((-5, -5, 3, 2), 50, 40).sum() == 3 * 2  # clipped to the image
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((4, 4), dtype=bool))
    image = Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8))
    blanked = np.asarray(blank_region(image, mask))
    assert (blanked[mask] == 0).all() and (blanked[~mask] == 200).all()


# ---------------------------------------------------------------------------------------------------------------
# Encoders


def test_encoders_embed_like_the_transformers_pipeline(encoders, processors):
    dino, clip = encoders
    vit_processor, clip_processor = processors
    images = [_photo("astronaut"), _photo("chelsea")]
    with torch.no_grad():
        cls = dino.model(**vit_processor(images=images, return_tensors="pt")).last_hidden_state[:, 0]
        image_features = clip.model.get_image_features(**clip_processor(images=images, return_tensors="pt"))
        tokens = clip.tokenizer(["a photo of a dog", "a cat"], padding="max_length", max_length=77, return_tensors="pt")
        text_features = clip.model.get_text_features(**tokens)
    assert torch.allclose(dino.embed(images), cls, atol=1e-5)
    assert torch.allclose(clip.embed_images(images), image_features.pooler_output, atol=1e-5)
    assert torch.allclose(clip.embed_texts(["a photo of a dog", "a cat"]), text_features.pooler_output, atol=1e-5)
    assert clip.tokenizer.vocab_size == 49408


def test_subject_similarity_is_the_mean_over_references(encoders):
    dino, clip = encoders
    scorer = EditScorer(dino, clip)
    photos = [_photo("astronaut"), _photo("chelsea"), _photo("coffee")]
    references = scorer.references(photos[1:])
    rows = scorer.score([EditSample(photos[0], "a photo of a cat"), EditSample(photos[1], "a photo of a cat")],
                        references)
    embeddings = dino.embed(photos)
    expected = [float(cosine_matrix(embeddings[i : i + 1], embeddings[1:]).mean()) for i in (0, 1)]
    assert [r["dino_subject"] for r in rows] == pytest.approx(expected, abs=1e-6)
    # the second edit is one of the two references: its similarity is (1 + cos(chelsea, coffee)) / 2
    assert rows[1]["dino_subject"] == pytest.approx((1 + float(cosine_matrix(embeddings[1:2], embeddings[2:3]))) / 2, abs=1e-6)
    assert rows[0]["dino_subject"] < rows[1]["dino_subject"]
    assert all(math.isnan(r["bg_l1"]) for r in rows)  # no source, no mask: no background metric


def test_identical_images_score_one(encoders):
    scorer = EditScorer(*encoders)
    photo = _photo("coffee")
    mask = np.zeros((photo.height, photo.width), dtype=bool)
    mask[100:200, 150:300] = True
    (row,) = scorer.score([EditSample(photo, "a cup of coffee", source=photo.copy(), mask=mask)],
                          scorer.references([photo.crop(mask_box(mask))]))
    for name in ("dino_subject", "clip_i_subject", "bg_dino", "bg_clip_i", "bg_ssim"):
        assert row[name] == pytest.approx(1.0, abs=1e-5), name
    assert row["bg_l1"] == 0.0 and row["bg_psnr"] == PSNR_CAP


def test_missing_models_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingFileError, match=r"huggingface-cli download facebook/dino-vits16 .*--dino models/dino-vits16"):
        load_dino(str(tmp_path / "nowhere"))
    with pytest.raises(MissingFileError, match=r"not in the local hub cache.*huggingface-cli download i2d-test/no-such-clip"):
        load_clip("i2d-test/no-such-clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        load_clip(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------------------------
# Metric math


def _noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0.0, 1.0).astype(np.float32)


def test_cosine_and_mean_similarity():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    refs = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    expected = torch.tensor([[1.0, 2**-0.5, 0.0], [0.0, 2**-0.5, -1.0]])
    assert torch.allclose(cosine_matrix(a, refs), expected, atol=1e-6)
    assert torch.allclose(mean_similarity(a, refs), expected.mean(dim=1), atol=1e-6)


def test_psnr_and_ssim_equal_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    clean = np.asarray(_photo("astronaut").resize((128, 128)), dtype=np.float32) / 255.0
    noisy = _noisy(clean, 0.08, 1)
    assert masked_psnr(noisy, clean) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=1.0), abs=1e-6)
    expected_ssim = structural_similarity(clean, noisy, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
    assert masked_ssim(noisy, clean) == pytest.approx(expected_ssim, abs=1e-5)
    assert 0.2 < expected_ssim < 0.9  # a real, non-trivial comparison

    keep = np.ones((128, 128), dtype=bool)
    keep[30:70, 40:100] = False
    assert masked_psnr(noisy, clean, keep) == pytest.approx(
        peak_signal_noise_ratio(clean[keep], noisy[keep], data_range=1.0), abs=1e-6)
    assert masked_l1(noisy, clean, keep) == pytest.approx(np.abs(noisy - clean)[keep].mean(), abs=1e-7)
    _, full_map = structural_similarity(clean, noisy, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, full=True)
    centres = ssim_centres(keep)
    assert centres.shape == (118, 118) and not centres[30:60, 40:90].any() and centres[:19].all()
    per_pixel = full_map.mean(axis=-1)[5:-5, 5:-5]  # scikit-image's map, same-size; its valid part
    assert masked_ssim(noisy, clean, keep) == pytest.approx(per_pixel[centres].mean(), abs=1e-5)


def test_background_metrics_ignore_changes_inside_the_mask():
    clean = np.asarray(_photo("chelsea").resize((96, 64)), dtype=np.float32) / 255.0
    subject = np.zeros((64, 96), dtype=bool)
    subject[10:40, 20:60] = True
    edited = clean.copy()
    edited[subject] = 1.0 - edited[subject]  # a large change, inside the subject mask only
    assert masked_l1(edited, clean, ~subject) == 0.0
    assert masked_psnr(edited, clean, ~subject) == PSNR_CAP
    assert masked_ssim(edited, clean, ~subject) == pytest.approx(1.0, abs=1e-6)
    assert masked_l1(edited, clean) > 0.05 and masked_psnr(edited, clean) < 20 and masked_ssim(edited, clean) < 0.9
    # a change outside the mask is seen at its exact size
    edited[50:60, 0:10] += 0.1
    assert masked_l1(edited, clean, ~subject) == pytest.approx(0.1 * 100 * 3 / ((~subject).sum() * 3), abs=1e-6)
    assert masked_psnr(edited, clean, ~subject) == pytest.approx(10 * math.log10((~subject).sum() / (0.01 * 100)), abs=1e-4)
    # nothing left to compare
    assert math.isnan(masked_l1(edited, clean, np.zeros((64, 96), dtype=bool)))
    assert math.isnan(masked_ssim(edited, clean, np.zeros((64, 96), dtype=bool)))


@pytest.mark.parametrize("instruction, caption", [
    ("replace the wolf with a sks dog", "a photo of a dog"),
    ("Replace the wolf with an SKS owl.", "a photo of an owl"),
    ("turn the cat into a sks tiger", "a photo of a tiger"),
    ("make the square red", "a photo of a red square"),
    ("replace the circle with a sks star", "a photo of a star"),
    ("make it snowy", "make it snowy"),
    ("put a sks hat on it", "put a hat on it"),
])
def test_target_caption(instruction, caption):
    assert target_caption(instruction, "sks") == caption


# ---------------------------------------------------------------------------------------------------------------
# The CLI on ShapesWorld scenes with ground-truth masks


def _write_edit(image: Image.Image, path: Path, metadata: dict) -> None:
    info = PngInfo()
    info.add_text("instruct2dream", json.dumps(metadata))
    image.save(path, pnginfo=info)


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory) -> Path:
    """Sources (red circles), perfect edits into the striped subject star, noisy edits, subject photos, masks."""
    from ldm.data.shapesworld import object_mask, random_scene, render, to_pil

    root = tmp_path_factory.mktemp("shapesworld")
    for folder in ("sources", "perfect", "noisy", "references", "masks"):
        (root / folder).mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        source = random_scene(rng, 64, shape="circle", fill="red")
        edit = replace(source, shape="star", fill="subject")
        to_pil(render(source)).save(root / "sources" / f"scene{i}.png")
        metadata = {"edit": "replace the circle with a sks star", "input": f"scene{i}.png", "resolution": 64,
                    "ckpt": "step=000200.ckpt"}
        _write_edit(to_pil(render(edit)), root / "perfect" / f"scene{i}_edit.png", metadata)
        _write_edit(to_pil(_noisy(render(edit), 0.05, i)), root / "noisy" / f"scene{i}_edit.png",
                    {**metadata, "ckpt": "step=000100.ckpt"})
        region = (object_mask(source) > 0) | (object_mask(edit) > 0)  # where the edit may change pixels
        Image.fromarray(region.astype(np.uint8) * 255).save(root / "masks" / f"scene{i}.png")
        to_pil(render(random_scene(rng, 64, shape="star", fill="subject"))).save(root / "references" / f"photo{i}.png")
    return root


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_end_to_end_on_shapesworld(shapes_world, encoder_dirs, tmp_path):
    from scripts.evaluate import main

    out = tmp_path / "eval"
    root = shapes_world
    code = main(["--edits", str(root / "noisy"), "--edits", str(root / "perfect"), "--sources", str(root / "sources"),
                 "--references", str(root / "references"), "--masks", str(root / "masks"),
                 "--dino", str(encoder_dirs[0]), "--clip", str(encoder_dirs[1]), "--out", str(out), "--quiet"])
    assert code == 0
    rows = _read_rows(out / "results.csv")
    assert [(r["run"], Path(r["edit"]).name, Path(r["source"]).name) for r in rows] == [
        (run, f"scene{i}_edit.png", f"scene{i}.png") for run in ("noisy", "perfect") for i in range(3)]
    for row in rows:
        assert row["caption"] == "a photo of a star" and row["region"] == "mask"
        for name in ("dino_subject", "clip_i_subject", "clip_t", "bg_dino", "bg_clip_i"):
            assert -1.0 <= float(row[name]) <= 1.0 + 1e-6
    perfect = [r for r in rows if r["run"] == "perfect"]
    noisy = [r for r in rows if r["run"] == "noisy"]
    for row in perfect:  # the background is untouched outside the ground-truth mask
        assert float(row["bg_l1"]) == 0.0 and float(row["bg_psnr"]) == PSNR_CAP
        assert float(row["bg_ssim"]) == pytest.approx(1.0, abs=1e-6)
        assert float(row["bg_dino"]) == pytest.approx(1.0, abs=1e-5)
        assert row["step"] == "200"  # from the checkpoint name in the metadata
    for row in noisy:
        assert 0.02 < float(row["bg_l1"]) < 0.06 and 20 < float(row["bg_psnr"]) < 32 and float(row["bg_ssim"]) < 0.9
    report = (out / "report.md").read_text()
    assert "| noisy | 100 | 3 |" in report and "| perfect | 200 | 3 |" in report
    assert f"DINO: `{encoder_dirs[0]}`" in report
    assert "resize 224×224 (squash), bilinear" in report and "centre crop 224×224" in report
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"dino_subject_distribution.png", "bg_l1_distribution.png", "bg_l1_by_run.png", "clip_t_by_run.png"} <= plots
    assert Image.open(out / "plots" / "bg_l1_by_run.png").size[0] > 100


def test_cli_boxes_prompt_and_no_metadata(shapes_world, encoder_dirs, tmp_path):
    from scripts.evaluate import main

    plain = tmp_path / "plain"
    plain.mkdir()
    for path in sorted((shapes_world / "perfect").iterdir()):
        Image.open(path).save(plain / path.name.replace("_edit", ""))  # no metadata; same stem as the source
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"scene0": [0, 0, 64, 64], "scene1.png": [10, 10, 20, 20]}))
    out = tmp_path / "eval"
    code = main(["--edits", f"final={plain}", "--sources", str(shapes_world / "sources"), "--boxes", str(boxes),
                 "--prompt", "replace the circle with a sks star", "--dino", str(encoder_dirs[0]), "--clip",
                 str(encoder_dirs[1]), "--out", str(out), "--quiet"])
    assert code == 0
    rows = {Path(r["edit"]).stem: r for r in _read_rows(out / "results.csv")}
    assert [rows[s]["region"] for s in ("scene0", "scene1", "scene2")] == ["box", "box", "whole"]
    assert rows["scene0"]["bg_l1"] == ""  # the box covers the whole image: no background left
    assert float(rows["scene1"]["bg_l1"]) > 0  # the star is mostly outside that small box
    assert rows["scene2"]["bg_l1"] == "" and rows["scene2"]["dino_subject"] == ""  # no box; no references
    assert rows["scene2"]["clip_t"] != ""


def test_cli_user_errors_are_one_line(shapes_world, encoder_dirs, tmp_path, capsys, monkeypatch):
    from scripts.evaluate import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["--edits", str(shapes_world / "perfect"), "--out", str(tmp_path / "out")]
    # the real command line: exit status 2, one line, no traceback
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *base, "--dino", "i2d-test/no-such-dino"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "huggingface-cli download i2d-test/no-such-dino" in line and "--dino" in line
    cases = [
        (["--dino", str(encoder_dirs[0]), "--clip", str(tmp_path / "missing")],
         "huggingface-cli download openai/clip-vit-base-patch32 --local-dir models/clip-vit-base-patch32"),
        (["--dino", str(encoder_dirs[0]), "--clip", str(encoder_dirs[1]), "--masks", str(tmp_path / "nope")], "--masks"),
        (["--references", str(tmp_path / "nope")], "--references"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert message in line, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Validation metrics during training (ImageLogger eval_models)


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    from tests.test_train import TINY_TRAIN, make_pairs
    from tests.tiny import save_tiny_checkpoint

    if not (tmp_path / "base.ckpt").exists():
        save_tiny_checkpoint(tmp_path / "base.ckpt", seed=5)
        make_pairs(tmp_path / "train", 2, 1)
        make_pairs(tmp_path / "reg", 2, 2)
    command = [sys.executable, str(REPO / "main.py"), "-l", str(tmp_path / "logs"), "-b", str(TINY_TRAIN),
               "--actual_resume", str(tmp_path / "base.ckpt"), "--data_root", str(tmp_path / "train"),
               "--reg_data_root", str(tmp_path / "reg"), "--class_word", "dog", "--identifier", "sks", "-t",
               "--max_steps", "4", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("INSTRUCT2DREAM_RUN_TIMESTAMP", None)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_training_logs_validation_metrics(encoder_dirs, tmp_path):
    params = "lightning.callbacks.image_logger.params"
    result = _train(tmp_path, "-n", "scored", f"{params}.eval_models.dino={encoder_dirs[0]}",
                    f"{params}.eval_models.clip={encoder_dirs[1]}", f"{params}.eval_every=4")
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = (tmp_path / "logs").glob("*_scored")
    rows = _read_rows(run / "metrics.csv")
    scored = [r for r in rows if r.get("val/clip_t")]
    assert [r["step"] for r in scored] == ["4"]  # grids at steps 2 and 4; scored only where step % eval_every == 0
    for name in ("val/clip_t", "val/dino_subject", "val/clip_i_subject"):
        value = float(scored[0][name])
        assert math.isfinite(value) and -1.0 <= value <= 1.0 + 1e-6, name
    assert sorted(p.name for p in (run / "images" / "train").iterdir()) == ["gs-000002.png", "gs-000004.png"]


def test_training_with_missing_eval_model_stops_before_training(encoder_dirs, tmp_path):
    result = _train(tmp_path, "-n", "missing", f"lightning.callbacks.image_logger.params.eval_models.dino={tmp_path / 'nope'}")
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "eval_models.dino" in line and "huggingface-cli download facebook/dino-vits16" in line
    assert "Traceback" not in result.stderr
    (run,) = (tmp_path / "logs").glob("*_missing")
    assert list(run.rglob("*.ckpt")) == [] and not (run / "images").exists()  # no step was trained


def test_eval_models_config_is_checked():
    from ldm.callbacks import ImageLogger

    with pytest.raises(UsageError, match="unknown key"):
        ImageLogger(eval_models={"dinov2": "x"})
    with pytest.raises(UsageError, match="eval_every"):
        ImageLogger(eval_models={"clip": "x"}, eval_every=0)
    assert ImageLogger().eval_models == {} and ImageLogger().scorer is None


# ---------------------------------------------------------------------------------------------------------------
# generate_dataset.py --filter clip (InstructPix2Pix's CLIP filter over k candidates per pair)


def test_filter_scores_and_choice(encoders):
    import torch.nn.functional as F

    from ldm.evaluation.filtering import FilterThresholds, choose, pair_scores

    _, clip = encoders
    befores, afters = [_photo("chelsea"), _photo("coffee")], [_photo("astronaut"), _photo("chelsea")]
    (s0, s1) = pair_scores(clip, befores, afters, "a photo of a cat", "a photo of a man")
    x0, x1 = F.normalize(clip.embed_images(befores), dim=-1), F.normalize(clip.embed_images(afters), dim=-1)
    t0, t1 = F.normalize(clip.embed_texts(["a photo of a cat", "a photo of a man"]), dim=-1)
    assert s0["clip_sim_0"] == pytest.approx(float(x0[0] @ t0), abs=1e-5)
    assert s1["clip_sim_1"] == pytest.approx(float(x1[1] @ t1), abs=1e-5)
    assert s0["clip_sim_image"] == pytest.approx(float(x0[0] @ x1[0]), abs=1e-5)
    direction = x1[0] - x0[0]
    assert s0["clip_sim_dir"] == pytest.approx(float(direction @ (t1 - t0) / (direction.norm() * (t1 - t0).norm())), abs=1e-5)

    def cand(direction: float, image: float = 0.9, text: float = 0.3) -> dict:
        return {"clip_sim_0": text, "clip_sim_1": text, "clip_sim_dir": direction, "clip_sim_image": image}

    # the best direction among the passing candidates wins over a better one that fails image similarity
    assert choose([cand(0.3), cand(0.9, image=0.5), cand(0.4)]) == (2, True)
    assert choose([cand(0.3, text=0.1), cand(0.25)]) == (1, True)
    assert choose([cand(0.1), cand(0.15)]) == (1, False)  # none passes: the best direction, marked as failing
    assert choose([cand(0.1)], FilterThresholds(direction=0.05)) == (0, True)


def test_generate_dataset_keeps_the_filter_choice(encoders, encoder_dirs, tmp_path, capsys):
    from ldm.evaluation.filtering import choose, pair_scores
    from ldm.data.pair_generation import candidate_seed
    from scripts.generate_dataset import main as generate
    from tests.tiny import TINY_CONFIG, save_tiny_checkpoint

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee"):
        _photo(name).resize((80, 64)).save(photos / f"{name}.png")
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt", seed=1)
    out = tmp_path / "pairs"
    args = ["--mode", "train", "--subject_dir", str(photos), "--class_word", "cat", "--source_word", "dog",
            "--output", str(out), "--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--steps", "2",
            "--resolution", "64", "--quiet", "--filter", "clip", "--candidates", "3", "--filter-clip", str(encoder_dirs[1])]
    assert generate(args) == 0
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(records) == 2
    _, clip = encoders
    for record in records:
        chosen = record["filter"]
        assert len(chosen["candidates"]) == 3 and chosen["captions"] == ["a photo of a dog", "a photo of a cat"]
        assert len({c["clip_sim_dir"] for c in chosen["candidates"]}) == 3  # three different edits were made
        assert (chosen["chosen"], chosen["passed"]) == choose(chosen["candidates"])
        assert chosen["chosen_seed"] == candidate_seed(record["seed"], chosen["chosen"])
        # the kept pair is the chosen candidate: its scores, recomputed from the files, are the recorded ones
        before, after = (Image.open(out / record[side]).convert("RGB") for side in ("input", "target"))
        (rescored,) = pair_scores(clip, [before], [after], *chosen["captions"])
        assert rescored == pytest.approx(chosen["candidates"][chosen["chosen"]], abs=1e-5)
    with pytest.raises(SystemExit):
        generate(args[:-6] + ["--candidates", "3"])  # --candidates without --filter
    capsys.readouterr()
    assert generate(args[:-6]) == 2  # the filter is part of the recipe: a rerun without it is refused
    err = capsys.readouterr().err
    assert "filter: {" in err and "'method': 'clip'} in the folder, None now" in err


def test_a_folder_that_is_not_the_model_is_a_usage_error(encoder_dirs):
    # transformers would fill the missing weights with random ones and carry on
    with pytest.raises(UsageError, match=r"--dino .*do not fit a ViTModel \(\d+ missing"):
        load_dino(str(encoder_dirs[1]))  # a CLIP folder given as DINO
    with pytest.raises(UsageError, match="--clip .*(do not fit|cannot load) a CLIPModel"):
        load_clip(str(encoder_dirs[0]))
