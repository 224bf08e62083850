"""InstructPix2Pix's CLIP filter for generated pairs: keep the candidate whose change best follows the captions.

For a pair (before image x0 with caption t0, after image x1 with caption t1) and CLIP's normalized embeddings E:

- ``clip_sim_0`` = cos(E(x0), E(t0)), ``clip_sim_1`` = cos(E(x1), E(t1)): each image shows its caption;
- ``clip_sim_dir`` = cos(E(x1) − E(x0), E(t1) − E(t0)): the change between the images is the change in the text;
- ``clip_sim_image`` = cos(E(x0), E(x1)): the two images stay alike.

InstructPix2Pix (``dataset_creation/generate_img_dataset.py``) keeps the samples with ``clip_sim_0``, ``clip_sim_1``
and ``clip_sim_dir`` ≥ 0.2 and ``clip_sim_image`` ≥ 0.7, best ``clip_sim_dir`` first. A personalization dataset needs
a pair for every photo, so when no candidate passes, the best ``clip_sim_dir`` is kept and marked as failing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch.nn.functional as F
from PIL import Image

from ldm.evaluation.models import ClipEncoder


@dataclass(frozen=True)
class FilterThresholds:
    """InstructPix2Pix's defaults (``--clip-threshold``, ``--clip-dir-threshold``, ``--clip-img-threshold``)."""

    text: float = 0.2
    direction: float = 0.2
    image: float = 0.7

    def passes(self, scores: dict[str, float]) -> bool:
        return (scores["clip_sim_0"] >= self.text and scores["clip_sim_1"] >= self.text
                and scores["clip_sim_dir"] >= self.direction and scores["clip_sim_image"] >= self.image)


def pair_scores(clip: ClipEncoder, befores: Sequence[Image.Image], afters: Sequence[Image.Image], caption_0: str,
                caption_1: str) -> list[dict[str, float]]:
    """The four CLIP scores of each (before, after) pair under the captions ``caption_0`` → ``caption_1``."""
    if len(befores) != len(afters):
        raise ValueError(f"{len(befores)} before images for {len(afters)} after images")
    x0 = F.normalize(clip.embed_images(list(befores)), dim=-1)  # (N, P)
    x1 = F.normalize(clip.embed_images(list(afters)), dim=-1)
    t0, t1 = F.normalize(clip.embed_texts([caption_0, caption_1]), dim=-1)  # (P,) each
    scores = {
        "clip_sim_0": x0 @ t0,
        "clip_sim_1": x1 @ t1,
        "clip_sim_dir": F.cosine_similarity(x1 - x0, (t1 - t0)[None], dim=-1),
        "clip_sim_image": F.cosine_similarity(x0, x1, dim=-1),
    }
    return [{name: float(values[i]) for name, values in scores.items()} for i in range(len(befores))]


def choose(scores: Sequence[dict[str, float]], thresholds: FilterThresholds = FilterThresholds()) -> tuple[int, bool]:
    """Index of the candidate to keep (best ``clip_sim_dir`` among those passing, else overall) and whether it passes."""
    if not scores:
        raise ValueError("no candidate to choose from")
    passing = [i for i, s in enumerate(scores) if thresholds.passes(s)]
    pool = passing or list(range(len(scores)))
    best = max(pool, key=lambda i: scores[i]["clip_sim_dir"])
    return best, bool(passing)


class ClipPairFilter:
    """Scores the candidates of one pair and picks one (`choose`); captions are ``a photo of a <word>``."""

    def __init__(self, clip: ClipEncoder, thresholds: FilterThresholds = FilterThresholds()) -> None:
        self.clip, self.thresholds = clip, thresholds

    def select(self, befores: Sequence[Image.Image], afters: Sequence[Image.Image], before_word: str,
               after_word: str) -> tuple[int, dict[str, Any]]:
        """(chosen index, the record of the choice: captions, every candidate's scores, whether it passed)."""
        captions = (f"a photo of a {before_word}", f"a photo of a {after_word}")
        scores = pair_scores(self.clip, befores, afters, *captions)
        index, passed = choose(scores, self.thresholds)
        return index, {"method": "clip", "model": self.clip.source, "captions": list(captions),
                       "thresholds": asdict(self.thresholds), "candidates": scores, "chosen": index, "passed": passed}
