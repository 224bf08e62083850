#!/usr/bin/env python
"""Make Instruct2Dream training pairs by running the stock InstructPix2Pix "in reverse" (DreamBooth data).

    # training: each real subject photo is a target (NN_1); its IP2P edit into a wolf is the input (NN_0)
    python scripts/generate_dataset.py --mode train --subject_dir photos/my_dog --class_word dog --source_word wolf \
        --samples_per_image 2 --output data/my_dog/training
    # regularization: real wolves → generated dogs and/or generated wolves → real dogs (captions without identifier)
    python scripts/generate_dataset.py --mode reg --reg_source_dir photos/wolves --reg_class_dir photos/dogs \
        --class_word dog --source_word wolf --num_pairs 100 --output data/my_dog/regularization
    # ... and the paired prior: also every training input (a generated wolf) → a generated dog, one pair each
    python scripts/generate_dataset.py --mode reg --reg_source_dir photos/wolves --reg_class_dir photos/dogs \
        --reg_source_pairs data/my_dog/training --class_word dog --source_word wolf --num_pairs 100 \
        --output data/my_dog/regularization
    # labelled identifier pairs: real wolves edited into "sks dog" by a model already fine-tuned on the subject
    python scripts/generate_dataset.py --mode train --source_dir photos/wolves --class_word dog --source_word wolf \
        --ckpt logs/<run>/export/model.safetensors --output data/my_dog/labelled

Pair ``i`` uses photo ``i mod n`` (reg mode alternates source and class photos; train mode takes the subject
photos, then the --source_dir photos, whose pairs are forward edits with the identifier: kind ``train_source``) and
a seed derived from --seed and ``i``; --reg_source_pairs adds one pair per training input after the --num_pairs pairs of the photo folders (kind
``reg_paired``). With --vary_template (train) each generated input also gets follow-up edits ("make the wolf
white"), one more pair each with the same real target: pairs then come in groups (the plain pair and its variants)
sharing a photo and seed. The real photo and its edit share one crop and size (`load_for_edit`: InstructPix2Pix's
size rule on the photo's full-resolution size), so every pair is aligned. The output folder holds ``NNN_0.png`` (input),
``NNN_1.png`` (target), ``pairs.jsonl`` (one JSON line per pair: files, instructions, seed, guidance, checkpoint
sha256, source photo, …) and ``generate_dataset.json`` (the settings, checked on every rerun). A rerun resumes where
a run stopped; a larger --num_pairs / --samples_per_image adds pairs (with --reg_source_pairs a changed --num_pairs
is refused: use a new folder); other changed settings are refused. Unreadable photos stop the run, or with
--skip-unreadable are skipped and listed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.cli import HelpFormatter, add_model_args, add_sampling_args, check_sampling_args, run_cli  # noqa: E402
from ldm.data.pair_generation import Pair, Photo, follow_up_seed, generate, pair_seed  # noqa: E402
from ldm.data.pair_store import SETTINGS, SETTINGS_FORMAT, PairStore  # noqa: E402
from ldm.errors import UsageError  # noqa: E402

logger = logging.getLogger("generate_dataset")

REVERSE_TEMPLATE = "replace the {class} with a {source}"
FORWARD_TEMPLATES = {"train": "replace the {source} with a {identifier} {class}",
                     "reg": "replace the {source} with a {class}"}
RECIPE_KEYS = ("mode", "class_word", "source_word", "identifier", "forward_template", "reverse_template", "steps",
               "cfg_text", "cfg_image", "resolution", "sampler", "seed", "ema", "photos", "filter")
DEFAULT_CANDIDATES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--mode", choices=("train", "reg"), required=True, help="training or regularization pairs")
    p.add_argument("--subject_dir", "--subject-dir", help="train: real photos of the subject (the targets)")
    p.add_argument("--source_dir", "--source-dir",
                   help="train: real photos of the source class (inputs), each edited forward with the identifier "
                        "caption by --ckpt (the target). With a model already fine-tuned on the subject (e.g. with "
                        "reg_weight=0) this labels real source photos with the subject, so that a second fine-tune "
                        "sees the identifier on real inputs too (the labelled pairs, docs/shapesworld.md)")
    p.add_argument("--reg_source_dir", "--reg-source-dir", help="reg: real photos of the source class (inputs)")
    p.add_argument("--reg_class_dir", "--reg-class-dir", help="reg: real photos of the class (targets)")
    p.add_argument("--reg_source_pairs", "--reg-source-pairs", metavar="TRAIN_DIR",
                   help="reg: after the --num_pairs pairs of the photo folders, one more pair per training pair in "
                        "TRAIN_DIR (a --mode train output): its generated input edited with the class prompt. The "
                        "fine-tune then sees every training input with both prompts and must tell the subject from "
                        "the class by the text alone (the paired prior, docs/shapesworld.md)")
    p.add_argument("--class_word", "--class-word", required=True, help="the subject's class, e.g. dog")
    p.add_argument("--source_word", "--source-word", required=True, help="another class, e.g. wolf")
    p.add_argument("--identifier", default="sks", help="rare token naming the subject (training captions)")
    p.add_argument("--samples_per_image", "--samples-per-image", type=int, default=None,
                   help="train: pairs (seeds) per subject photo (default 1)")
    p.add_argument("--num_pairs", "--num-pairs", type=int, default=None,
                   help="reg: number of pairs, cycling photos and seeds (default 100)")
    p.add_argument("--output", required=True, help="output folder (created, or resumed when it holds our pairs)")
    p.add_argument("--reverse_template", "--reverse-template", default=REVERSE_TEMPLATE,
                   help="edit of a subject/class photo; fields {class} {source} {identifier}")
    p.add_argument("--vary_template", "--vary-template", action="append", metavar="TEMPLATE",
                   help="train: a follow-up edit of every generated input, e.g. 'make the {source} white': one more "
                        "pair per input, same real photo as target, so the inputs vary beyond the look the reverse "
                        "edit gives them; repeat for several (not for reg pairs: their target must stay a faithful "
                        "edit of the input)")
    p.add_argument("--paste_back", "--paste-back", type=float, default=None, metavar="THRESHOLD",
                   help="keep the real photo wherever the edit changed it by less than THRESHOLD (mean absolute "
                        "difference, 0-1, after a blur; e.g. 0.08), so a pair differs only where the edit acts "
                        "(ldm/data/paste_back.py); for local edits (replace an object), not whole-image ones")
    p.add_argument("--forward_template", "--forward-template", default=None,
                   help=f"the caption (and the edit of source photos); default {FORWARD_TEMPLATES['train']!r} "
                        f"(train), {FORWARD_TEMPLATES['reg']!r} (reg)")
    add_model_args(p, "stock InstructPix2Pix weights (.ckpt or .safetensors)")
    add_sampling_args(p, sweep=False, seed=0, seed_help="base seed; pair i gets a seed derived from it and i")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per model call (same-size photos share a call)")
    p.add_argument("--filter", choices=("none", "clip"), default="none",
                   help="clip: edit each photo --candidates times and keep the edit InstructPix2Pix's CLIP filter "
                        "ranks best (directional and image-image CLIP similarity); scores go to pairs.jsonl")
    p.add_argument("--candidates", type=int, default=None,
                   help=f"with --filter clip: edits generated per pair (default {DEFAULT_CANDIDATES})")
    p.add_argument("--filter-clip", default="openai/clip-vit-base-patch32",
                   help="with --filter clip: the CLIP model (hub id or local folder)")
    p.add_argument("--skip-unreadable", action="store_true", help="skip and list unreadable photos instead of stopping")
    p.add_argument("--force", action="store_true", help="write into a folder holding other files (left untouched)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    train = args.mode == "train"
    allowed = {"subject_dir": train, "source_dir": train, "samples_per_image": train, "vary_template": train,
               "reg_source_dir": not train, "reg_class_dir": not train, "reg_source_pairs": not train,
               "num_pairs": not train}
    stray = [f"--{name}" for name, ok in allowed.items() if not ok and getattr(args, name) is not None]
    if stray:
        p.error(f"--mode {args.mode} does not take {', '.join(stray)}")
    if not (args.subject_dir or args.source_dir if train
            else args.reg_source_dir or args.reg_class_dir or args.reg_source_pairs):
        p.error(f"--mode {args.mode} needs " + ("--subject_dir and/or --source_dir" if train else
                                                "--reg_source_dir, --reg_class_dir and/or --reg_source_pairs"))
    if not train and args.num_pairs is not None and not (args.reg_source_dir or args.reg_class_dir):
        p.error("--num_pairs counts the pairs of --reg_source_dir/--reg_class_dir photos; --reg_source_pairs alone "
                "makes one pair per training pair")
    count = "samples_per_image" if train else "num_pairs"
    if getattr(args, count) is None:
        setattr(args, count, 1 if train else 100)
    if getattr(args, count) < 1:
        p.error(f"--{count} must be at least 1, got {getattr(args, count)}")
    args.forward_template = args.forward_template or FORWARD_TEMPLATES[args.mode]
    if args.filter == "none" and args.candidates is not None:
        p.error("--candidates needs --filter clip")
    args.candidates = (args.candidates or DEFAULT_CANDIDATES) if args.filter != "none" else 1
    if args.candidates < 1:
        p.error(f"--candidates must be at least 1, got {args.candidates}")
    if args.paste_back is not None and not 0 < args.paste_back < 1:
        p.error(f"--paste_back must be between 0 and 1 (exclusive), got {args.paste_back}")
    return args


def fill_template(template: str, option: str, words: dict[str, str]) -> str:
    """Format an instruction template with {class} {source} {identifier}; a bad template is a `UsageError`."""
    try:
        return template.format_map(words)
    except (KeyError, IndexError, ValueError) as err:
        problem = f"unknown field {err}" if isinstance(err, KeyError) else str(err)
        raise UsageError(f"{option} {template!r}: {problem}; use {{class}} {{source}} {{identifier}}") from None


def check_words(args: argparse.Namespace) -> dict[str, str]:
    """Validate the words and both templates before anything is read or written; returns the template fields."""
    words = {"class": args.class_word, "source": args.source_word, "identifier": args.identifier}
    for key, word in words.items():
        if not word.strip() or "\n" in word:
            raise UsageError(f"--{key if key == 'identifier' else key + '_word'} {word!r}: give one word")
    if args.mode == "reg" and "{identifier}" in args.forward_template:
        raise UsageError(f"--forward_template {args.forward_template!r}: reg captions take no {{identifier}}")
    fill_template(args.forward_template, "--forward_template", words)
    fill_template(args.reverse_template, "--reverse_template", words)
    for template in args.vary_template or []:
        fill_template(template, "--vary_template", words)
    if args.mode == "train":
        from ldm.modules.encoders.identifier import warn_about_identifier

        warn_about_identifier(args.identifier)
    return words


def find_photos(folder: str, option: str) -> list[Path]:
    """The image files of ``folder`` sorted by name; other entries are logged; no image is a `UsageError`."""
    from ldm.data.transforms import is_image_file

    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"{option} {path}: no such folder")
    entries = sorted(path.iterdir())
    photos = [p for p in entries if p.is_file() and is_image_file(p)]
    ignored = [p.name for p in entries if p not in photos]
    if ignored:
        logger.warning("%s: ignoring %d non-image entries: %s", path, len(ignored), ", ".join(ignored))
    if not photos:
        raise UsageError(f"{option} {path} contains no image files")
    return photos


def collect_photos(args: argparse.Namespace) -> list[Photo]:
    """Train: the subject photos, then the --source_dir photos. Reg: source and class photos alternating, so any
    prefix of pairs mixes both, then the inputs of the --reg_source_pairs training pairs (kind ``pair_input``)."""
    if args.mode == "train":
        return [Photo(kind, p) for kind, folder, option in (("subject", args.subject_dir, "--subject_dir"),
                                                            ("source", args.source_dir, "--source_dir"))
                if folder for p in find_photos(folder, option)]
    found = {kind: [Photo(kind, p) for p in find_photos(folder, option)] if folder else []
             for kind, folder, option in (("source", args.reg_source_dir, "--reg_source_dir"),
                                          ("class", args.reg_class_dir, "--reg_class_dir"))}
    sources, classes = found["source"], found["class"]
    photos = [p for pair in zip(sources, classes) for p in pair] + sources[len(classes):] + classes[len(sources):]
    if args.reg_source_pairs:
        from ldm.data.personalized_edit import find_pairs

        photos += [Photo("pair_input", pair.input) for pair in find_pairs(args.reg_source_pairs)]
    return photos


def schedule(args: argparse.Namespace, photos: list[Photo]) -> list[Photo]:
    """The photo of each pair group: train, every photo ``--samples_per_image`` times; reg, ``--num_pairs`` groups
    cycling the folders' photos, then each training input of --reg_source_pairs once."""
    if args.mode == "train":
        return photos * args.samples_per_image
    real = [p for p in photos if p.kind != "pair_input"]
    return [real[g % len(real)] for g in range(args.num_pairs if real else 0)] + [
        p for p in photos if p.kind == "pair_input"]


def load_photos(photos: list[Photo], resolution: int, skip_unreadable: bool) -> tuple[list[Photo], dict[Path, Any]]:
    """Read, hash and fit every photo; returns the readable photos (with sha256) and their fitted images.

    Unreadable photos raise one `UsageError` naming all of them, or with ``skip_unreadable`` are dropped and listed.
    """
    from ldm.data.transforms import ImageLoadError, load_for_edit

    readable, images, bad = [], {}, []
    for photo in photos:
        try:
            images[photo.path] = load_for_edit(photo.path, resolution)
            readable.append(Photo(photo.kind, photo.path, hashlib.sha256(photo.path.read_bytes()).hexdigest()))
        except ImageLoadError as err:
            bad.append(str(err))
    if bad and not skip_unreadable:
        raise UsageError(f"{len(bad)} photo(s) cannot be read (fix or remove them, or pass --skip-unreadable):\n  "
                         + "\n  ".join(bad))
    for message in bad:
        logger.warning("skipped: %s", message)
    if not readable:
        raise UsageError("no readable photo left")
    return readable, images


def plan_pairs(args: argparse.Namespace, words: dict[str, str], groups: list[Photo]) -> list[Pair]:
    """Every pair of the dataset, in index order, from the photos, the seed and the templates alone.

    Group ``g`` (photo ``groups[g]`` of `schedule`, seed from --seed and ``g``) is one pair, or for a generated input
    the plain pair and one variant per --vary_template; without variants group and pair index coincide.
    """
    forward = fill_template(args.forward_template, "--forward_template", words)
    reverse = fill_template(args.reverse_template, "--reverse_template", words)
    follow_ups = [None] + [fill_template(t, "--vary_template", words) for t in args.vary_template or []]
    pairs: list[Pair] = []
    for group, photo in enumerate(groups):
        seed = pair_seed(args.seed, group)
        if photo.kind in ("source", "pair_input"):  # real (or training-input) source photo → generated class image
            kind = "reg_paired" if photo.kind == "pair_input" else f"{args.mode}_source"  # train_/reg_source
            pairs.append(Pair(len(pairs), photo, seed, kind, forward, forward, "target"))
        else:  # generated source image (input), and its variants ← real subject / class photo (target)
            kind = "train" if args.mode == "train" else "reg_class"
            for variant, follow_up in enumerate(follow_ups):
                pairs.append(Pair(len(pairs), photo, seed, kind, reverse, forward, "input", follow_up,
                                  follow_up_seed(seed, variant) if follow_up else None))
    return pairs


def checkpoint_identity(path: Path, before: dict | None, quiet: bool) -> dict:
    """Name and sha256 of a (multi-GB) checkpoint, streamed with a progress bar; it must match ``before`` (the
    folder's record), whose hash is reused when path, size and mtime are unchanged."""
    from tqdm import tqdm

    stat = path.stat()
    identity = {"name": path.name, "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if before and all(before.get(k) == identity[k] for k in ("path", "size", "mtime_ns")):
        return {**identity, "sha256": before["sha256"]}
    logger.info("hashing %s (once per output folder; recorded in %s)", path, SETTINGS)
    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(total=stat.st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                          disable=quiet) as bar:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    identity["sha256"] = digest.hexdigest()
    if before and before["sha256"] != identity["sha256"]:
        raise UsageError(f"the output folder was generated with checkpoint {before['name']} (sha256 "
                         f"{before['sha256'][:12]}…), not {path} (sha256 {identity['sha256'][:12]}…); "
                         "use a new --output folder")
    return identity


def run(args: argparse.Namespace, on_commit: Callable[[int], None] | None = None) -> int:
    """Plan the dataset, repair and check the output folder, and generate what is missing.

    ``on_commit``: called before each commit of the output folder (`ldm.data.pair_store.PairStore`; tests).
    """
    from ldm.editing import require_model_files

    words = check_words(args)
    photos, images = load_photos(collect_photos(args), args.resolution, args.skip_unreadable)
    config, ckpt = Path(args.config), Path(args.ckpt)
    if not (Path(args.output) / SETTINGS).is_file():  # a new folder: fail before creating anything
        require_model_files(config, ckpt)
    groups = schedule(args, photos)
    total = len(groups) * (1 + len(args.vary_template or []))  # reg mode has no variants
    recipe = {key: getattr(args, key) for key in RECIPE_KEYS if key not in ("photos", "filter")}
    recipe["photos"] = [[p.kind, p.path.name, p.sha256] for p in photos]
    if args.vary_template:  # only when given: folders made before the option resume as before
        recipe["vary_template"] = args.vary_template
    if args.paste_back is not None:
        recipe["paste_back"] = args.paste_back
    recipe["filter"] = None if args.filter == "none" else {"method": args.filter, "candidates": args.candidates,
                                                          "clip": args.filter_clip}
    folder = PairStore(args.output, on_commit)
    try:
        folder.open(args.force, sorted({p.path.parent for p in photos}))
        folder.check_recipe(recipe)
        folder.width = folder.settings["index_width"] if folder.settings else max(3, len(str(total - 1)))
        if total > 10**folder.width:
            raise UsageError(f"{total} pairs do not fit the {folder.width}-digit names of {folder.path}; "
                             "use a new --output folder")
        plan = plan_pairs(args, words, groups)
        done = folder.recover(plan)
        pending = [pair for pair in plan if pair.index not in done]
        logger.info("%s: %d pairs planned, %d there, %d to generate", folder.path, total, len(done), len(pending))
        if pending or ckpt.is_file():  # a finished folder needs no checkpoint, but a given one must be the same
            require_model_files(config, ckpt)
            identity = checkpoint_identity(ckpt, folder.settings and folder.settings["checkpoint"], args.quiet)
        if pending:
            folder.write_settings({"format": SETTINGS_FORMAT, "recipe": recipe, "checkpoint": identity,
                                   "index_width": folder.width, "pairs_planned": total})
            generate_pending(args, folder, pending, images, words, identity)
    finally:
        folder.close()
    print(f"{folder.path}: {total} pairs ({len(pending)} new, {len(done)} already there)")
    return 0


def generate_pending(args: argparse.Namespace, folder: PairStore, pending: list[Pair], images: dict[Path, Any],
                     words: dict[str, str], identity: dict) -> None:
    """Load the model and generate the pending pairs."""
    from ldm.editing import compile_unet, load_model, resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    selector = None
    if args.filter == "clip":  # before the (slow) model load, so a missing CLIP fails fast
        from ldm.evaluation.filtering import ClipPairFilter
        from ldm.evaluation.models import load_clip

        selector = ClipPairFilter(load_clip(args.filter_clip, device, "--filter-clip"))
    loaded = load_model(args.config, args.ckpt, ema=args.ema, device=device, tokenizer=args.tokenizer)
    if args.compile:
        compile_unet(loaded.model)
    record_base = {
        "mode": args.mode, "class_word": args.class_word, "source_word": args.source_word,
        "identifier": args.identifier, "reverse_instruction": fill_template(args.reverse_template, "", words),
        "cfg_text": args.cfg_text, "cfg_image": args.cfg_image, "steps": args.steps, "sampler": args.sampler,
        "resolution": args.resolution, "checkpoint": identity["name"], "checkpoint_sha256": identity["sha256"],
        "ema": loaded.used_ema, "precision": precision, "device": device.type,
    }
    if args.paste_back is not None:
        record_base["paste_back"] = args.paste_back
    generate(loaded.model, pending, images, folder, record_base, args.batch_size, args.quiet, selector, args.candidates)


def main(argv: list[str] | None = None, on_commit: Callable[[int], None] | None = None) -> int:
    return run_cli(functools.partial(run, on_commit=on_commit), parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
