"""DreamBooth-style editing pairs (seed spec §4): ``NN_0`` (input, before) → ``NN_1`` (target, after) files, or a
``pairs.jsonl`` manifest written by the pair generator.

Every problem with a folder (missing partner, unreadable, empty or too-small image, bad manifest line) is found
when the dataset is built and reported in one error, each line naming the file, so a run never crashes mid-way.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from ldm.data.transforms import ImageLoadError, PairWindow, is_image_file, load_pair, probe_image, resampling
from ldm.errors import UserError
from ldm.util import report_legacy_param

logger = logging.getLogger(__name__)

MANIFEST_NAME = "pairs.jsonl"
TRAIN_TEMPLATE = "replace the {source} with a {identifier} {class}"
REG_TEMPLATE = "replace the {source} with a {class}"
MANIFEST_KEYS = ("input", "target", "instruction")

_PAIR_STEM = re.compile(r"^(?P<prefix>.+)_(?P<side>[01])$")
# Textual-Inversion leftovers the seed accepted but never used: accepted here too, and reported once if set.
_LEGACY_DEFAULTS: dict[str, Any] = {"per_image_tokens": False, "mixing_prob": 0.25, "coarse_class_text": None}


class DatasetError(UserError, ValueError):
    """Everything wrong with a dataset folder, found at construction; each problem names its file."""

    def __init__(self, data_root: str | os.PathLike[str], problems: list[str]) -> None:
        self.problems = problems
        listing = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"dataset {data_root}: {len(problems)} problem(s)\n{listing}")


@dataclass(frozen=True)
class EditPair:
    """One example on disk: ``input`` (before, becomes ``c_concat``) → ``target`` (after, becomes ``image``)."""

    input: Path
    target: Path
    instruction: str | None = None  # from the manifest; None → the dataset's caption template


def _scan_folder(root: Path) -> tuple[list[EditPair], list[str]]:
    """Pairs ``<prefix>_0.<ext>`` / ``<prefix>_1.<ext>`` (any image extension, sorted by prefix)."""
    problems: list[str] = []
    sides: dict[str, dict[str, list[Path]]] = {}
    for entry in sorted(root.iterdir()):
        # Hidden files (.DS_Store, macOS "._x.jpg" forks), subfolders and non-images are not part of the dataset.
        if entry.name.startswith(".") or not entry.is_file() or not is_image_file(entry):
            continue
        match = _PAIR_STEM.match(entry.stem)
        if match is None:
            problems.append(f"{entry}: not named <prefix>_0.<ext> (input) or <prefix>_1.<ext> (target)")
            continue
        sides.setdefault(match["prefix"], {"0": [], "1": []})[match["side"]].append(entry)
    pairs = []
    for prefix in sorted(sides):
        inputs, targets = sides[prefix]["0"], sides[prefix]["1"]
        for files in (inputs, targets):
            if len(files) > 1:
                problems.append(f"{', '.join(map(str, files))}: several files for the same pair side")
        if not inputs:
            problems.append(f"{targets[0]}: no input partner {prefix}_0.<ext>")
        elif not targets:
            problems.append(f"{inputs[0]}: no target partner {prefix}_1.<ext>")
        elif len(inputs) == len(targets) == 1:
            pairs.append(EditPair(inputs[0], targets[0]))
    return pairs, problems


def _read_manifest(root: Path, manifest: Path) -> tuple[list[EditPair], list[str]]:
    """Pairs from ``pairs.jsonl``: one JSON object per line with input, target (relative to root) and instruction."""
    problems: list[str] = []
    pairs = []
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return [], [f"{manifest}: cannot read manifest: {err}"]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: invalid JSON ({err.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        missing = [key for key in MANIFEST_KEYS if key not in record]
        if missing:
            problems.append(f"{where}: missing key(s) {', '.join(missing)}")
            continue
        bad = [key for key in MANIFEST_KEYS if not isinstance(record[key], str) or not record[key].strip()]
        if bad:
            problems.append(f"{where}: {', '.join(bad)} must be a non-empty string")
            continue
        paths = {key: root / record[key] for key in ("input", "target")}
        absent = [f"{key} file not found: {path}" for key, path in paths.items() if not path.is_file()]
        if absent:
            problems.append(f"{where}: {'; '.join(absent)}")
            continue
        pairs.append(EditPair(paths["input"], paths["target"], record["instruction"].strip()))
    return pairs, problems


def _find(root: Path) -> tuple[list[EditPair], list[str]]:
    """The pairs of a folder, in order (its ``pairs.jsonl`` manifest, else its ``NN_0`` / ``NN_1`` files), and the
    problems found; the image files are not opened."""
    if not root.is_dir():
        return [], [f"{root}: data_root does not exist or is not a folder"]
    manifest = root / MANIFEST_NAME
    pairs, problems = _read_manifest(root, manifest) if manifest.is_file() else _scan_folder(root)
    if not pairs and not problems:
        expected = f"<prefix>_0.<ext> / <prefix>_1.<ext> or {MANIFEST_NAME}"
        problems.append(f"{root}: no image pairs found (expected {expected})")
    return pairs, problems


def find_pairs(data_root: str | os.PathLike[str]) -> list[EditPair]:
    """The pairs of a folder in order, as `PersonalizedBase` reads them; one `DatasetError` lists every problem."""
    pairs, problems = _find(Path(data_root))
    if problems:
        raise DatasetError(data_root, problems)
    return pairs


class PersonalizedBase(Dataset):
    """Input/target editing pairs of one folder (or several) with a DreamBooth caption (seed §4, bugs of §10 fixed).

    Items: ``image`` = target (``NN_1``), ``c_concat`` = input (``NN_0``), both (3, size, size) float32 in
    [-1, 1], and ``caption``. Each pair is resized aspect-preserving (short side → ``size``) and cropped with one
    window and one flip shared by both images (`ldm.data.transforms.pair_crop_boxes`): random window and flip
    with probability ``flip_p`` for ``data_set="train"`` (centre window if ``center_crop``), centre crop without
    flip otherwise. Random draws come from torch's default generator, which a DataLoader seeds per worker, so a
    run is reproducible from its seed.

    ``data_root``: a folder, or a list of folders whose pairs are read one after the other (e.g. the generated
    training pairs and labelled pairs made by another model, each folder with its own manifest).

    Captions: the manifest's ``instruction`` when ``pairs.jsonl`` exists; else ``template`` formatted with
    ``{identifier}``, ``{class}``/``{class_word}`` (= ``placeholder_token``, the seed's ``--class_word``) and
    ``{source}``; default `TRAIN_TEMPLATE`, or `REG_TEMPLATE` when ``reg``.

    ``min_size`` (default ``size // 2``): images whose short side is smaller are rejected, since they would be
    upscaled more than 2×. ``per_image_tokens``, ``mixing_prob`` and ``coarse_class_text`` are accepted for old
    configs and have no effect.
    """

    def __init__(
        self,
        data_root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        size: int = 256,
        repeats: int = 100,
        interpolation: str = "bicubic",
        flip_p: float = 0.5,
        data_set: str = "train",
        placeholder_token: str = "dog",
        per_image_tokens: bool = False,
        center_crop: bool = False,
        mixing_prob: float = 0.25,
        coarse_class_text: str | None = None,
        reg: bool = False,
        identifier: str = "sks",
        source_word: str = "wolf",
        template: str | None = None,
        min_size: int | None = None,
    ) -> None:
        if data_root is None:
            raise ValueError("data_root is not set (main.py sets it from --data_root / --reg_data_root)")
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an integer ≥ 8, got {size!r}")
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must lie in [0, 1], got {flip_p!r}")
        values = {"per_image_tokens": per_image_tokens, "mixing_prob": mixing_prob, "coarse_class_text": coarse_class_text}
        for name, value in values.items():
            report_legacy_param("PersonalizedBase", name, value, "textual-inversion leftover", _LEGACY_DEFAULTS[name])
        self.data_roots = [Path(data_root)] if isinstance(data_root, (str, os.PathLike)) else [
            Path(root) for root in data_root]
        if not self.data_roots:
            raise ValueError("data_root is an empty list of folders")
        twice = sorted({str(root) for root in self.data_roots if self.data_roots.count(root) > 1})
        if twice:
            raise ValueError(f"data_root lists {', '.join(twice)} more than once (its pairs would count twice)")
        self.where = ", ".join(map(str, self.data_roots))
        self.size = size
        self.repeats = repeats
        self.resample = resampling(interpolation)
        self.flip_p = flip_p
        self.data_set = data_set
        self.center_crop = center_crop
        self.reg = reg
        self.identifier = identifier
        self.min_size = size // 2 if min_size is None else int(min_size)
        self.template = template if template is not None else (REG_TEMPLATE if reg else TRAIN_TEMPLATE)
        words = {"identifier": identifier, "class": placeholder_token, "class_word": placeholder_token}
        try:
            self.caption = self.template.format(source=source_word, **words)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"caption template {self.template!r} is invalid ({err!r}); "
                "use the placeholders {identifier}, {class} (or {class_word}) and {source}"
            ) from None
        self.pairs, self._sizes = self._discover()
        self._length = self.num_images * repeats if data_set == "train" else self.num_images
        if not reg and data_set == "train" and any(pair.instruction is not None for pair in self.pairs):
            if not any(identifier in pair.instruction for pair in self.pairs if pair.instruction):
                logger.warning("no manifest instruction in %s mentions the identifier %r", self.where, identifier)
        logger.info(
            "PersonalizedBase: %d pairs in %s (%s%s, %d items); caption: %s",
            self.num_images,
            self.where,
            data_set,
            ", reg" if reg else "",
            self._length,
            caption_source(self.pairs, self.caption),
        )

    @property
    def num_images(self) -> int:
        """Number of distinct pairs (the seed's name)."""
        return len(self.pairs)

    def _discover(self) -> tuple[list[EditPair], dict[Path, tuple[int, int]]]:
        """Find the pairs and check every file once; raise one `DatasetError` listing all problems."""
        pairs: list[EditPair] = []
        problems: list[str] = []
        for root in self.data_roots:
            found, wrong = _find(root)
            pairs += found
            problems += wrong
        files = list(dict.fromkeys(path for pair in pairs for path in (pair.input, pair.target)))
        sizes: dict[Path, tuple[int, int]] = {}
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(files)))) as pool:
            for path, result in zip(files, pool.map(_probe, files)):
                if isinstance(result, str):
                    problems.append(result)
                elif min(result) < self.min_size:
                    problems.append(
                        f"{path}: {result[0]}x{result[1]} is smaller than min_size {self.min_size} (short side)"
                    )
                else:
                    sizes[path] = result
        if problems:
            raise DatasetError(self.where, problems)
        return pairs, sizes

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self._length <= i < self._length:
            raise IndexError(f"index {i} out of range for a dataset of {self._length} items")
        pair = self.pairs[i % self.num_images]
        if self.data_set == "train":
            window = PairWindow.draw(None, self.flip_p, random_crop=not self.center_crop)
        else:
            window = PairWindow()
        sizes = (self._sizes[pair.target], self._sizes[pair.input])
        target, source = load_pair((pair.target, pair.input), sizes, self.size, window, self.resample)
        return {"image": target, "c_concat": source, "caption": pair.instruction or self.caption}


def caption_source(pairs: list[EditPair], caption: str) -> str:
    """Where the captions of ``pairs`` come from, for the log: the manifests, the template ``caption``, or both."""
    listed = sum(pair.instruction is not None for pair in pairs)
    if listed == len(pairs):
        return f"from {MANIFEST_NAME}"
    return repr(caption) if not listed else f"from {MANIFEST_NAME} ({listed} pairs), else {caption!r}"


def _probe(path: Path) -> tuple[int, int] | str:
    """`probe_image`, with a failure returned as its message (so that all files are checked)."""
    try:
        return probe_image(path)
    except ImageLoadError as err:
        return str(err)
