#!/usr/bin/env python
"""ShapesWorld: the whole Instruct2Dream method on a laptop CPU, in a synthetic world with exact ground truth.

    python scripts/shapesworld.py demo --out outputs/shapesworld     # the main job (bundled base model)
    python scripts/shapesworld.py base --out configs/shapesworld/base.safetensors   # re-train the base model

``demo``, for each of three subjects (a striped "sks star", a checkered "sks square", a dotted "sks triangle"):
photos of the subject and of generic circles and of its class are rendered from the world;
``scripts/generate_dataset.py`` makes training and regularization pairs with the base model in reverse;
``main.py`` fine-tunes the base model with prior preservation (and, for ``--noreg_subjects`` of them, with
``reg_weight=0``); ``scripts/edit_cli.py`` edits held-out circles with "replace the circle with a sks <class>"
(identifier) and "... with a <class>" (class prompt) using the base and the fine-tuned models; the edits are scored
against the world's ground truth (`ldm.data.shapesworld`) into ``metrics.json`` and ``report.md`` with its pictures
(``metrics.png``, ``losses.png``, ``pairs.png``, ``grid.png``).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.data import shapesworld as sw  # noqa: E402

logger = logging.getLogger("shapesworld")

BASE_CONFIG = REPO / "configs" / "shapesworld" / "base.yaml"
PERSONALIZE_CONFIG = REPO / "configs" / "shapesworld" / "personalize.yaml"
BASE_CKPT = REPO / "configs" / "shapesworld" / "base.safetensors"
SOURCE_WORD, IDENTIFIER = "circle", "sks"


@dataclass(frozen=True)
class Subject:
    """A subject: its name (folder names use it with ``_`` for spaces), class word (= its shape) and pattern."""

    name: str
    shape: str
    fill: str

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_")

    def prompt(self, kind: str) -> str:
        """The identifier prompt ("... with a sks star") or the class prompt ("... with a star")."""
        noun = f"{IDENTIFIER} {self.shape}" if kind == "identifier" else self.shape
        return f"replace the {SOURCE_WORD} with a {noun}"


SUBJECTS = (Subject("striped star", "star", "subject"), Subject("checkered square", "square", "checkered"),
            Subject("dotted triangle", "triangle", "dotted"))
PROMPT_KINDS = ("identifier", "class")
MODELS = ("base", "finetuned_reg", "finetuned_noreg")
MODEL_LABELS = {"base": "base model", "finetuned_reg": "fine-tuned, prior preservation",
                "finetuned_noreg": "fine-tuned, reg_weight=0"}
METRICS = ("subject_fidelity", "prior_drift", "class_error", "background_change")
METRIC_LABELS = {"subject_fidelity": "subject fidelity ↑", "prior_drift": "prior drift ↓",
                 "class_error": "class error ↓", "background_change": "background change ↓"}


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
    demo.add_argument("--subjects", type=int, default=3, help="subjects (striped star, checkered square, dotted triangle)")
    demo.add_argument("--noreg_subjects", type=int, default=1,
                      help="subjects also fine-tuned with reg_weight=0 (the ablation), the first ones")
    demo.add_argument("--subject_photos", type=int, default=4, help="photos of each subject")
    demo.add_argument("--samples_per_image", type=int, default=1, help="reverse edits per subject photo")
    demo.add_argument("--reg_photos", type=int, default=4, help="real circles and real class instances (each)")
    demo.add_argument("--reg_pairs", type=int, default=8, help="regularization pairs per subject")
    demo.add_argument("--heldout", type=int, default=6, help="held-out circles to edit and score per subject")
    demo.add_argument("--finetune_steps", type=int, default=100, help="main.py --max_steps of each fine-tune")
    demo.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate")
    demo.add_argument("--batch", type=int, default=4, help="subject pairs (and as many regularization pairs) per step")
    demo.add_argument("--dino", default=None, help="DINO ViT-S/16 (hub id or folder) for the learned metrics; "
                      "without --dino and --clip they are computed with random-weight encoders (pipeline check only)")
    demo.add_argument("--clip", default=None, help="CLIP ViT-B/32 (hub id or folder) for the learned metrics")
    demo.add_argument("--base_identifier", action="store_true",
                      help="also edit with the base model and the identifier prompt (its subject fidelity)")
    demo.add_argument("--steps", type=int, default=12, help="sampling steps of every edit and generated pair")
    demo.add_argument("--cfg-text", type=float, default=5.0, help="text guidance scale")
    demo.add_argument("--cfg-image", type=float, default=1.5, help="image guidance scale")
    demo.add_argument("--seed", type=int, default=0, help="world, pair generation, training and editing seed")
    demo.add_argument("--grid_rows", type=int, default=2, help="held-out examples per subject shown in grid.png")
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


def make_world(out: Path, args: argparse.Namespace, subjects: tuple[Subject, ...]) -> list[sw.Scene]:
    """Photos of each subject, real circles and real instances of each class (regularization), and held-out circles.

    Returns the held-out scenes (the same circles for every subject: their ground truth is in ``scenes.json``).
    """
    rng = np.random.default_rng([args.seed, 2026])
    write_photos(out / "photos" / "circles", [sw.random_scene(rng, shape=SOURCE_WORD) for _ in range(args.reg_photos)])
    for number, subject in enumerate(subjects):
        subject_rng = np.random.default_rng([args.seed, 2026, number])
        write_photos(out / "photos" / subject.slug, [sw.random_scene(subject_rng, shape=subject.shape, fill=subject.fill)
                                                     for _ in range(args.subject_photos)])
        write_photos(out / "photos" / subject.shape, [sw.random_scene(subject_rng, shape=subject.shape)
                                                      for _ in range(args.reg_photos)])
    heldout_rng = np.random.default_rng([args.seed, 7])  # independent of the photo counts
    heldout = [sw.random_scene(heldout_rng, shape=SOURCE_WORD) for _ in range(args.heldout)]
    write_photos(out / "heldout", heldout)
    (out / "heldout" / "scenes.json").write_text(json.dumps([asdict(s) for s in heldout], indent=1) + "\n")
    return heldout


def score_edits(folder: Path, scenes: list[sw.Scene], subject: Subject) -> dict[str, list[float]]:
    """Per-image subject score, error to the generic instance of the class, and background change of the edits."""
    from PIL import Image

    scores: dict[str, list[float]] = {"subject_score": [], "class_error": [], "background_change": []}
    for index, scene in enumerate(scenes):
        edited = sw.from_pil(Image.open(folder / f"{index:03d}.png"))
        target = sw.Scene(**{**asdict(scene), "shape": subject.shape})  # the circle's colour, the class's shape
        generic, pattern = sw.render(target), sw.render(sw.Scene(**{**asdict(target), "fill": subject.fill}))
        target_mask = sw.object_mask(target)
        region = np.maximum(target_mask, sw.object_mask(scene))  # where the circle was or the new object should be
        scores["subject_score"].append(sw.subject_score(edited, generic, pattern, target_mask))
        scores["class_error"].append(float(np.abs(edited - generic)[region > 0.5].mean()))
        scores["background_change"].append(sw.background_change(edited, sw.render(scene), region))
    return scores


LEARNED_METRICS = ("dino_subject", "clip_i_subject", "clip_t", "bg_l1", "bg_ssim")


def learned_scores(out: Path, subjects: tuple[Subject, ...], heldout: list[sw.Scene],
                   edits: dict[str, list[tuple[str, str]]], dino: str | None, clip: str | None) -> dict[str, Any]:
    """scripts/evaluate.py's metrics (DINO / CLIP subject fidelity, CLIP-T, background) of every edit run, next to
    the ground-truth ones: mean over the subjects of the per-image means, per (model, prompt kind).

    The subject region is the ground truth (where the circle was or the new object should be), the references are
    the subject's photos. Without ``dino`` and ``clip``, random-weight encoders stand in and ``real`` is False.
    """
    from PIL import Image

    from ldm.evaluation.metrics import target_caption
    from ldm.evaluation.models import load_clip, load_dino, random_encoders
    from ldm.evaluation.scoring import EditSample, EditScorer

    real = bool(dino and clip)
    encoders = (load_dino(dino), load_clip(clip)) if real else random_encoders()
    scorer = EditScorer(*encoders)
    sources = [Image.open(out / "heldout" / f"{i:03d}.png").convert("RGB") for i in range(len(heldout))]
    per_run: dict[str, list[dict[str, float]]] = {}
    for subject in subjects:
        photos = sorted((out / "photos" / subject.slug).glob("*.png"))
        references = scorer.references([Image.open(p).convert("RGB") for p in photos])
        for model, kind in edits[subject.slug]:
            samples = []
            for index, scene in enumerate(heldout):
                target = sw.Scene(**{**asdict(scene), "shape": subject.shape})
                region = np.maximum(sw.object_mask(target), sw.object_mask(scene)) > 0.5
                edited = Image.open(out / "edits" / subject.slug / model / kind / f"{index:03d}.png").convert("RGB")
                samples.append(EditSample(edited, target_caption(subject.prompt(kind), IDENTIFIER), sources[index], region))
            rows = scorer.score(samples, references)
            per_run.setdefault(f"{model}/{kind}", []).append({m: float(np.mean([r[m] for r in rows]))
                                                              for m in LEARNED_METRICS})
    table = {run: {m: float(np.mean([row[m] for row in rows])) for m in LEARNED_METRICS}
             for run, rows in per_run.items()}
    return {"real": real, "models": [e.source for e in encoders], "table": table}


def subject_row(prompts: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """One subject's metrics for one model from its per-image scores (``prompts``: kind → score → values).

    Subject fidelity needs the identifier prompt, the other three the class prompt; background change is the mean
    over the prompts that were run.
    """
    row = {}
    if "identifier" in prompts:
        row["subject_fidelity"] = float(np.mean(prompts["identifier"]["subject_score"]))
    row["prior_drift"] = float(np.mean(prompts["class"]["subject_score"]))
    row["class_error"] = float(np.mean(prompts["class"]["class_error"]))
    row["background_change"] = float(np.mean([v for scores in prompts.values() for v in scores["background_change"]]))
    return row


def summarize(per_subject: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """The report's table: per model and metric, mean, spread (sample standard deviation, 0 for one subject), min,
    max and the number of subjects, over the subjects the model was run on (``per_subject``: subject → model → row)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for model in MODELS:
        for metric in METRICS:
            values = [rows[model][metric] for rows in per_subject.values() if metric in rows.get(model, {})]
            if values:
                table.setdefault(model, {})[metric] = {
                    "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "min": float(np.min(values)), "max": float(np.max(values)), "n": len(values)}
    return table


def upscaled(path: Path, factor: int = 2):
    """An image from ``path``, enlarged ``factor``× with nearest-neighbour (pixels stay visible)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def blank(size: int = 128):
    """A grey tile for a cell that has no image (a model not run on that subject)."""
    from PIL import Image

    return Image.new("RGB", (size, size), (235, 235, 235))


def make_grid(out: Path, subjects: tuple[Subject, ...], rows: int) -> Path:
    """Per subject, ``rows`` held-out circles: input | the class and identifier edits of every model (a column per
    model and prompt run for some subject; grey where not run for this one); tiles 128 px (2× nearest), labelled."""
    from ldm.visualization import labelled_grid

    short = {"base": "base", "finetuned_reg": "reg", "finetuned_noreg": "no-reg"}
    columns = [(model, kind) for model in MODELS for kind in PROMPT_KINDS  # those run for at least one subject
               if any((out / "edits" / s.slug / model / kind).is_dir() for s in subjects)]
    cells, labels = [], []
    for subject in subjects:
        for index in range(rows):
            cells.append(upscaled(out / "heldout" / f"{index:03d}.png"))
            labels.append("input circle")
            for model, kind in columns:
                folder = out / "edits" / subject.slug / model / kind
                present = (folder / f"{index:03d}.png").is_file()
                cells.append(upscaled(folder / f"{index:03d}.png") if present else blank())
                noun = f"sks {subject.shape}" if kind == "identifier" else subject.shape
                labels.append(f"{short[model]}: {noun}" if present else "(not run)")
    path = out / "grid.png"
    labelled_grid(cells, 1 + len(columns), labels).save(path)
    return path


def make_pairs_grid(out: Path, subjects: tuple[Subject, ...], count: int) -> Path:
    """Per subject, the first ``count`` training pairs and ``count`` regularization pairs (input | target)."""
    from ldm.visualization import labelled_grid

    cells, labels = [], []
    for subject in subjects:
        for kind in ("training", "regularization"):
            records = [json.loads(line) for line in
                       (out / "data" / subject.slug / kind / "pairs.jsonl").read_text().splitlines() if line.strip()]
            for record in records[:count]:
                folder = out / "data" / subject.slug / kind
                cells += [upscaled(folder / record["input"]), upscaled(folder / record["target"])]
                tag = "train" if kind == "training" else "reg"
                labels += [f"{tag} input", f"{tag} target"]
    path = out / "pairs.png"
    labelled_grid(cells, 4 * count, labels).save(path)
    return path


def read_losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``train/loss_train`` and ``train/loss_reg`` per step from a main.py run's ``metrics.csv``."""
    import csv

    curves: dict[str, list[tuple[int, float]]] = {"loss_train": [], "loss_reg": []}
    with open(run_dir / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for name in curves:
                if row.get(f"train/{name}"):
                    curves[name].append((int(row["step"]), float(row[f"train/{name}"])))
    return curves


def make_loss_plot(out: Path, losses: dict[str, dict[str, list[tuple[int, float]]]]) -> Path:
    """``losses.png``: loss_train and loss_reg against the step for every fine-tune (``losses``: run → curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, name in zip(axes, ("loss_train", "loss_reg")):
        for run, curves in losses.items():
            if curves[name]:
                steps, values = zip(*curves[name])
                style = "-" if run.endswith("_reg") else "--"
                ax.plot(steps, values, style, label=run.replace("_", " "), linewidth=1.2)
        ax.set_title(f"{name} ({'subject pairs' if name == 'loss_train' else 'regularization pairs'})")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (per step)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_metrics_chart(out: Path, table: dict[str, dict[str, dict[str, float]]]) -> Path:
    """``metrics.png``: per metric, a bar per model (mean over subjects) with the spread as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 3.4))
    colours = {"base": "#999999", "finetuned_reg": "#2a7ab9", "finetuned_noreg": "#d1495b"}
    for ax, metric in zip(axes, METRICS):
        models = [m for m in MODELS if metric in table.get(m, {})]
        means = [table[m][metric]["mean"] for m in models]
        spreads = [table[m][metric]["std"] for m in models]
        ax.bar(range(len(models)), means, yerr=spreads, capsize=4, color=[colours[m] for m in models])
        ax.set_xticks(range(len(models)), [MODEL_LABELS[m].replace(", ", ",\n") for m in models], fontsize=7)
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        ax.set_ylim(0, 1 if metric in ("subject_fidelity", "prior_drift") else None)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cell_text(entry: dict[str, float] | None) -> str:
    """``mean ± std`` (3 decimals), or — when the metric was not measured for that model."""
    return "—" if entry is None else f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def learned_lines(learned: dict[str, Any]) -> list[str]:
    """The report's section of scripts/evaluate.py's metrics, with the caveat when the encoders are random."""
    lines = ["## The field's metrics (scripts/evaluate.py), next to the ground-truth ones", ""]
    if learned["real"]:
        lines += [f"Encoders: {', '.join(learned['models'])}. Mean over the subjects; subject region = ground truth.", ""]
    else:
        lines += ["**Caveat: computed with random-weight encoders** (no DINO / CLIP weights here; pass `--dino` and "
                  "`--clip` for real numbers). These numbers only show that the pipeline runs; they say nothing about "
                  "the edits.", ""]
    lines += ["| model, prompt | " + " | ".join(LEARNED_METRICS) + " |", "|---|" + "---|" * len(LEARNED_METRICS)]
    for run, row in learned["table"].items():
        model, kind = run.split("/")
        lines.append(f"| {MODEL_LABELS[model]}, {kind} | " + " | ".join(f"{row[m]:.3f}" for m in LEARNED_METRICS) + " |")
    return lines + [""]


def write_report(out: Path, table: dict, per_subject: dict, subjects: tuple[Subject, ...], timings: dict[str, float],
                 args: argparse.Namespace, learned: dict[str, Any] | None = None) -> Path:
    """``report.md``: the table (mean ± spread over subjects), per-subject numbers, the pictures and the timings."""
    names = ", ".join(f'{s.name} ("sks {s.shape}")' for s in subjects)
    lines = [
        "# ShapesWorld report", "",
        f"Subjects: {names}. Each is edited on the same "
        f"{args.heldout} held-out circles with the identifier prompt \"replace the circle with a sks <class>\" and "
        f"the class prompt \"replace the circle with a <class>\"; {args.steps} sampling steps, text guidance "
        f"{args.cfg_text:g}, image guidance {args.cfg_image:g}, seed {args.seed}. Fine-tuning: {args.finetune_steps} "
        f"steps, learning rate {args.lr:g}, batch {args.batch} + {args.batch} (subject + regularization pairs), "
        f"{args.subject_photos} subject photos × {args.samples_per_image} reverse edits, {args.reg_pairs} "
        f"regularization pairs per subject.", "",
        "Mean ± spread (sample standard deviation) over the subjects each model was run on (n):", "",
        "| model | n | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for model in MODELS:
        if model in table:
            n = max(entry["n"] for entry in table[model].values())
            lines.append(f"| {MODEL_LABELS[model]} | {n} | "
                         + " | ".join(cell_text(table[model].get(m)) for m in METRICS) + " |")
    lines += ["", "Per subject:", "", "| subject | model | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for subject in subjects:
        for model, row in per_subject[subject.slug].items():
            lines.append(f"| {subject.name} | {MODEL_LABELS[model]} | "
                         + " | ".join(f"{row[m]:.3f}" if m in row else "—" for m in METRICS) + " |")
    lines += [
        "", "- subject fidelity: identifier prompt, subject score d_g/(d_g+d_s) inside the new object's mask, where "
        "d_g, d_s are the mean absolute distances to the ground-truth generic object (the circle's colour) and to the "
        "subject at that place (1 = the subject's pattern, 0 = a generic object).",
        "- prior drift: the same score for the class prompt (a generic object is expected: lower is better).",
        "- class error: class prompt, mean |edit − ground-truth generic object| (0–1 units) where the circle was or "
        "the object should be.",
        "- background change: mean |edit − input| outside the circle and the object (grown by 2 px), over the prompts "
        "run with that model (the base model: class prompt only).", "",
        "![metrics](metrics.png)", "",
        "Training losses of the fine-tunes (per step; the reg_weight=0 runs still compute, but do not train on, "
        "loss_reg):", "", "![losses](losses.png)", "",
        "Generated training pairs (input made by the base model in reverse | real subject photo) and regularization "
        "pairs, per subject:", "", "![pairs](pairs.png)", "",
        "Edits of held-out circles (per subject; columns: input | base, reg and no-reg model, each with the class "
        "and the identifier prompt):", "", "![grid](grid.png)", "",
        *(learned_lines(learned) if learned else []),
        "| stage | seconds |", "|---|---|",
    ]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


class Progress:
    """Numbered stages with elapsed time: ``[3/14 1:25] fine-tune: striped_star_reg``."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.timings: dict[str, float] = {}

    def run(self, title: str, tool: str, argv: list[str]) -> None:
        self.done += 1
        elapsed = int(time.perf_counter() - self.start)
        run_step(f"[{self.done}/{self.total} {elapsed // 60}:{elapsed % 60:02d}] {title}", tool, argv, self.timings)


def demo(args: argparse.Namespace) -> int:
    """The main job: world → pairs → fine-tunes → held-out edits → metrics, pictures and report, per subject."""
    if args.out is None:
        args.out = f"outputs/shapesworld/{time.strftime('%Y-%m-%dT%H-%M-%S')}"
    out = Path(args.out).resolve()
    if (out / "report.md").exists() or (out / "data").exists():
        raise SystemExit(f"{out} holds a previous run: choose another --out or delete it")
    if not Path(args.base).is_file():
        raise SystemExit(f"base model not found: {args.base} (train one with `python scripts/shapesworld.py base`)")
    if not 1 <= args.subjects <= len(SUBJECTS) or not 0 <= args.noreg_subjects <= args.subjects:
        raise SystemExit(f"--subjects must lie in 1..{len(SUBJECTS)} and --noreg_subjects in 0..--subjects")
    subjects = SUBJECTS[: args.subjects]
    start = time.perf_counter()
    heldout = make_world(out, args, subjects)
    base = Path(args.base).resolve()
    runs = {s.slug: ["finetuned_reg"] + (["finetuned_noreg"] if i < args.noreg_subjects else [])
            for i, s in enumerate(subjects)}
    edits = {s.slug: [("base", "class")] + ([("base", "identifier")] if args.base_identifier else [])
             + [(model, kind) for model in runs[s.slug] for kind in PROMPT_KINDS] for s in subjects}
    progress = Progress(sum(2 + len(runs[s.slug]) + len(edits[s.slug]) for s in subjects))
    logger.info("ShapesWorld demo: %d subjects, %d fine-tunes, %d edit runs → %s", len(subjects),
                sum(map(len, runs.values())), sum(map(len, edits.values())), out)
    sample = ["--ckpt", str(base), "--config", str(BASE_CONFIG), "--steps", str(args.steps), "--resolution", "64",
              "--cfg-text", str(args.cfg_text), "--cfg-image", str(args.cfg_image), "--device", "cpu", "--quiet"]
    per_subject: dict[str, dict[str, dict[str, float]]] = {}
    per_image: dict[str, dict] = {}
    losses: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for subject in subjects:
        words = ["--class_word", subject.shape, "--source_word", SOURCE_WORD]
        data = out / "data" / subject.slug
        progress.run(f"{subject.name}: training pairs (base model in reverse)", "scripts/generate_dataset.py", [
            "--mode", "train", "--subject_dir", str(out / "photos" / subject.slug), "--identifier", IDENTIFIER,
            "--samples_per_image", str(args.samples_per_image), "--output", str(data / "training"),
            "--seed", str(args.seed), "--batch-size", str(args.subject_photos), *words, *sample])
        progress.run(f"{subject.name}: regularization pairs", "scripts/generate_dataset.py", [
            "--mode", "reg", "--reg_source_dir", str(out / "photos" / "circles"),
            "--reg_class_dir", str(out / "photos" / subject.shape), "--num_pairs", str(args.reg_pairs),
            "--output", str(data / "regularization"), "--seed", str(args.seed + 1),
            "--batch-size", str(args.reg_pairs), *words, *sample])
        checkpoints = {"base": base}
        for model in runs[subject.slug]:
            name = f"{subject.slug}_{'reg' if model == 'finetuned_reg' else 'noreg'}"
            progress.run(f"{subject.name}: fine-tune {name}", "main.py", [
                "-b", str(PERSONALIZE_CONFIG), "-t", "-n", name, "-s", str(args.seed), "-l", str(out / "logs"),
                "--actual_resume", str(base), "--data_root", str(data / "training"),
                "--reg_data_root", str(data / "regularization"), "--identifier", IDENTIFIER,
                "--max_steps", str(args.finetune_steps), *words, f"model.base_learning_rate={args.lr}",
                f"data.params.batch_size={args.batch}", "lightning.callbacks.image_logger.params.disabled=true",
                *(["model.params.reg_weight=0"] if model == "finetuned_noreg" else [])])
            checkpoints[model] = find_export(out / "logs", name)
            losses[name] = read_losses(checkpoints[model].parent.parent)
        per_image[subject.slug] = {}
        for model, kind in edits[subject.slug]:
            folder = out / "edits" / subject.slug / model / kind
            progress.run(f"{subject.name}: edit with {model}, {kind} prompt", "scripts/edit_cli.py", [
                "--input", str(out / "heldout"), "--output", str(folder), "--edit", subject.prompt(kind),
                "--ckpt", str(checkpoints[model]), *sample[2:], "--seed", str(args.seed),
                "--batch-size", str(args.heldout)])
            per_image[subject.slug].setdefault(model, {})[kind] = score_edits(folder, heldout, subject)
        per_subject[subject.slug] = {model: subject_row(prompts) for model, prompts in per_image[subject.slug].items()}
    table = summarize(per_subject)
    learned = learned_scores(out, subjects, heldout, edits, args.dino, args.clip)
    timings = dict(progress.timings)
    timings["total"] = time.perf_counter() - start
    (out / "metrics.json").write_text(json.dumps({
        "table": table, "per_subject": per_subject, "per_image": per_image, "losses": losses, "learned": learned,
        "timings_s": timings,
        "subjects": [asdict(s) for s in subjects], "settings": vars(args)}, indent=1) + "\n")
    make_grid(out, subjects, min(args.grid_rows, args.heldout))
    make_pairs_grid(out, subjects, min(2, args.subject_photos * args.samples_per_image, args.reg_pairs))
    make_loss_plot(out, losses)
    make_metrics_chart(out, table)
    report = write_report(out, table, per_subject, subjects, timings, args, learned)
    logger.info("report: %s (%.0f s in total)", report, timings["total"])
    logger.info("\n%s", "\n".join(report.read_text().splitlines()[:12 + len(MODELS)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return train_base(args) if args.command == "base" else demo(args)


if __name__ == "__main__":
    sys.exit(main())
