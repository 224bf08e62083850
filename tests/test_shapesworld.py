"""ShapesWorld: the world's ground truth and metrics, the base-model command, and (slow) the whole method at work."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from ldm.data import shapesworld as sw
from ldm.models.autoencoder import PatchFirstStage
from tests.tiny import REPO

BASE_CONFIG = REPO / "configs" / "shapesworld" / "base.yaml"
BASE_CKPT = REPO / "configs" / "shapesworld" / "base.safetensors"

# The README main job's targets (issue 10), asserted by the slow demo test on the means over its subject runs.
TARGETS = {
    "base": {"class_error": ("<=", 0.08), "background_change": ("<=", 0.02)},
    "finetuned_reg": {"subject_fidelity": (">=", 0.75), "prior_drift": ("<=", 0.20), "class_error": ("<=", 0.10),
                      "background_change": ("<=", 0.02)},
    "finetuned_noreg": {"subject_fidelity": (">=", 0.75), "prior_drift": (">=", 0.6)},
}


def scene(**changes) -> sw.Scene:
    base = sw.Scene(shape="circle", fill="red", cx=30.0, cy=34.0, r=14.0, bg_top=(25, 25, 30), bg_bottom=(25, 25, 30))
    return replace(base, **changes)


@pytest.mark.parametrize("shape, area", [("circle", math.pi), ("square", 1.6**2), ("star", None), ("triangle", None)])
def test_mask_area_matches_the_geometry(shape, area):
    s = scene(shape=shape)
    measured = sw.object_mask(s).sum() / s.r**2
    if shape == "triangle":
        area = 3 * math.sqrt(3) / 4
    if shape == "star":  # ten triangles (centre, outer tip, inner vertex)
        area = 10 * 0.5 * 0.45 * math.sin(math.pi / 5)
    assert measured == pytest.approx(area, rel=0.06)  # PIL fills boundary pixels: a slight excess


def test_render_paints_the_object_and_keeps_the_background():
    s = scene(bg_bottom=(150, 150, 160))
    image, mask = sw.render(s), sw.object_mask(s)
    assert image.shape == (64, 64, 3) and 0.0 <= image.min() and image.max() <= 1.0
    inside = image[mask == 1.0]
    np.testing.assert_allclose(inside, np.broadcast_to(np.asarray(sw.COLOURS["red"]) / 255.0, inside.shape), atol=1e-6)
    np.testing.assert_allclose(image[mask == 0.0], sw.background(s)[mask == 0.0], atol=1e-6)
    assert sw.background(s)[0, 0, 0] < sw.background(s)[-1, 0, 0]  # a vertical gradient


def test_subject_has_both_stripe_colours_and_no_world_colour():
    s = scene(shape="star", fill="subject")
    inside = sw.render(s)[sw.object_mask(s) == 1.0]
    stripes = np.asarray(sw.SUBJECT_STRIPES) / 255.0
    nearest = np.abs(inside[:, None, :] - stripes[None]).sum(-1).argmin(1)
    assert 0.3 < nearest.mean() < 0.7  # about half of each
    palette = np.asarray(list(sw.COLOURS.values())) / 255.0
    assert np.abs(stripes[:, None, :] - palette[None]).sum(-1).min() > 0.5


@pytest.mark.parametrize("fill", sw.PATTERNS)
def test_subject_patterns_have_two_colours_and_move_with_the_object(fill):
    s = scene(shape="square", fill=fill, r=18.0)
    inside = sw.render(s)[sw.object_mask(s) == 1.0]
    colours = {"subject": sw.SUBJECT_STRIPES, "checkered": sw.SUBJECT_CHECKS, "dotted": sw.SUBJECT_DOTS}[fill]
    palette = np.asarray(colours) / 255.0
    nearest = np.abs(inside[:, None, :] - palette[None]).sum(-1)
    assert nearest.min(1).max() < 1e-6  # only the two pattern colours inside the object
    assert 0.1 < nearest.argmin(1).mean() < 0.9  # and both of them
    world = np.asarray(list(sw.COLOURS.values())) / 255.0
    assert np.abs(palette[:, None, :] - world[None]).sum(-1).min() > 0.5  # no colour word describes them
    moved = replace(s, cx=s.cx + 5.0, cy=s.cy + 3.0)
    np.testing.assert_allclose(sw.render(moved)[8:56, 8:56], sw.render(s)[5:53, 3:51], atol=1e-6)
    others = [f for f in sw.PATTERNS if f != fill]
    assert all(np.abs(sw.render(s) - sw.render(replace(s, fill=f))).mean() > 0.05 for f in others)


def test_unknown_shape_or_colour_is_an_error():
    with pytest.raises(ValueError, match="hexagon"):
        scene(shape="hexagon")
    with pytest.raises(ValueError, match="pink"):
        scene(fill="pink")


def test_edit_dataset_is_seeded_and_only_changes_the_object():
    data = sw.ShapesEditDataset(length=50, seed=3)
    a, b = data[7], data[7]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert not torch.equal(data[8]["c_concat"], a["c_concat"])
    assert not torch.equal(sw.ShapesEditDataset(length=50, seed=4)[7]["c_concat"], a["c_concat"])
    captions = [data[i]["caption"] for i in range(50)]
    assert any(c.startswith("replace the ") for c in captions) and any(c.startswith("make the ") for c in captions)
    for i in range(10):
        source, target, instruction = sw.random_edit(np.random.default_rng([3, i]))
        item = data[i]
        assert item["caption"] == instruction
        assert item["image"].shape == item["c_concat"].shape == (3, 64, 64)
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert (source.cx, source.cy, source.r, source.bg_top) == (target.cx, target.cy, target.r, target.bg_top)
        region = np.maximum(sw.object_mask(source), sw.object_mask(target)) > 0
        change = (item["image"] - item["c_concat"]).abs().sum(0).numpy()
        assert change[~region].max() < 1e-6 and change[region].max() > 0.1
    with pytest.raises(IndexError):
        data[50]


def test_patch_first_stage_is_lossless():
    stage = PatchFirstStage(patch=4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = stage.encode(x).mode()
    assert z.shape == (2, 48, 16, 16)
    assert torch.equal(stage.decode(z), x)
    with pytest.raises(ValueError, match="multiple"):
        stage.encode(torch.zeros(1, 3, 62, 64))


def test_subject_score_and_background_change():
    circle = scene()
    star = replace(circle, shape="star")
    generic, subject = sw.render(star), sw.render(replace(star, fill="subject"))
    mask = sw.object_mask(star)
    assert sw.subject_score(subject, generic, subject, mask) == pytest.approx(1.0)
    assert sw.subject_score(generic, generic, subject, mask) == pytest.approx(0.0)
    assert 0.3 < sw.subject_score((generic + subject) / 2, generic, subject, mask) < 0.7
    # A pixel of misplacement is not a wrong pattern (it scored 0.74 when the score compared exact pixels) ...
    for fill, expected in (("subject", 1.0), ("checkered", 1.0), (star.fill, 0.0)):
        pattern = sw.render(replace(star, fill=fill))
        for move in ((1, 0), (0, -1), (1, 1)):
            moved = np.roll(pattern, move, axis=(0, 1))
            reference = subject if fill == "subject" else pattern if fill == "checkered" else generic
            assert sw.subject_score(moved, generic, reference, mask) == pytest.approx(expected, abs=0.02)
    # ... but two pixels are not forgiven, and the subject's colours without its stripes are not the subject.
    assert sw.subject_score(np.roll(subject, 2, axis=1), generic, subject, mask) < 0.9
    flat = np.where(mask[..., None] > 0.5, subject[mask > 0.5].mean(0), generic)
    assert sw.subject_score(flat, generic, subject, mask) < 0.75
    region = np.maximum(mask, sw.object_mask(circle))
    assert sw.background_change(generic, sw.render(circle), region) == pytest.approx(0.0, abs=1e-6)
    shifted = sw.render(replace(circle, cx=40.0))
    assert sw.background_change(shifted, sw.render(circle), region) > 0.003


def test_demo_scores_edits_against_the_ground_truth(tmp_path):
    from scripts.shapesworld_report import SUBJECTS, score_edits, subject_row, summarize

    square = SUBJECTS[1]
    circles = [scene(), scene(cx=24.0, r=12.0, fill="blue", bg_bottom=(95, 60, 45))]
    for name, fill in (("subject", square.fill), ("generic", None)):
        folder = tmp_path / name
        folder.mkdir()
        for index, circle in enumerate(circles):
            truth = replace(circle, shape="square", fill=fill or circle.fill)
            sw.to_pil(sw.render(truth)).save(folder / f"{index:03d}.png")
    subject, generic = score_edits(tmp_path / "subject", circles, square), score_edits(tmp_path / "generic", circles, square)
    assert subject["subject_score"] == pytest.approx([1.0, 1.0], abs=0.01)
    assert generic["subject_score"] == pytest.approx([0.0, 0.0], abs=0.01)
    assert generic["class_error"] == pytest.approx([0.0, 0.0], abs=0.003)  # 8-bit rounding only
    assert min(subject["class_error"]) > 0.1
    assert max(subject["background_change"] + generic["background_change"]) < 0.003
    unchanged = score_edits(tmp_path / "generic", [replace(c, bg_top=(150, 150, 160)) for c in circles], square)
    assert min(unchanged["background_change"]) > 0.05  # a wrong background is seen
    row = subject_row({"identifier": subject, "class": generic})
    assert row["subject_fidelity"] == pytest.approx(1.0, abs=0.01) and row["prior_drift"] == pytest.approx(0.0, abs=0.01)
    assert "subject_fidelity" not in subject_row({"class": generic})  # the identifier prompt was not run
    table = summarize({"a": {"base": {"class_error": 0.1}}, "b": {"base": {"class_error": 0.3}},
                       "c": {"base": {"class_error": 0.2}, "finetuned_noreg": {"prior_drift": 0.7}}})
    assert table["base"]["class_error"] == pytest.approx({"mean": 0.2, "std": 0.1, "min": 0.1, "max": 0.3, "n": 3})
    assert table["finetuned_noreg"]["prior_drift"] == pytest.approx({"mean": 0.7, "std": 0.0, "min": 0.7, "max": 0.7,
                                                                     "n": 1})
    assert "finetuned_reg" not in table


def test_base_training_command_runs_and_stores_fp16(tmp_path):
    from scripts.shapesworld import main

    out = tmp_path / "base.safetensors"
    assert main(["base", "--out", str(out), "--max_steps", "2", "--logdir", str(tmp_path / "logs"),
                 "data.params.batch_size=2", "lightning.callbacks.image_logger.params.disabled=true"]) == 0
    with safe_open(str(out), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["model.diffusion_model.input_blocks.0.0.weight"] == torch.float16
    assert dtypes["alphas_cumprod"] == torch.float32
    from ldm.editing import load_model

    model = load_model(BASE_CONFIG, out).model
    assert isinstance(model.first_stage_model, PatchFirstStage)
    assert model.decode_first_stage(model.encode_first_stage(torch.zeros(1, 3, 64, 64)).mode()).shape == (1, 3, 64, 64)


def test_bundled_base_model_loads_strictly():
    from ldm.editing import load_model

    assert BASE_CKPT.is_file(), f"the bundled base model {BASE_CKPT} is part of the repository"
    loaded = load_model(BASE_CONFIG, BASE_CKPT)
    unet = loaded.model.model.diffusion_model
    assert unet.in_channels == 2 * unet.out_channels == 2 * 3 * loaded.model.first_stage_model.patch**2


# Seeds of the slow test's demo runs: the targets are asserted on the means over all their subject runs.
SLOW_SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_the_method_works_in_shapesworld(tmp_path):
    """The README main job, run as a user runs it (`python scripts/shapesworld.py demo` in its own process, with
    torch's own thread count rather than the test suite's one), meets issue 10's targets on the means over the
    3 seeds × 3 subjects, and each run writes its report.

    One run's three-subject mean is not enough for a 0.75 target: the fidelity of a seed moves by about ±0.017
    (docs/shapesworld.md: ten seeds 0.724–0.777, mean 0.754), and the thread count alone changes a seed's result
    by as much, so the test pools three seeds (the issue's "mean over ≥ 3 subjects or seeds"). The target sits at
    the method's mean, so on another CPU (another draw of the sums) this fails about one time in three."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    means: dict[tuple[str, str], list[float]] = {}
    for seed in SLOW_SEEDS:
        out = tmp_path / f"seed{seed}"
        subprocess.run([sys.executable, "scripts/shapesworld.py", "demo", "--out", str(out), "--seed", str(seed)],
                       cwd=REPO, env=env, check=True)
        metrics = json.loads((out / "metrics.json").read_text())
        table = metrics["table"]
        assert len(metrics["subjects"]) >= 3 and table["finetuned_reg"]["subject_fidelity"]["n"] >= 3
        for model, targets in TARGETS.items():
            for metric in targets:
                means.setdefault((model, metric), []).append(table[model][metric]["mean"])
        for picture in ("grid.png", "pairs.png", "losses.png", "metrics.png"):
            assert (out / picture).stat().st_size > 1000 and f"({picture})" in (out / "report.md").read_text()
    missed = []
    for model, targets in TARGETS.items():
        for metric, (op, bound) in targets.items():
            seeds = means[(model, metric)]
            mean = float(np.mean(seeds))
            if not (mean <= bound if op == "<=" else mean >= bound):
                missed.append(f"{model} {metric} {mean:.4f} (target {op} {bound}; seeds "
                              + ", ".join(f"{v:.4f}" for v in seeds) + ")")
    assert not missed, "; ".join(missed)


def test_a_tiny_demo_runs_every_stage_with_its_guidance(tmp_path):
    """The README main job end to end at its smallest (one subject, one photo, one step): every stage runs, the
    report and its pictures are written, and the training pairs are made at --pairs_cfg_text while the
    regularization pairs and the edits use --cfg-text (the reverse edit sizes the subject's stand-in better at low
    guidance, docs/shapesworld.md); with --paired_prior the regularization pairs include every training input; the
    identifier edits (only they) have contrast guidance against the class prompt; the reg_weight=0 model (trained
    although not scored: it labels the real circles) edits the regularization set's real circles into labelled pairs,
    on which the prior-preserved fine-tune trains besides the generated pairs."""
    import hashlib

    from PIL import Image

    from scripts.shapesworld import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--subjects", "1", "--noreg_subjects", "0", "--subject_photos", "1",
                 "--variants", "white", "--reg_photos", "2", "--reg_pairs", "1", "--heldout", "1",
                 "--finetune_steps", "1", "--noreg_steps", "6", "--steps", "1", "--grid_rows", "1",
                 "--cfg-text", "2.5", "--pairs_cfg_text", "1.25", "--seed", "3", "--paired_prior",
                 "--recolour_p", "0.5", "--cfg-contrast", "1.5"]) == 0
    data = out / "data" / "striped_star"
    labelled = [json.loads(line) for line in (data / "labelled" / "pairs.jsonl").read_text().splitlines()]
    (noreg_export,) = (out / "logs").glob("*_striped_star_noreg/export/model.safetensors")
    assert [(r["kind"], r["instruction"], r["cfg_text"], r["source_name"]) for r in labelled] == [
        ("train_source", "replace the circle with a sks star", 2.5, f"00{i}.png") for i in range(2)]
    for record in labelled:
        assert record["checkpoint_sha256"] == hashlib.sha256(noreg_export.read_bytes()).hexdigest()
        assert (np.asarray(Image.open(data / "labelled" / record["input"]))
                == np.asarray(Image.open(out / "photos" / "circles" / record["source_name"]))).all()
    roots = {run: OmegaConf.load(next((out / "logs").glob(f"*_striped_star_{run}/configs/*-project.yaml")))
             .data.params.train.params.data_root for run in ("noreg", "reg")}
    assert roots == {"noreg": str(data / "training"), "reg": [str(data / "training"), str(data / "labelled")]}
    rows = {part: [json.loads(line) for line in (data / part / "pairs.jsonl").read_text().splitlines()]
            for part in ("training", "regularization")}
    assert [(r["cfg_text"], r.get("follow_up_instruction")) for r in rows["training"]] == [
        (1.25, None), (1.25, "make the circle white")]
    # One pair of the real photos (--reg_pairs 1), then the paired prior: each training input, unchanged, edited
    # with the class prompt.
    assert [(r["kind"], r["cfg_text"]) for r in rows["regularization"]] == [
        ("reg_source", 2.5), ("reg_paired", 2.5), ("reg_paired", 2.5)]
    for paired, trained in zip(rows["regularization"][1:], rows["training"]):
        assert paired["instruction"] == "replace the circle with a star"
        assert (np.asarray(Image.open(data / "regularization" / paired["input"]))
                == np.asarray(Image.open(data / "training" / trained["input"]))).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["pairs_cfg_text"] == 1.25
    assert set(metrics["table"]) == {"base", "finetuned_reg"}
    # The reg_weight=0 run only logs its prior term, computed on every 5th step (personalize.yaml: reg_log_every).
    curves = {run: {name: [step for step, _ in points] for name, points in metrics["losses"][run].items()}
              for run in ("striped_star_noreg", "striped_star_reg")}
    assert curves == {"striped_star_noreg": {"loss_train": list(range(6)), "loss_reg": [0, 5]},
                      "striped_star_reg": {"loss_train": [0], "loss_reg": [0]}}
    report = (out / "report.md").read_text()
    assert "loss_reg, on every 5th step" in report
    assert "text guidance 2.5" in report and "made at text guidance 1.25" in report and "the paired prior" in report
    assert "recoloured at random with probability 0.5" in report
    assert "1 subject photos × 1 reverse edit × (1 + 1 recoloured by the base model: white) made" in report
    assert "also trains on 2 labelled pairs per subject" in report and "a labelled pair (real circle" in report
    assert "the identifier prompt with contrast guidance 1.5 against the class prompt" in report
    edits = {kind: json.loads(Image.open(out / "edits" / "striped_star" / "finetuned_reg" / kind / "000.png")
                              .text["instruct2dream"]) for kind in ("identifier", "class")}
    assert edits["identifier"]["edit"] == "replace the circle with a sks star"
    assert (edits["identifier"]["contrast"], edits["identifier"]["cfg_contrast"]) == (
        "replace the circle with a star", 1.5)
    assert "contrast" not in edits["class"]
    (project,) = (out / "logs").glob("*_striped_star_reg/configs/*-project.yaml")
    train = OmegaConf.load(project).data.params.train
    assert train.target.endswith("RecolouredStandIns") and train.params.recolour_p == 0.5
    for picture in ("grid.png", "pairs.png", "losses.png", "metrics.png"):
        assert (out / picture).stat().st_size > 1000 and f"({picture})" in report


def test_a_tiny_demo_without_labelled_pairs_trains_only_what_it_scores(tmp_path):
    """--no-labelled_pairs with --noreg_subjects 0: no reg_weight=0 fine-tune, no labelled folder, one training
    folder, and the report says so."""
    from scripts.shapesworld import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--subjects", "1", "--noreg_subjects", "0", "--subject_photos", "1",
                 "--variants", "", "--reg_photos", "1", "--reg_pairs", "1", "--heldout", "1", "--finetune_steps", "1",
                 "--steps", "1", "--grid_rows", "1", "--no-labelled_pairs"]) == 0
    assert [p.name.split("_", 1)[1] for p in (out / "logs").iterdir()] == ["striped_star_reg"]
    assert sorted(p.name for p in (out / "data" / "striped_star").iterdir()) == ["regularization", "training"]
    report = (out / "report.md").read_text()
    assert "labelled" not in report and "no reg_weight=0 run" in report
    assert "1 subject photos × 1 reverse edit made at text guidance 1.5" in report  # no follow-up colours to list


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_regularization_photos_cover_every_colour(tmp_path, seed):
    """The prior is held for the colours it is shown: the demo's real circles and class photos cycle through all six
    world colours (seed 1 once drew four green stars and four blue squares, and "star" then turned red circles pale)."""
    import argparse

    from PIL import Image

    from scripts import shapesworld as demo
    from scripts import shapesworld_report as report

    args = argparse.Namespace(seed=seed, reg_photos=7, subject_photos=2, heldout=2)
    demo.make_world(tmp_path, args, report.SUBJECTS)
    palette = np.asarray(list(sw.COLOURS.values()), dtype=np.float32) / 255.0  # (6, 3)
    for folder in ["circles", *(subject.shape for subject in report.SUBJECTS)]:
        found = []
        for path in sorted((tmp_path / "photos" / folder).glob("*.png")):
            pixels = sw.from_pil(Image.open(path)).reshape(-1, 3)
            distance = np.abs(pixels[:, None, :] - palette[None]).sum(-1)  # (H·W, 6)
            found.append(int(np.bincount(distance.argmin(1)[distance.min(1) < 1e-3], minlength=6).argmax()))
        assert len(found) == 7 and sorted(found[:6]) == list(range(6)) and found[6] == found[0], (folder, found)


def test_learned_metrics_sit_beside_the_ground_truth_ones_with_the_caveat(tmp_path):
    """The demo's evaluate.py metrics, here with random-weight encoders: an unedited image keeps its background
    exactly (L1 0, SSIM 1); an edit that changes the background scores worse; the report states the caveat."""
    import argparse

    from scripts import shapesworld as demo
    from scripts import shapesworld_report as report

    subjects = report.SUBJECTS[:1]
    args = argparse.Namespace(seed=0, reg_photos=1, subject_photos=2, heldout=3)
    heldout = demo.make_world(tmp_path, args, subjects)
    slug = subjects[0].slug
    for kind, shift in (("class", 0.0), ("identifier", 0.3)):
        folder = tmp_path / "edits" / slug / "base" / kind
        for index, item in enumerate(heldout):
            pixels = np.clip(sw.render(item) + shift, 0, 1)  # "identifier": every pixel brightened
            folder.mkdir(parents=True, exist_ok=True)
            sw.to_pil(pixels).save(folder / f"{index:03d}.png")
    learned = report.learned_scores(tmp_path, subjects, heldout, {slug: [("base", "class"), ("base", "identifier")]},
                                  None, None)
    assert not learned["real"] and all("random weights" in m for m in learned["models"])
    unchanged, changed = learned["table"]["base/class"], learned["table"]["base/identifier"]
    assert unchanged["bg_l1"] == 0 and unchanged["bg_ssim"] == pytest.approx(1.0)
    assert changed["bg_l1"] > 0.1 and changed["bg_ssim"] < unchanged["bg_ssim"]
    assert all(math.isfinite(v) for row in learned["table"].values() for v in row.values())
    text = "\n".join(report.learned_lines(learned))
    assert "random-weight encoders" in text and "| base model, identifier |" in text


@pytest.mark.parametrize("noreg_subjects, says", [(0, "125 steps (no reg_weight=0 run)"),
                                                   (1, "125 steps (7 for reg_weight=0)")])
def test_report_carries_the_learned_metrics_section(tmp_path, noreg_subjects, says):
    import argparse

    from scripts import shapesworld_report as report

    learned = {"real": False, "models": ["random weights (seed 0)"] * 2,
               "table": {"base/class": {m: 0.5 for m in report.LEARNED_METRICS}}}
    args = argparse.Namespace(heldout=1, steps=1, cfg_text=5.0, cfg_image=1.5, pairs_cfg_text=1.5, seed=0,
                              finetune_steps=125, noreg_steps=7, noreg_subjects=noreg_subjects, variants=["white"],
                              lr=1e-4, batch=1, subject_photos=1, samples_per_image=1, reg_pairs=1,
                              paired_prior=False, recolour_p=0.5, cfg_contrast=2.0, labelled_pairs=False,
                              reg_photos=1)
    text = report.write_report(tmp_path, {}, {report.SUBJECTS[0].slug: {}}, report.SUBJECTS[:1], {"total": 1.0}, args,
                               learned).read_text()
    assert "random-weight encoders" in text and "| base model, class | 0.500 |" in text
    assert says in text


@pytest.mark.parametrize("flags, named", [(["--subjects", "4"], "--subjects"), (["--recolour_p", "1.5"], "--recolour_p")])
def test_demo_option_errors_name_the_option_before_any_work(tmp_path, flags, named):
    from scripts.shapesworld import main

    with pytest.raises(SystemExit, match=named):
        main(["demo", "--out", str(tmp_path / "demo"), *flags])
    assert not (tmp_path / "demo" / "photos").exists()
