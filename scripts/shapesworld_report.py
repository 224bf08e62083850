"""ShapesWorld's scoring and report: the subjects, the ground-truth metrics of the edits, the field's learned metrics
beside them, and ``report.md`` with its pictures (``metrics.png``, ``losses.png``, ``pairs.png``, ``grid.png``).

Used by ``scripts/shapesworld.py demo``; the definitions are in docs/shapesworld.md ("Metrics").
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm.data import shapesworld as sw


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


def upscaled(image, factor: int = 2):
    """An image (a PIL image or a path to one), enlarged ``factor``× with nearest-neighbour (pixels stay visible)."""
    from PIL import Image

    image = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
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


def recoloured_cell(folder: Path, record: dict[str, Any], generator):
    """The input of a training pair as a fine-tune may draw it: its stand-in in a colour drawn from ``generator`` (a
    torch.Generator), 2× enlarged."""
    import torch
    from PIL import Image

    from ldm.data.shapesworld_recolour import recolour_stand_in

    source, target = (torch.from_numpy(sw.from_pil(Image.open(folder / record[side])).transpose(2, 0, 1).copy())
                      for side in ("input", "target"))
    colour = torch.rand(3, generator=generator)
    return upscaled(sw.to_pil(recolour_stand_in(source, target, colour).numpy().transpose(1, 2, 0)))


def make_pairs_grid(out: Path, subjects: tuple[Subject, ...], count: int, recolour_seed: int | None = None) -> Path:
    """Per subject, ``count`` training pairs and ``count`` regularization pairs (input | target).

    The training pairs are the first ones, except that the last places go to the first labelled pair (a real circle
    edited by the reg_weight=0 model, ``data/<subject>/labelled``) where there is one and, with ``recolour_seed`` (the
    fine-tunes recolour stand-ins), to the first training pair with its stand-in recoloured. The last
    regularization pair is a paired-prior pair (a training input edited with the class prompt) where there are any.
    A recoloured training input (`generate_dataset.py --vary_template`) is labelled with its colour."""
    import torch

    from ldm.visualization import labelled_grid

    generator = torch.Generator().manual_seed(recolour_seed or 0)
    cells, labels = [], []
    for subject in subjects:
        for kind in ("training", "regularization"):
            folder = out / "data" / subject.slug / kind
            records = read_records(folder)
            special: list[tuple[Any, Any, str, str]] = []  # (input cell, target cell, input label, target label)
            labelled = out / "data" / subject.slug / "labelled"
            if kind == "training" and (labelled / "pairs.jsonl").is_file():
                first = read_records(labelled)[0]
                special.append((upscaled(labelled / first["input"]), upscaled(labelled / first["target"]),
                                "labelled input (real)", "labelled target"))
            if kind == "training" and recolour_seed is not None:
                special.append((recoloured_cell(folder, records[0], generator), upscaled(folder / records[0]["target"]),
                                "recoloured input", "train target"))
            for record in [r for r in records if r["kind"] == "reg_paired"][:1]:
                special.append((upscaled(folder / record["input"]), upscaled(folder / record["target"]),
                                "paired reg input", "paired reg target"))
            special = special[:count]
            shown = records[:count - len(special)]
            for record in shown:
                cells += [upscaled(folder / record["input"]), upscaled(folder / record["target"])]
                tag = {"train": "train", "reg_paired": "paired reg"}.get(record["kind"], "reg")
                colour = (record.get("follow_up_instruction") or "").rpartition(" ")[2]  # "make the circle white"
                labels += [f"{tag} input" + (f": {colour}" if colour else ""), f"{tag} target"]
            for before, after, *names in special:
                cells += [before, after]
                labels += names
    path = out / "pairs.png"
    labelled_grid(cells, 4 * count, labels).save(path)
    return path


def read_records(folder: Path) -> list[dict[str, Any]]:
    """The records of a generate_dataset.py folder's ``pairs.jsonl``, in order."""
    return [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines() if line.strip()]


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
                 args: argparse.Namespace, learned: dict[str, Any] | None = None, reg_log_every: int = 1) -> Path:
    """``report.md``: the table (mean ± spread over subjects), per-subject numbers, the pictures and the timings.

    ``reg_log_every``: the fine-tunes' setting (a reg_weight=0 run computes loss_reg on every N-th step only).
    """
    names = ", ".join(f'{s.name} ("sks {s.shape}")' for s in subjects)
    noreg = (f"{args.noreg_steps} for reg_weight=0" if args.noreg_subjects or args.labelled_pairs
             else "no reg_weight=0 run")
    lines = [
        "# ShapesWorld report", "",
        f"Subjects: {names}. Each is edited on the same "
        f"{args.heldout} held-out circles with the identifier prompt \"replace the circle with a sks <class>\" and "
        f"the class prompt \"replace the circle with a <class>\"; {args.steps} sampling steps, text guidance "
        f"{args.cfg_text:g}, image guidance {args.cfg_image:g}"
        + (f", the identifier prompt with contrast guidance {args.cfg_contrast:g} against the class prompt "
           "(edit_cli.py --contrast)" if args.cfg_contrast else "")
        + f", seed {args.seed}. Fine-tuning: {args.finetune_steps} "
        f"steps ({noreg}), learning rate {args.lr:g}, batch {args.batch} + {args.batch} "
        f"(subject + regularization pairs), {args.subject_photos} subject photos × {args.samples_per_image} reverse "
        f"edit{'s' if args.samples_per_image != 1 else ''}"
        + (f" × (1 + {len(args.variants)} recoloured by the base model: {', '.join(args.variants)})"
           if args.variants else "")
        + f" made at text guidance {args.pairs_cfg_text:g}, "
        + (f"each stand-in recoloured at random with probability {args.recolour_p:g} whenever the fine-tunes draw "
           "it, " if args.recolour_p > 0 else "")
        + f"{args.reg_pairs} regularization pairs per subject from real photos"
        + (" and one per training pair, its input edited with the class prompt (the paired prior)"
           if args.paired_prior else "")
        + (f"; the prior-preserved fine-tune also trains on {args.reg_photos} labelled pairs per subject: the real "
           "circles of the regularization photos edited with the identifier prompt by the reg_weight=0 fine-tune."
           if args.labelled_pairs else "."), "",
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
        "subject at that place, all three images softened by a [1, 2, 1] blur and each reference allowed to move by "
        "one pixel (1 = the subject's pattern, 0 = a generic object).",
        "- prior drift: the same score for the class prompt (a generic object is expected: lower is better).",
        "- class error: class prompt, mean |edit − ground-truth generic object| (0–1 units) where the circle was or "
        "the object should be.",
        "- background change: mean |edit − input| outside the circle and the object (grown by 2 px), over the prompts "
        "run with that model (the base model: class prompt only).", "",
        "![metrics](metrics.png)", "",
        "Training losses of the fine-tunes (per step; the reg_weight=0 runs still compute, but do not train on, "
        f"loss_reg{'' if reg_log_every == 1 else f', on every {reg_log_every}th step'}):", "", "![losses](losses.png)", "",
        "Generated training pairs (input made by the base model in reverse | real subject photo)"
        + (", a labelled pair (real circle | the reg_weight=0 model's identifier edit)"
           if args.labelled_pairs else "")
        + " and regularization pairs, per subject:", "", "![pairs](pairs.png)", "",
        "Edits of held-out circles (per subject; columns: input | base, reg and no-reg model, each with the class "
        "and the identifier prompt):", "", "![grid](grid.png)", "",
        *(learned_lines(learned) if learned else []),
        "| stage | seconds |", "|---|---|",
    ]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
