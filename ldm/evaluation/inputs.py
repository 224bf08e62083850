"""Find what an evaluation compares: edited images, their sources, masks or boxes, prompts (PNG metadata).

``scripts/edit_cli.py`` writes its settings as JSON in a PNG text chunk named ``instruct2dream``: ``edit`` (the
instruction), ``input`` (the source's file name), ``resolution``, ``ckpt``, ``seed``, ... An edit is matched to its
source by that ``input`` name, else by file stem; a mask by the edit's stem, else the source's; a box (JSON
``{name: [left, top, right, bottom]}`` in the edit's pixels) by the edit's file name or stem, else the source's.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.transforms import ImageLoadError, load_for_edit, load_image
from ldm.errors import MissingFileError, UsageError
from ldm.evaluation.metrics import target_caption
from ldm.evaluation.preprocessing import box_mask
from ldm.evaluation.scoring import EditSample
from ldm.image_io import find_images, read_metadata

logger = logging.getLogger(__name__)

_STEP = re.compile(r"(\d+)(?!.*\d)")  # the last integer of a label or file name


def parse_run(spec: str) -> tuple[str, str]:
    """``LABEL=PATH`` or ``PATH`` (label: the folder's name) → (label, path)."""
    label, sep, path = spec.partition("=")
    if sep and label and not Path(spec).exists():
        return label, path
    return Path(spec.rstrip("/")).name or spec, spec


def step_of(label: str, metadata: dict[str, Any]) -> int | None:
    """The training step of a run: the last integer of its label, else of the edits' checkpoint name."""
    for text in (label, str(metadata.get("ckpt", ""))):
        match = _STEP.search(text)
        if match:
            return int(match.group(1))
    return None


@dataclass
class EditRecord:
    """One edited image and where its comparison inputs come from (nothing loaded yet)."""

    run: str
    path: Path
    metadata: dict[str, Any]
    instruction: str | None
    caption: str
    source: Path | None = None
    mask: Path | None = None
    box: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def region(self) -> str:
        return "mask" if self.mask is not None else "box" if self.box is not None else "whole"


def _index_by_stem(paths: list[Path]) -> dict[str, Path]:
    return {p.stem: p for p in paths}


def read_boxes(path: str | None) -> dict[str, list[float]]:
    """``{name: [left, top, right, bottom]}`` from a JSON file (pixels of the edited image)."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"--boxes {path}: no such file")
    try:
        data = json.loads(file.read_text())
    except ValueError as err:
        raise UsageError(f"--boxes {path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--boxes {path}: expected a JSON object {{name: [left, top, right, bottom]}}")
    bad = [key for key, box in data.items()
           if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box))]
    if bad:
        raise UsageError(f"--boxes {path}: expected {{name: [left, top, right, bottom]}}, bad entries: {bad[:5]}")
    return data


def collect_run(label: str, spec: str, sources: str | None, masks: str | None, boxes: dict[str, list[float]],
                prompt: str | None, caption: str | None, identifier: str | None) -> list[EditRecord]:
    """The edits of one run with their sources, masks or boxes, instruction and target caption."""
    source_index = _index_by_stem(find_images(sources, "--sources")) if sources else {}
    source_names = {p.name: p for p in source_index.values()}
    mask_index = _index_by_stem(find_images(masks, "--masks")) if masks else {}
    records = []
    for path in find_images(spec, "--edits"):
        metadata = read_metadata(path)
        if isinstance(metadata.get("cfg_text"), list):  # an edit_cli sweep grid, not an edit
            logger.info("%s: a guidance-sweep grid, skipped", path)
            continue
        instruction = metadata.get("edit") or prompt
        if caption is None and instruction is None:
            raise UsageError(f"{path}: no instruction in its metadata; pass --prompt (the instruction) or --caption")
        record = EditRecord(label, path, metadata, instruction,
                            caption if caption is not None else target_caption(instruction, identifier))
        input_name = metadata.get("input")
        if input_name in source_names:
            record.source = source_names[input_name]
        elif input_name and Path(input_name).stem in source_index:
            record.source = source_index[Path(input_name).stem]
        else:
            record.source = source_index.get(path.stem)
        stems = [path.stem] + ([record.source.stem] if record.source else [])
        record.mask = next((mask_index[s] for s in stems if s in mask_index), None)
        names = [path.name, path.stem] + ([record.source.name, record.source.stem] if record.source else [])
        record.box = next((boxes[n] for n in names if n in boxes), None) if record.mask is None else None
        if sources and record.source is None:
            record.notes.append("no source")
        records.append(record)
    return records


def load_references(spec: str) -> list[Image.Image]:
    """The subject's reference photos (EXIF-oriented RGB)."""
    photos = []
    for path in find_images(spec, "--references"):
        try:
            photos.append(load_image(path))
        except ImageLoadError as err:
            raise UsageError(str(err)) from None
    return photos


def _fit_source(record: EditRecord, edited: Image.Image) -> Image.Image:
    """The source as the editor saw it: edit_cli's size rule at the recorded resolution, else resized to the edit."""
    source = load_image(record.source)
    if source.size == edited.size:
        return source
    resolution = record.metadata.get("resolution")
    if isinstance(resolution, int):
        fitted = load_for_edit(record.source, resolution)
        if fitted.size == edited.size:
            return fitted
    record.notes.append(f"source resized {source.size[0]}x{source.size[1]}→{edited.size[0]}x{edited.size[1]}")
    return source.resize(edited.size, Image.Resampling.BICUBIC)


def load_sample(record: EditRecord) -> EditSample:
    """Read the images of a record; the mask (white = subject) is resized to the edit with nearest neighbours."""
    try:
        edited = load_image(record.path)
        source = _fit_source(record, edited) if record.source is not None else None
        mask = None
        if record.mask is not None:
            mask_image = Image.open(record.mask).convert("L")
            if mask_image.size != edited.size:
                mask_image = mask_image.resize(edited.size, Image.Resampling.NEAREST)
            mask = np.asarray(mask_image) > 127
        elif record.box is not None:
            mask = box_mask(record.box, *edited.size)
    except ImageLoadError as err:
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{record.path}: {err}") from None
    if mask is not None and not mask.any():
        record.notes.append("empty mask")
        mask = None
    return EditSample(edited, record.caption, source, mask)
