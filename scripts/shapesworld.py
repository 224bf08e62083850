#!/usr/bin/env python
"""ShapesWorld: the whole Instruct2Dream method on a laptop CPU, in a synthetic world with exact ground truth.

    python scripts/shapesworld.py demo --out outputs/shapesworld     # the main job (bundled base model)
    python scripts/shapesworld.py base --out configs/shapesworld/base.safetensors   # re-train the base model

``demo``: photos of the subject (a striped "sks star") and of generic circles and stars are rendered from the world;
``scripts/generate_dataset.py`` makes training and regularization pairs with the base model in reverse;
``main.py`` fine-tunes the base model twice (prior preservation on, and ``reg_weight=0``); ``scripts/edit_cli.py``
edits held-out circles with "replace the circle with a sks star" (identifier) and "... with a star" (class) using
the base and both fine-tuned models; the edits are scored against the world's ground truth (`ldm.data.shapesworld`)
into ``metrics.json``, ``grid.png`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.data import shapesworld as sw  # noqa: E402

logger = logging.getLogger("shapesworld")

BASE_CONFIG = REPO / "configs" / "shapesworld" / "base.yaml"
PERSONALIZE_CONFIG = REPO / "configs" / "shapesworld" / "personalize.yaml"
BASE_CKPT = REPO / "configs" / "shapesworld" / "base.safetensors"
CLASS_WORD, SOURCE_WORD, IDENTIFIER = "star", "circle", "sks"
PROMPTS = {"identifier": f"replace the {SOURCE_WORD} with a {IDENTIFIER} {CLASS_WORD}",
           "class": f"replace the {SOURCE_WORD} with a {CLASS_WORD}"}
MODELS = ("base", "finetuned_reg", "finetuned_noreg")
MODEL_LABELS = {"base": "base model", "finetuned_reg": "fine-tuned (reg)", "finetuned_noreg": "fine-tuned (reg_weight 0)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="train the base model with main.py and store it as fp16 safetensors",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    base.add_argument("--out", default=str(BASE_CKPT), help="where to write the base weights (.safetensors)")
    base.add_argument("--max_steps", type=int, default=3793, help="training steps (3793: the bundled model)")
    base.add_argument("--gpus", default=None, help="main.py --gpus, e.g. '0,' (the bundled model was trained on one GPU)")
    base.add_argument("--seed", type=int, default=23, help="main.py --seed")
    base.add_argument("--logdir", default="logs", help="main.py --logdir")
    base.add_argument("overrides", nargs="*", help="main.py a.b=c config overrides")
    demo = sub.add_parser("demo", help="the whole method on the bundled base model, with a report",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default=None,
                      help="output folder, must not hold a previous run (default: outputs/shapesworld/<timestamp>)")
    demo.add_argument("--base", default=str(BASE_CKPT), help="base model weights")
    demo.add_argument("--subject_photos", type=int, default=6, help="photos of the subject")
    demo.add_argument("--samples_per_image", type=int, default=2, help="reverse edits per subject photo")
    demo.add_argument("--reg_photos", type=int, default=12, help="real circles and real stars (each) for reg pairs")
    demo.add_argument("--reg_pairs", type=int, default=24, help="regularization pairs")
    demo.add_argument("--heldout", type=int, default=16, help="held-out circles to edit and score")
    demo.add_argument("--finetune_steps", type=int, default=150, help="main.py --max_steps of each fine-tune")
    demo.add_argument("--steps", type=int, default=20, help="sampling steps of every edit")
    demo.add_argument("--cfg-text", type=float, default=5.0, help="text guidance scale")
    demo.add_argument("--cfg-image", type=float, default=1.5, help="image guidance scale")
    demo.add_argument("--seed", type=int, default=0, help="world, pair generation, training and editing seed")
    demo.add_argument("--grid_rows", type=int, default=6, help="held-out examples shown in grid.png")
    return parser.parse_args(argv)


def run_step(title: str, tool: str, argv: list[str], timings: dict[str, float]) -> None:
    """Run ``main(argv)`` of one of the project's CLIs (main.py, scripts/*.py) in this process; stop on failure.

    In-process calls skip a fresh interpreter, torch import and tokenizer build per step (about 10 s each on a
    2-core machine); their progress bars go to this terminal as usual.
    """
    import importlib

    logger.info("== %s", title)
    logger.info("   python %s %s", tool, " ".join(argv))
    module = importlib.import_module(tool.removesuffix(".py").replace("/", "."))
    start = time.perf_counter()
    status = module.main(argv)
    timings[title] = time.perf_counter() - start
    if hasattr(module, "RUN_TIMESTAMP_ENV"):  # main.py keeps its timestamp for DDP ranks: give each run its own
        os.environ.pop(module.RUN_TIMESTAMP_ENV, None)
    if status:
        raise SystemExit(f"{title} failed (exit status {status}): python {tool} {' '.join(argv)}")


def find_export(logdir: Path, name: str) -> Path:
    """The ``export/model.safetensors`` of the newest main.py run named ``name`` under ``logdir``."""
    runs = sorted(glob.glob(str(logdir / f"*_{name}" / "export" / "model.safetensors")))
    if not runs:
        raise SystemExit(f"no export of run {name!r} under {logdir}")
    return Path(runs[-1])


def store_fp16(export: Path, out: Path, steps: int) -> None:
    """Copy main.py's export to ``out`` with the weights in fp16 (half the size); the noise-schedule buffers stay
    fp32 (they set the sampler's sigmas)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = {k: v.to(torch.float16) if k.startswith(("model.", "cond_stage_model.")) and v.is_floating_point() else v
             for k, v in load_file(str(export)).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt", "shapesworld_base_steps": str(steps)})


def train_base(args: argparse.Namespace) -> int:
    """main.py on configs/shapesworld/base.yaml, then the export as fp16 safetensors at ``--out``."""
    timings: dict[str, float] = {}
    name = "shapesworld_base"
    run_step("train the base model", "main.py", ["-b", str(BASE_CONFIG), "-t", "-n", name, "-s", str(args.seed),
                                                 "-l", args.logdir, "--max_steps", str(args.max_steps),
                                                 *(["--gpus", args.gpus] if args.gpus else []), *args.overrides], timings)
    import csv

    out = Path(args.out)
    export = find_export(Path(args.logdir), name)
    with open(export.parent.parent / "metrics.csv", newline="") as handle:  # a max_time override may stop it early
        steps = 1 + max(int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss"))
    store_fp16(export, out, steps)
    logger.info("base model (fp16, %d steps): %s (%.1f MB) in %.0f s", steps, out, out.stat().st_size / 1e6,
                timings["train the base model"])
    return 0


def write_photos(folder: Path, scenes: list[sw.Scene]) -> None:
    """Render ``scenes`` as ``NNN.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        sw.to_pil(sw.render(scene)).save(folder / f"{index:03d}.png")


def make_world(out: Path, args: argparse.Namespace) -> list[sw.Scene]:
    """Subject photos, real circles and stars (regularization), and held-out circles; returns the held-out scenes."""
    rng = np.random.default_rng([args.seed, 2026])
    write_photos(out / "photos" / "subject", [sw.random_scene(rng, shape="star", fill="subject")
                                              for _ in range(args.subject_photos)])
    write_photos(out / "photos" / "circles", [sw.random_scene(rng, shape="circle") for _ in range(args.reg_photos)])
    write_photos(out / "photos" / "stars", [sw.random_scene(rng, shape="star") for _ in range(args.reg_photos)])
    heldout_rng = np.random.default_rng([args.seed, 7])  # independent of the photo counts
    heldout = [sw.random_scene(heldout_rng, shape="circle") for _ in range(args.heldout)]
    write_photos(out / "heldout", heldout)
    (out / "heldout" / "scenes.json").write_text(json.dumps([asdict(s) for s in heldout], indent=1) + "\n")
    return heldout


def score_edits(folder: Path, scenes: list[sw.Scene]) -> dict[str, list[float]]:
    """Per-image subject score, error to the generic star, and background change of the edits in ``folder``."""
    from PIL import Image

    scores: dict[str, list[float]] = {"subject_score": [], "class_error": [], "background_change": []}
    for index, scene in enumerate(scenes):
        edited = sw.from_pil(Image.open(folder / f"{index:03d}.png"))
        star = sw.Scene(**{**asdict(scene), "shape": CLASS_WORD})
        generic, subject = sw.render(star), sw.render(sw.Scene(**{**asdict(star), "fill": "subject"}))
        star_mask = sw.object_mask(star)
        region = np.maximum(star_mask, sw.object_mask(scene))  # where the circle was or the star should be
        scores["subject_score"].append(sw.subject_score(edited, generic, subject, star_mask))
        scores["class_error"].append(float(np.abs(edited - generic)[region > 0.5].mean()))
        scores["background_change"].append(sw.background_change(edited, sw.render(scene), region))
    return scores


def summarize(per_image: dict[str, dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, float]]:
    """The report's table: per model, subject fidelity, prior drift, class error and background change."""
    table = {}
    for model, prompts in per_image.items():
        table[model] = {
            "subject_fidelity": float(np.mean(prompts["identifier"]["subject_score"])),
            "prior_drift": float(np.mean(prompts["class"]["subject_score"])),
            "class_error": float(np.mean(prompts["class"]["class_error"])),
            "background_change": float(np.mean(prompts["identifier"]["background_change"]
                                               + prompts["class"]["background_change"])),
        }
    return table


def make_grid(out: Path, rows: int) -> Path:
    """input | each model's identifier and class edit, for the first ``rows`` held-out images (2× upscaled)."""
    from PIL import Image

    from ldm.visualization import labelled_grid

    def cell(path: Path) -> Image.Image:
        image = Image.open(path).convert("RGB")
        return image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST)

    short = {"base": "base", "finetuned_reg": "ft reg", "finetuned_noreg": "ft no-reg"}
    cells, labels = [], []
    for index in range(rows):
        cells.append(cell(out / "heldout" / f"{index:03d}.png"))
        labels.append("input")
        for model in MODELS:
            for prompt in ("identifier", "class"):
                cells.append(cell(out / "edits" / model / prompt / f"{index:03d}.png"))
                labels.append(f"{short[model]}: {'sks star' if prompt == 'identifier' else 'star'}")
    path = out / "grid.png"
    labelled_grid(cells, 1 + 2 * len(MODELS), labels).save(path)
    return path


def write_report(out: Path, table: dict[str, dict[str, float]], timings: dict[str, float], args: argparse.Namespace) -> Path:
    """``report.md``: the table, the grid and the timings."""
    lines = [
        "# ShapesWorld report", "",
        f"Held-out circles: {args.heldout}; identifier prompt \"{PROMPTS['identifier']}\"; class prompt "
        f"\"{PROMPTS['class']}\"; {args.steps} sampling steps, text guidance {args.cfg_text:g}, image guidance "
        f"{args.cfg_image:g}, seed {args.seed}; fine-tuning {args.finetune_steps} steps.", "",
        "| model | subject fidelity ↑ | prior drift ↓ | class error ↓ | background change ↓ |",
        "|---|---|---|---|---|",
    ]
    for model in MODELS:
        row = table[model]
        lines.append(f"| {MODEL_LABELS[model]} | {row['subject_fidelity']:.3f} | {row['prior_drift']:.3f} | "
                     f"{row['class_error']:.3f} | {row['background_change']:.4f} |")
    lines += [
        "", "- subject fidelity: identifier prompt, subject score d_g/(d_g+d_s) inside the star's mask "
        "(1 = the subject's stripes, 0 = a generic star of the circle's colour).",
        "- prior drift: the same score for the class prompt (a generic star is expected: lower is better).",
        "- class error: class prompt, mean |edit − ground-truth generic star| (0–1 units) where the circle was or the "
        "star should be.",
        "- background change: mean |edit − input| outside the circle and star (grown by 2 px), both prompts.", "",
        "![grid](grid.png)", "",
        "Columns: input | for each model, the identifier edit (sks star) and the class edit (star).", "",
        "| stage | seconds |", "|---|---|",
    ]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def demo(args: argparse.Namespace) -> int:
    """The main job: world → pairs → two fine-tunes → held-out edits → metrics, grid and report."""
    if args.out is None:
        args.out = f"outputs/shapesworld/{time.strftime('%Y-%m-%dT%H-%M-%S')}"
    out = Path(args.out).resolve()
    if (out / "report.md").exists() or (out / "data").exists():
        raise SystemExit(f"{out} holds a previous run: choose another --out or delete it")
    if not Path(args.base).is_file():
        raise SystemExit(f"base model not found: {args.base} (train one with `python scripts/shapesworld.py base`)")
    start = time.perf_counter()
    timings: dict[str, float] = {}
    heldout = make_world(out, args)
    common = ["--ckpt", str(Path(args.base).resolve()), "--config", str(BASE_CONFIG), "--steps", str(args.steps),
              "--resolution", "64", "--cfg-text", str(args.cfg_text), "--cfg-image", str(args.cfg_image),
              "--device", "cpu", "--class_word", CLASS_WORD, "--source_word", SOURCE_WORD]
    run_step("training pairs (base model in reverse)", "scripts/generate_dataset.py", [
        "--mode", "train", "--subject_dir", str(out / "photos" / "subject"),
        "--identifier", IDENTIFIER, "--samples_per_image", str(args.samples_per_image),
        "--output", str(out / "data" / "training"), "--seed", str(args.seed), *common], timings)
    run_step("regularization pairs", "scripts/generate_dataset.py", [
        "--mode", "reg", "--reg_source_dir", str(out / "photos" / "circles"),
        "--reg_class_dir", str(out / "photos" / "stars"), "--num_pairs", str(args.reg_pairs),
        "--output", str(out / "data" / "regularization"), "--seed", str(args.seed + 1), *common], timings)
    checkpoints = {"base": Path(args.base).resolve()}
    for model, overrides in (("finetuned_reg", []), ("finetuned_noreg", ["model.params.reg_weight=0"])):
        run_step(f"fine-tune: {model}", "main.py", [
            "-b", str(PERSONALIZE_CONFIG), "-t", "-n", model, "-s", str(args.seed), "-l", str(out / "logs"),
            "--actual_resume", str(checkpoints["base"]), "--data_root", str(out / "data" / "training"),
            "--reg_data_root", str(out / "data" / "regularization"), "--class_word", CLASS_WORD,
            "--source_word", SOURCE_WORD, "--identifier", IDENTIFIER, "--max_steps", str(args.finetune_steps),
            *overrides], timings)
        checkpoints[model] = find_export(out / "logs", model)
    per_image: dict[str, dict[str, dict[str, list[float]]]] = {}
    for model in MODELS:
        per_image[model] = {}
        for prompt, text in PROMPTS.items():
            folder = out / "edits" / model / prompt
            run_step(f"edit: {model}, {prompt} prompt", "scripts/edit_cli.py", [
                "--input", str(out / "heldout"), "--output", str(folder), "--edit", text,
                "--ckpt", str(checkpoints[model]), "--config", str(BASE_CONFIG), "--steps", str(args.steps),
                "--resolution", "64", "--cfg-text", str(args.cfg_text), "--cfg-image", str(args.cfg_image),
                "--seed", str(args.seed), "--device", "cpu", "--batch-size", str(args.heldout)], timings)
            per_image[model][prompt] = score_edits(folder, heldout)
    table = summarize(per_image)
    timings["total"] = time.perf_counter() - start
    (out / "metrics.json").write_text(json.dumps({"table": table, "per_image": per_image, "timings_s": timings,
                                                  "settings": vars(args)}, indent=1) + "\n")
    make_grid(out, min(args.grid_rows, args.heldout))
    report = write_report(out, table, timings, args)
    logger.info("report: %s", report)
    print(report.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return train_base(args) if args.command == "base" else demo(args)


if __name__ == "__main__":
    sys.exit(main())
