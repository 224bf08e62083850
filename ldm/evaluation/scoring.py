"""Score edits: subject fidelity (DINO, CLIP-I), text alignment (CLIP-T) and background preservation.

- ``dino_subject`` / ``clip_i_subject``: cosine similarity between the edited subject region (the bounding box of
  the mask or box, else the whole image) and each reference photo of the subject, averaged over the references
  (DreamBooth's DINO and CLIP-I).
- ``clip_t``: cosine similarity between the whole edited image and its target caption (`target_caption`).
- ``bg_l1`` / ``bg_psnr`` / ``bg_ssim``: edited image vs source image on the pixels outside the mask
  (`ldm.evaluation.metrics`); ``bg_dino`` / ``bg_clip_i``: the embeddings of both images with the mask blacked out
  (DreamEditBench's background similarity). Background metrics need a source and a mask or box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ldm.evaluation.metrics import masked_l1, masked_psnr, masked_ssim, mean_similarity
from ldm.evaluation.models import ClipEncoder, DinoEncoder
from ldm.evaluation.preprocessing import blank_region, crop_region, to_unit_array

SUBJECT_METRICS = ("dino_subject", "clip_i_subject")
TEXT_METRICS = ("clip_t",)
BACKGROUND_METRICS = ("bg_l1", "bg_psnr", "bg_ssim", "bg_dino", "bg_clip_i")
METRICS = SUBJECT_METRICS + TEXT_METRICS + BACKGROUND_METRICS
HIGHER_IS_BETTER = {name: name != "bg_l1" for name in METRICS}


@dataclass
class EditSample:
    """One edited image with what it is compared to. ``mask``: (H, W) bool, True on the subject / edited region."""

    edited: Image.Image
    caption: str
    source: Image.Image | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        size = self.edited.size
        if self.source is not None and self.source.size != size:
            raise ValueError(f"source {self.source.size} and edit {size} differ in size")
        if self.mask is not None and self.mask.shape != (size[1], size[0]):
            raise ValueError(f"mask {self.mask.shape} does not match the edit's {size[1]}x{size[0]} pixels")
        if self.mask is not None and not self.mask.any():
            raise ValueError("empty subject mask")


@dataclass
class References:
    """Embeddings of the subject's reference photos (either may be None when its encoder is absent)."""

    dino: torch.Tensor | None
    clip: torch.Tensor | None
    count: int


class EditScorer:
    """Computes `METRICS` for edits with whichever encoders are given (absent encoder → its metrics are NaN)."""

    def __init__(self, dino: DinoEncoder | None, clip: ClipEncoder | None, batch_size: int = 32) -> None:
        self.dino, self.clip, self.batch_size = dino, clip, batch_size

    def references(self, photos: Sequence[Image.Image]) -> References:
        """Embed the subject's reference photos once."""
        dino = self.dino.embed(list(photos), self.batch_size) if self.dino and photos else None
        clip = self.clip.embed_images(list(photos), self.batch_size) if self.clip and photos else None
        return References(dino, clip, len(photos))

    def score(self, samples: Sequence[EditSample], references: References | None) -> list[dict[str, float]]:
        """One dict of `METRICS` per sample (NaN where a metric does not apply)."""
        rows: list[dict[str, float]] = [{name: math.nan for name in METRICS} for _ in samples]
        if not samples:
            return rows
        subjects = [crop_region(s.edited, s.mask) for s in samples]
        if references is not None and references.count:
            if self.dino is not None and references.dino is not None:
                self._put(rows, "dino_subject", range(len(samples)),
                          mean_similarity(self.dino.embed(subjects, self.batch_size), references.dino))
            if self.clip is not None and references.clip is not None:
                self._put(rows, "clip_i_subject", range(len(samples)),
                          mean_similarity(self.clip.embed_images(subjects, self.batch_size), references.clip))
        if self.clip is not None:
            images = self.clip.embed_images([s.edited for s in samples], self.batch_size)
            texts = self.clip.embed_texts([s.caption for s in samples])
            self._put(rows, "clip_t", range(len(samples)), torch.nn.functional.cosine_similarity(images, texts, dim=-1))
        with_background = [i for i, s in enumerate(samples)
                           if s.source is not None and s.mask is not None and not s.mask.all()]
        for i in with_background:
            sample = samples[i]
            keep = ~sample.mask
            edited, source = to_unit_array(sample.edited), to_unit_array(sample.source)
            rows[i]["bg_l1"] = masked_l1(edited, source, keep)
            rows[i]["bg_psnr"] = masked_psnr(edited, source, keep)
            rows[i]["bg_ssim"] = masked_ssim(edited, source, keep)
        if with_background:
            blanked_edits = [blank_region(samples[i].edited, samples[i].mask) for i in with_background]
            blanked_sources = [blank_region(samples[i].source, samples[i].mask) for i in with_background]
            for name, embed in (("bg_dino", self.dino and self.dino.embed),
                                ("bg_clip_i", self.clip and self.clip.embed_images)):
                if embed:
                    a, b = embed(blanked_edits, self.batch_size), embed(blanked_sources, self.batch_size)
                    self._put(rows, name, with_background, torch.nn.functional.cosine_similarity(a, b, dim=-1))
        return rows

    @staticmethod
    def _put(rows: list[dict[str, float]], name: str, indices: Sequence[int], values: torch.Tensor) -> None:
        for i, value in zip(indices, values.tolist()):
            rows[i][name] = float(value)


def summarize(rows: Sequence[dict[str, float]], names: Sequence[str] = METRICS) -> dict[str, dict[str, float]]:
    """Per metric over the rows where it is defined: count, mean, std (population), median, min, max."""
    summary = {}
    for name in names:
        values = np.array([r[name] for r in rows if name in r and r[name] is not None and not math.isnan(r[name])],
                          dtype=np.float64)
        if values.size == 0:
            continue
        summary[name] = {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
                         "median": float(np.median(values)), "min": float(values.min()), "max": float(values.max())}
    return summary
