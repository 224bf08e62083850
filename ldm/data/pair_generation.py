"""Training pairs made by running InstructPix2Pix in reverse: the planned pairs, their seeds, and their batched
generation into a `PairStore` (`scripts/generate_dataset.py`).

A pair whose input is generated can carry a *follow-up* edit ("make the wolf white") applied to the reverse edit:
the variants of one photo and seed share the reverse edit and its real target, and differ in the input's look.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ldm.data.pair_store import PairStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Photo:
    """A real photo: ``kind`` is subject or source (train), source, class or pair_input (reg); ``sha256`` of its bytes
    once read."""

    kind: str
    path: Path
    sha256: str = ""


@dataclass(frozen=True)
class Pair:
    """One planned pair: which photo is edited with which instruction and seed, and which side is generated."""

    index: int
    photo: Photo
    seed: int
    kind: str  # train | train_source | reg_source | reg_class | reg_paired
    edit_instruction: str  # given to InstructPix2Pix
    instruction: str  # the pair's caption (forward direction)
    generated: str  # "input" (NN_0) or "target" (NN_1)
    follow_up: str | None = None  # a second edit of the generated input (its variant), given to InstructPix2Pix
    follow_up_seed: int | None = None


def pair_seed(base: int, index: int) -> int:
    """Seed of pair ``index``: a hash of (base, index), so no pair's noise (seed, ancestral seed+1) is another's."""
    digest = hashlib.sha256(f"instruct2dream:{base}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def follow_up_seed(seed: int, variant: int) -> int:
    """Seed of the follow-up edit of variant ``variant`` (1, 2, …) of the pair group seeded ``seed``."""
    digest = hashlib.sha256(f"instruct2dream:follow-up:{seed}:{variant}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def candidate_seed(seed: int, candidate: int) -> int:
    """Seed of a pair's ``candidate``-th edit under --filter: the pair's own seed first, then derived ones."""
    return seed if candidate == 0 else pair_seed(seed, candidate)


def generate(model: Any, pairs: list[Pair], images: dict[Path, Image.Image], folder: PairStore, record_base: dict,
             batch_size: int, quiet: bool = False, selector: Any = None, candidates: int = 1) -> int:
    """Edit the photos of ``pairs`` (same-size photos share a batch) and commit each pair; returns the count.

    ``record_base``: the manifest fields shared by every pair, sampling settings included (steps, sampler,
    precision, cfg_text, cfg_image). With a ``selector`` (`ldm.evaluation.filtering.ClipPairFilter`) each pair is
    edited ``candidates`` times (seeds `candidate_seed`) and the selected edit is kept; its record gets ``filter``.
    A pair with a ``follow_up`` gets it applied to each candidate (after the reverse edit, which its group shares).
    With ``record_base["paste_back"]`` the kept edit is composited onto its real photo (`paste_back.paste_back`).
    """
    from ldm.data.paste_back import paste_back  # here: torch stays out of generate_dataset.py --help
    from ldm.editing import same_size_batches

    batches = same_size_batches(pairs, lambda pair: images[pair.photo.path].size, batch_size)
    first_edits: dict[tuple[Path, int, str], Image.Image] = {}  # shared by the variants of a pair group
    base = record_base
    with tqdm(total=len(pairs), desc="generating", unit="pair", disable=quiet) as bar:
        for batch in batches:
            jobs = [(pair, k) for pair in batch for k in range(candidates)]
            keys = [(pair.photo.path, candidate_seed(pair.seed, k), pair.edit_instruction) for pair, k in jobs]
            todo = list(dict.fromkeys(key for key in keys if key not in first_edits))
            reverse_edits = edit_images(model, [images[path] for path, _, _ in todo],
                                        [text for _, _, text in todo], [seed for _, seed, _ in todo], base, batch_size)
            first_edits.update(zip(todo, reverse_edits))
            edits = [first_edits[key] for key in keys]
            follow = [number for number, (pair, _) in enumerate(jobs) if pair.follow_up]
            if follow:
                varied = edit_images(model, [edits[n] for n in follow], [jobs[n][0].follow_up for n in follow],
                                     [candidate_seed(jobs[n][0].follow_up_seed, jobs[n][1]) for n in follow], base,
                                     batch_size)
                for number, image in zip(follow, varied):
                    edits[number] = image
            first_edits = {key: first_edits[key] for key in keys}  # a group may go on in the next batch
            for number, pair in enumerate(batch):
                real, made = images[pair.photo.path], edits[number * candidates]
                if made.size != real.size:
                    raise ValueError(f"the edit of {pair.photo.path} is {made.size}, the photo {real.size}")
                extra = {"follow_up_instruction": pair.follow_up, "follow_up_seed": pair.follow_up_seed} \
                    if pair.follow_up else {}
                if selector is not None:
                    made, extra["filter"] = select_edit(selector, pair, real,
                                                        edits[number * candidates : (number + 1) * candidates], base)
                if base.get("paste_back") is not None:
                    made = paste_back(made, real, base["paste_back"])
                names = folder.pair_names(pair.index)
                record = {
                    **base, "index": pair.index, "input": names[0], "target": names[1],
                    "instruction": pair.instruction, "edit_instruction": pair.edit_instruction,
                    "generated": pair.generated, "kind": pair.kind, "seed": pair.seed, "width": real.width,
                    "height": real.height, "source_photo": str(pair.photo.path.resolve()),
                    "source_name": pair.photo.path.name, "source_sha256": pair.photo.sha256, **extra,
                }
                sides = (made, real) if pair.generated == "input" else (real, made)
                for role, image, name in zip(("input", "target"), sides, names):
                    folder.write_image(image, name, {**record, "role": role})
                folder.append_record(record)
                bar.update(1)
    return len(pairs)


def edit_images(model: Any, images: list[Image.Image], instructions: list[str], seeds: list[int], base: dict,
                batch_size: int) -> list[Image.Image]:
    """InstructPix2Pix edits of same-size ``images`` (one instruction and seed each), ``batch_size`` per call."""
    import torch  # here, not at the top: generate_dataset.py --help stays fast

    from ldm.data.transforms import image_to_tensor, tensor_to_image
    from ldm.editing import decode_to_images, edit_latents

    device = next(model.parameters()).device
    edits = []
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        pixels = torch.stack([image_to_tensor(image) for image in images[chunk]]).to(device)  # (B, 3, H, W)
        n = pixels.shape[0]
        latents = edit_latents(model, pixels, instructions[chunk], [base["cfg_text"]] * n, [base["cfg_image"]] * n,
                               seeds[chunk], steps=base["steps"], sampler=base["sampler"],
                               precision=base["precision"])  # (B, C, h, w)
        edits += [tensor_to_image(x) for x in decode_to_images(model, latents, base["precision"])]
    return edits


def select_edit(selector: Any, pair: Pair, real: Image.Image, edits: list[Image.Image], base: dict
                ) -> tuple[Image.Image, dict]:
    """The edit the CLIP filter keeps among a pair's candidates, and the filter's record (scores, chosen seed)."""
    befores, afters = ([edits, [real] * len(edits)] if pair.generated == "input" else [[real] * len(edits), edits])
    index, record = selector.select(befores, afters, base["source_word"], base["class_word"])
    record["chosen_seed"] = candidate_seed(pair.seed, index)
    if not record["passed"]:
        logger.warning("pair %d: no candidate passes the CLIP filter; keeping the best (clip_sim_dir %.3f)",
                       pair.index, record["candidates"][index]["clip_sim_dir"])
    return edits[index], record
