"""Training pairs made by running InstructPix2Pix in reverse: the planned pairs, their seeds, and their batched
generation into a `PairStore` (`scripts/generate_dataset.py`)."""

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
    """A real photo: ``kind`` is subject (train), source or class (reg); ``sha256`` of its bytes once read."""

    kind: str
    path: Path
    sha256: str = ""


@dataclass(frozen=True)
class Pair:
    """One planned pair: which photo is edited with which instruction and seed, and which side is generated."""

    index: int
    photo: Photo
    seed: int
    kind: str  # train | reg_source | reg_class
    edit_instruction: str  # given to InstructPix2Pix
    instruction: str  # the pair's caption (forward direction)
    generated: str  # "input" (NN_0) or "target" (NN_1)


def pair_seed(base: int, index: int) -> int:
    """Seed of pair ``index``: a hash of (base, index), so no pair's noise (seed, ancestral seed+1) is another's."""
    digest = hashlib.sha256(f"instruct2dream:{base}:{index}".encode()).digest()
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
    """
    import torch  # here, not at the top: generate_dataset.py --help stays fast

    from ldm.data.transforms import image_to_tensor, tensor_to_image
    from ldm.editing import decode_to_images, edit_latents, same_size_batches

    device = next(model.parameters()).device
    batches = same_size_batches(pairs, lambda pair: images[pair.photo.path].size, batch_size)
    base = record_base
    with tqdm(total=len(pairs), desc="generating", unit="pair", disable=quiet) as bar:
        for batch in batches:
            jobs = [(pair, candidate_seed(pair.seed, k)) for pair in batch for k in range(candidates)]
            edits = []
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                pixels = torch.stack([image_to_tensor(images[p.photo.path]) for p, _ in chunk]).to(device)  # (B, 3, H, W)
                n = len(chunk)
                latents = edit_latents(model, pixels, [p.edit_instruction for p, _ in chunk], [base["cfg_text"]] * n,
                                       [base["cfg_image"]] * n, [seed for _, seed in chunk], steps=base["steps"],
                                       sampler=base["sampler"], precision=base["precision"])  # (B, 4, H/8, W/8)
                edits += [tensor_to_image(x) for x in decode_to_images(model, latents, base["precision"])]
            for number, pair in enumerate(batch):
                real, made = images[pair.photo.path], edits[number * candidates]
                if made.size != real.size:
                    raise ValueError(f"the edit of {pair.photo.path} is {made.size}, the photo {real.size}")
                extra = {}
                if selector is not None:
                    made, extra["filter"] = select_edit(selector, pair, real,
                                                        edits[number * candidates : (number + 1) * candidates], base)
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
