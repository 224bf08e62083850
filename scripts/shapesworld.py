#!/usr/bin/env python
"""ShapesWorld: the whole Instruct2Dream method on a laptop CPU, in a synthetic world with exact ground truth.

    python scripts/shapesworld.py demo --out outputs/shapesworld     # the main job (bundled base model)
    python scripts/shapesworld.py base --out configs/shapesworld/base.safetensors   # re-train the base model

``demo``, for each of three subjects (a striped "sks star", a checkered "sks square", a dotted "sks triangle"):
photos of the subject and of generic circles and of its class are rendered from the world;
``scripts/generate_dataset.py`` makes training and regularization pairs with the base model in reverse (each
reverse-edited training input also recoloured by follow-up edits, "make the circle white", so that "sks" is learned
for circles of any colour);
``main.py`` fine-tunes the base model with ``reg_weight=0``, and that model labels the real circles with the subject
(``generate_dataset.py --source_dir``: "replace the circle with a sks <class>" edits of real circles, the labelled
pairs); ``main.py`` then fine-tunes the base model with prior preservation on the training and the labelled pairs;
``scripts/edit_cli.py`` edits held-out circles with "replace the circle with a sks <class>"
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
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.cli import HelpFormatter  # noqa: E402
from ldm.data import shapesworld as sw  # noqa: E402
from scripts.shapesworld_report import (IDENTIFIER, MODELS, PROMPT_KINDS, SOURCE_WORD, SUBJECTS,  # noqa: E402
                                        Subject, learned_scores, make_grid, make_loss_plot, make_metrics_chart,
                                        make_pairs_grid, read_losses, score_edits, subject_row, summarize,
                                        write_report)

logger = logging.getLogger("shapesworld")

BASE_CONFIG = REPO / "configs" / "shapesworld" / "base.yaml"
PERSONALIZE_CONFIG = REPO / "configs" / "shapesworld" / "personalize.yaml"
BASE_CKPT = REPO / "configs" / "shapesworld" / "base.safetensors"


def world_colours(text: str) -> list[str]:
    """``--variants``: comma-separated colour names of the world (empty entries dropped)."""
    colours = [c for c in text.split(",") if c]
    unknown = [c for c in colours if c not in sw.COLOURS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not a colour of the world ({', '.join(sw.COLOURS)})")
    return colours


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="train the base model with main.py and store it as fp16 safetensors",
                          formatter_class=HelpFormatter)
    base.add_argument("--out", default=str(BASE_CKPT), help="where to write the base weights (.safetensors)")
    base.add_argument("--max_steps", type=int, default=3793, help="training steps (3793: the bundled model)")
    base.add_argument("--gpus", default=None, help="main.py --gpus, e.g. '0,' (the bundled model was trained on one GPU)")
    base.add_argument("--seed", type=int, default=23, help="main.py --seed")
    base.add_argument("--logdir", default="logs", help="main.py --logdir")
    base.add_argument("overrides", nargs="*", help="main.py a.b=c config overrides")
    demo = sub.add_parser("demo", help="the whole method on the bundled base model, with a report",
                          formatter_class=HelpFormatter)
    demo.add_argument("--out", default=None,
                      help="output folder, must not hold a previous run (default: outputs/shapesworld/<timestamp>)")
    demo.add_argument("--base", default=str(BASE_CKPT), help="base model weights")
    demo.add_argument("--subjects", type=int, default=3, help="subjects (striped star, checkered square, dotted triangle)")
    demo.add_argument("--noreg_subjects", type=int, default=3,
                      help="subjects whose reg_weight=0 fine-tune is also edited and scored (the ablation), the first "
                           "ones (with --labelled_pairs every subject has that fine-tune)")
    demo.add_argument("--noreg_steps", type=int, default=100, help="main.py --max_steps of each reg_weight=0 fine-tune")
    demo.add_argument("--subject_photos", type=int, default=6, help="photos of each subject")
    demo.add_argument("--samples_per_image", type=int, default=1, help="reverse edits per subject photo")
    demo.add_argument("--variants", type=world_colours, default="white,orange,green,red",
                      help="colours of the follow-up edits of every training input ('make the circle <colour>', "
                           "generate_dataset.py --vary_template), comma-separated; '' for none. '' with --recolour_p "
                           "0.833 skips the 24 follow-up edits per subject: 45 s faster, fidelity 0.751 against 0.754 "
                           "over ten seeds (docs/shapesworld.md, 'Eighteenth session')")
    demo.add_argument("--recolour_p", type=float, default=0.0,
                      help="probability that a fine-tune draws a training input with its stand-in circle repainted "
                           "in a random colour (ldm/data/shapesworld_recolour.py); 0: the inputs as generated. "
                           "Measured on five seeds at 0.5, no better on average (docs/shapesworld.md)")
    demo.add_argument("--reg_photos", type=int, default=12,
                      help="real circles and real class instances (each), their colours cycling through the "
                           "world's six; --labelled_pairs labels every circle")
    demo.add_argument("--reg_pairs", type=int, default=12,
                      help="regularization pairs per subject from the real circles and class photos, taken "
                           "alternately (12: the first 6 of each)")
    demo.add_argument("--paired_prior", action="store_true",
                      help="also every training input edited with the class prompt as a regularization pair "
                           "(generate_dataset.py --reg_source_pairs), so that 'sks' must be told from the class by "
                           "the text alone; measured on four seeds, no better on average (docs/shapesworld.md)")
    demo.add_argument("--labelled_pairs", action=argparse.BooleanOptionalAction, default=True,
                      help="label the real circles of the regularization photos with the subject: the reg_weight=0 "
                           "fine-tune edits each with the identifier prompt (at --cfg-text, paste-back as the pairs), "
                           "and the prior-preserved fine-tune trains on these pairs besides the generated ones, so it "
                           "sees real circles with both prompts (generate_dataset.py --source_dir, main.py --data_root "
                           "twice; docs/shapesworld.md, 'Sixteenth session')")
    demo.add_argument("--paste_back", type=float, default=0.08,
                      help="generate_dataset.py --paste_back of every pair (the real photo kept wherever the edit "
                           "changed it by less than this); 0 for none")
    demo.add_argument("--heldout", type=int, default=6, help="held-out circles to edit and score per subject")
    demo.add_argument("--finetune_steps", type=int, default=125, help="main.py --max_steps of each fine-tune")
    demo.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate")
    demo.add_argument("--batch", type=int, default=4, help="subject pairs (and as many regularization pairs) per step")
    demo.add_argument("--dino", default=None, help="DINO ViT-S/16 (hub id or folder) for the learned metrics; "
                      "without --dino and --clip they are computed with random-weight encoders (pipeline check only)")
    demo.add_argument("--clip", default=None, help="CLIP ViT-B/32 (hub id or folder) for the learned metrics")
    demo.add_argument("--base_identifier", action="store_true",
                      help="also edit with the base model and the identifier prompt (its subject fidelity)")
    demo.add_argument("--steps", type=int, default=12, help="sampling steps of every edit and generated pair")
    demo.add_argument("--cfg-text", type=float, default=3.0,
                      help="text guidance of the edits and regularization pairs (3: at 5 every model changes "
                           "backgrounds more, docs/shapesworld.md)")
    demo.add_argument("--cfg-image", type=float, default=1.5, help="image guidance scale")
    demo.add_argument("--cfg-contrast", type=float, default=0.0,
                      help="contrast guidance of the identifier edits against the class prompt (edit_cli.py "
                           "--contrast; 0: none). Measured at 2 on five seeds: lost identifiers come back, the mean "
                           "fidelity rises from 0.740 to 0.748, one seed falls (docs/shapesworld.md)")
    demo.add_argument("--pairs_cfg_text", type=float, default=1.5,
                      help="text guidance of the reverse and follow-up edits that make the training pairs (at 3 the "
                           "base model, which never saw a pattern, paints a striped star's stand-in circle 1.17x its "
                           "radius, at 1.5 1.10x; docs/shapesworld.md)")
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
    logger.info("   python %s %s", tool, shlex.join(argv))
    module = importlib.import_module(tool.removesuffix(".py").replace("/", "."))
    start = time.perf_counter()
    status = module.main(argv)
    timings[title] = time.perf_counter() - start
    if hasattr(module, "RUN_TIMESTAMP_ENV"):  # main.py keeps its timestamp for DDP ranks: give each run its own
        os.environ.pop(module.RUN_TIMESTAMP_ENV, None)
    if status:
        raise SystemExit(f"{title} failed (exit status {status}): python {tool} {shlex.join(argv)}")


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


def prior_colours(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` colours for the regularization photos: every world colour in turn (in a random order), so that the
    class prior is held for every colour a held-out circle can have (random draws can give four green stars)."""
    order = [str(c) for c in rng.permutation(list(sw.COLOURS))]
    return [order[i % len(order)] for i in range(count)]


def make_world(out: Path, args: argparse.Namespace, subjects: tuple[Subject, ...]) -> list[sw.Scene]:
    """Photos of each subject, real circles and real instances of each class (regularization), and held-out circles.

    Returns the held-out scenes (the same circles for every subject: their ground truth is in ``scenes.json``).
    """
    rng = np.random.default_rng([args.seed, 2026])
    write_photos(out / "photos" / "circles", [sw.random_scene(rng, shape=SOURCE_WORD, fill=colour)
                                              for colour in prior_colours(rng, args.reg_photos)])
    for number, subject in enumerate(subjects):
        subject_rng = np.random.default_rng([args.seed, 2026, number])
        write_photos(out / "photos" / subject.slug, [sw.random_scene(subject_rng, shape=subject.shape, fill=subject.fill)
                                                     for _ in range(args.subject_photos)])
        write_photos(out / "photos" / subject.shape, [sw.random_scene(subject_rng, shape=subject.shape, fill=colour)
                                                      for colour in prior_colours(subject_rng, args.reg_photos)])
    heldout_rng = np.random.default_rng([args.seed, 7])  # independent of the photo counts
    heldout = [sw.random_scene(heldout_rng, shape=SOURCE_WORD) for _ in range(args.heldout)]
    write_photos(out / "heldout", heldout)
    (out / "heldout" / "scenes.json").write_text(json.dumps([asdict(s) for s in heldout], indent=1) + "\n")
    return heldout


class Progress:
    """Numbered stages with elapsed time: ``[3/14 1:25] fine-tune: striped_star_reg``."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.timings: dict[str, float] = {}

    def run(self, title: str, tool: str, argv: list[str]) -> None:
        self.done += 1
        elapsed = int(time.perf_counter() - self.start)
        run_step(f"[{self.done}/{self.total} {elapsed // 60}:{elapsed % 60:02d}] {title}", tool, argv, self.timings)


def sampling_flags(args: argparse.Namespace, base: Path, cfg_text: float) -> list[str]:
    """edit_cli / generate_dataset flags of the base model ``base`` sampled at text guidance ``cfg_text``."""
    return ["--ckpt", str(base), "--config", str(BASE_CONFIG), "--steps", str(args.steps), "--resolution", "64",
            "--cfg-text", str(cfg_text), "--cfg-image", str(args.cfg_image), "--device", "cpu", "--quiet"]


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
    if not 0.0 <= args.recolour_p <= 1.0:
        raise SystemExit(f"--recolour_p must lie in [0, 1], got {args.recolour_p}")
    subjects = SUBJECTS[: args.subjects]
    start = time.perf_counter()
    heldout = make_world(out, args, subjects)
    base = Path(args.base).resolve()
    # The reg_weight=0 fine-tune comes first: with --labelled_pairs it labels the real circles for the second.
    runs = {s.slug: (["finetuned_noreg"] if args.labelled_pairs or i < args.noreg_subjects else []) + ["finetuned_reg"]
            for i, s in enumerate(subjects)}
    scored = {s.slug: ["finetuned_reg"] + (["finetuned_noreg"] if i < args.noreg_subjects else [])
              for i, s in enumerate(subjects)}
    edits = {s.slug: [("base", "class")] + ([("base", "identifier")] if args.base_identifier else [])
             + [(model, kind) for model in scored[s.slug] for kind in PROMPT_KINDS] for s in subjects}
    labelling = 1 if args.labelled_pairs else 0
    progress = Progress(sum(2 + labelling + len(runs[s.slug]) + len(edits[s.slug]) for s in subjects))
    logger.info("ShapesWorld demo: %d subjects, %d fine-tunes, %d edit runs → %s", len(subjects),
                sum(map(len, runs.values())), sum(map(len, edits.values())), out)
    sample = sampling_flags(args, base, args.cfg_text)
    paste = ["--paste_back", str(args.paste_back)] if args.paste_back else []
    per_subject: dict[str, dict[str, dict[str, float]]] = {}
    per_image: dict[str, dict] = {}
    losses: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for subject in subjects:
        words = ["--class_word", subject.shape, "--source_word", SOURCE_WORD]
        data = out / "data" / subject.slug
        progress.run(f"{subject.name}: training pairs (base model in reverse)", "scripts/generate_dataset.py", [
            "--mode", "train", "--subject_dir", str(out / "photos" / subject.slug), "--identifier", IDENTIFIER,
            "--samples_per_image", str(args.samples_per_image), "--output", str(data / "training"),
            *(x for colour in args.variants for x in ("--vary_template", f"make the {SOURCE_WORD} {colour}")),
            *paste,
            "--seed", str(args.seed), "--batch-size", str(args.subject_photos), *words,
            *sampling_flags(args, base, args.pairs_cfg_text)])
        paired = ["--reg_source_pairs", str(data / "training")] if args.paired_prior else []
        progress.run(f"{subject.name}: regularization pairs", "scripts/generate_dataset.py", [
            "--mode", "reg", "--reg_source_dir", str(out / "photos" / "circles"),
            "--reg_class_dir", str(out / "photos" / subject.shape), *paired,
            "--num_pairs", str(args.reg_pairs), "--output", str(data / "regularization"),
            "--seed", str(args.seed + 1), "--batch-size", str(args.reg_pairs), *paste, *words, *sample])
        checkpoints = {"base": base}
        training = [data / "training"]
        for model in runs[subject.slug]:
            name = f"{subject.slug}_{'reg' if model == 'finetuned_reg' else 'noreg'}"
            if model == "finetuned_reg" and args.labelled_pairs:
                progress.run(f"{subject.name}: labelled pairs (the reg_weight=0 model on real circles)",
                             "scripts/generate_dataset.py", [
                                 "--mode", "train", "--source_dir", str(out / "photos" / "circles"),
                                 "--identifier", IDENTIFIER, "--output", str(data / "labelled"), *paste,
                                 "--seed", str(args.seed + 2), "--batch-size", str(args.reg_photos), *words,
                                 *sampling_flags(args, checkpoints["finetuned_noreg"], args.cfg_text)])
                training.append(data / "labelled")
            progress.run(f"{subject.name}: fine-tune {name}", "main.py", [
                "-b", str(PERSONALIZE_CONFIG), "-t", "-n", name, "-s", str(args.seed), "-l", str(out / "logs"),
                "--actual_resume", str(base), *(x for folder in training for x in ("--data_root", str(folder))),
                "--reg_data_root", str(data / "regularization"), "--identifier", IDENTIFIER,
                "--max_steps", str(args.finetune_steps if model == "finetuned_reg" else args.noreg_steps), *words,
                f"model.base_learning_rate={args.lr}",
                f"data.params.batch_size={args.batch}", f"data.params.train.params.recolour_p={args.recolour_p}",
                "lightning.callbacks.image_logger.params.disabled=true",
                *(["model.params.reg_weight=0"] if model == "finetuned_noreg" else [])])
            checkpoints[model] = find_export(out / "logs", name)
            losses[name] = read_losses(checkpoints[model].parent.parent)
        per_image[subject.slug] = {}
        for model, kind in edits[subject.slug]:
            folder = out / "edits" / subject.slug / model / kind
            contrast = (["--contrast", subject.prompt("class"), "--cfg-contrast", str(args.cfg_contrast)]
                        if kind == "identifier" and args.cfg_contrast else [])
            progress.run(f"{subject.name}: edit with {model}, {kind} prompt", "scripts/edit_cli.py", [
                "--input", str(out / "heldout"), "--output", str(folder), "--edit", subject.prompt(kind),
                "--ckpt", str(checkpoints[model]), *sample[2:], *contrast, "--seed", str(args.seed),
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
    make_pairs_grid(out, subjects, min(2, args.subject_photos * args.samples_per_image, args.reg_pairs),
                    recolour_seed=args.seed if args.recolour_p > 0 else None)
    make_loss_plot(out, losses)
    make_metrics_chart(out, table)
    reg_log_every = int(OmegaConf.load(PERSONALIZE_CONFIG).model.params.get("reg_log_every", 1))
    report = write_report(out, table, per_subject, subjects, timings, args, learned, reg_log_every)
    logger.info("report: %s (%.0f s in total)", report, timings["total"])
    logger.info("\n%s", "\n".join(report.read_text().splitlines()[:12 + len(MODELS)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return train_base(args) if args.command == "base" else demo(args)


if __name__ == "__main__":
    sys.exit(main())
