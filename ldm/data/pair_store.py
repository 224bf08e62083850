"""The crash-safe folder of generated training pairs (`scripts/generate_dataset.py`'s output).

Our files: ``NNN_0.png`` (input), ``NNN_1.png`` (target), ``pairs.jsonl`` (one JSON record per pair) and
``generate_dataset.json`` (the settings). Every image is written to a temporary file, fsynced and renamed; a
manifest line is appended, in one write, only once its images are durable. `PairStore.recover` repairs a folder
after a crash at any point (torn or dangling lines, orphan images, temporary files).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from ldm.errors import UsageError
from ldm.fileio import atomic_path
from ldm.image_io import write_png

logger = logging.getLogger(__name__)

MANIFEST = "pairs.jsonl"
SETTINGS = "generate_dataset.json"
SETTINGS_FORMAT = 1
PAIR_FILE = re.compile(r"^\d+_[01]\.png$")
TEMP_FILE = re.compile(r"^\.(\d+_[01]\.png|pairs\.jsonl|generate_dataset\.json)\..+\.tmp$")  # from atomic_path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PairStore:
    """The output folder; our files: ``NNN_0/1.png``, the manifest, the settings and our temporary files.

    An exclusive lock is held while the folder is open, so two generators never write to one folder.
    ``on_commit(n)``, if given, is called just before the ``n``-th commit of this run (an image rename or a
    manifest append, counted from 1), with the temporary file written: tests simulate a crash there.
    """

    def __init__(self, path: str | os.PathLike[str], on_commit: Callable[[int], None] | None = None) -> None:
        self.path = Path(path)
        self.settings: dict | None = None
        self.width = 3  # digits of the pair indices, fixed when the folder is created
        self._dir_fd: int | None = None
        self._manifest_fd: int | None = None
        self._commits = 0
        self._on_commit = on_commit

    def open(self, force: bool, photo_dirs: list[Path]) -> None:
        """Create and lock the folder, refuse foreign files (unless ``force``), read the settings."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--output {self.path} exists and is not a folder")
        if any(self.path.resolve() == d.resolve() for d in photo_dirs):
            raise UsageError(f"--output {self.path} is a photo folder; choose another folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another generate_dataset.py is writing to {self.path}") from None
        names = {p.name for p in self.path.iterdir()}
        if SETTINGS in names:
            try:
                self.settings = json.loads((self.path / SETTINGS).read_text())
            except ValueError as err:
                raise UsageError(f"{self.path / SETTINGS}: invalid JSON ({err}); delete the folder") from None
            if self.settings.get("format") != SETTINGS_FORMAT:
                raise UsageError(f"{self.path / SETTINGS}: unknown format {self.settings.get('format')!r}")
            if not (MANIFEST in names and (self.path / MANIFEST).stat().st_size):
                logger.info("%s holds no pair yet: starting afresh", self.path)
                self.settings = None  # nothing was made with these settings: new ones may replace them
            ours = {n for n in names if n in (SETTINGS, MANIFEST) or PAIR_FILE.match(n) or TEMP_FILE.match(n)}
        else:
            clashing = sorted(n for n in names if n == MANIFEST or PAIR_FILE.match(n))
            if clashing:  # never adopt someone else's pairs (a later run would delete them as orphans)
                shown = ", ".join(clashing[:5]) + (" …" if len(clashing) > 5 else "")
                raise UsageError(f"--output {self.path} holds pair files not made by this script ({shown}); "
                                 "choose a new folder")
            ours = {n for n in names if TEMP_FILE.match(n)}
        foreign = sorted(names - ours)
        if foreign and not force:
            raise UsageError(f"--output {self.path} holds {len(foreign)} file(s) that are not ours "
                             f"({', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}); choose an empty or new "
                             "folder, or pass --force to write beside them")
        if foreign:
            logger.warning("--force: leaving %d foreign file(s) in %s untouched", len(foreign), self.path)

    def check_recipe(self, recipe: dict) -> None:
        """Refuse a rerun whose settings differ from the folder's, naming every difference."""
        before = self.settings["recipe"] if self.settings else recipe
        diffs = []
        keys = [*recipe, *(k for k in before if k not in recipe)]  # a setting only one side has differs too
        for key in (k for k in keys if before.get(k) != recipe.get(k)):
            if key == "photos":  # [kind, name, sha256] each
                old, new = ({f"{k}/{n}" for k, n, _ in photos} for photos in (before.get(key, []), recipe[key]))
                changed = sorted(old ^ new) or ["same names, other content or order"]
                diffs.append(f"photos differ: {', '.join(changed[:5])}{' …' if len(changed) > 5 else ''}")
            else:
                diffs.append(f"{key}: {before.get(key)!r} in the folder, {recipe.get(key)!r} now")
        if diffs:
            raise UsageError(f"--output {self.path} was generated with other settings:\n  " + "\n  ".join(diffs)
                             + "\nUse a new --output folder (or delete this one to start over).")

    def write_settings(self, settings: dict) -> None:
        """Write the settings file atomically and durably."""
        with atomic_path(self.path / SETTINGS) as tmp:
            tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            _fsync(tmp)
        self.settings = settings

    def recover(self, plan: Sequence[Any]) -> dict[int, dict]:
        """Repair after a crash and return the valid records by pair index.

        Drops a torn last manifest line and lines whose images are missing, deletes our temporary files and the
        images no line refers to. A line that contradicts the plan is an error (the folder is not this dataset).
        ``plan``: the planned pairs in index order (``seed`` and ``photo.path`` each).
        """
        manifest = self.path / MANIFEST
        *lines, tail = (manifest.read_bytes() if manifest.is_file() else b"").split(b"\n")
        dropped = int(bool(tail.strip()))  # no final newline: the last write was torn
        records: dict[int, dict] = {}
        kept: list[bytes] = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                index = int(record["index"])
            except (ValueError, KeyError, TypeError):
                if number < len(lines) or tail:
                    raise UsageError(f"{manifest}: line {number} is not a pair record; delete the folder") from None
                dropped += 1  # a torn last write that happens to end with a newline
                continue
            if index >= len(plan):
                raise UsageError(f"{manifest} holds pair {index} but only {len(plan)} are planned now; raise "
                                 "--num_pairs / --samples_per_image or use a new --output folder")
            names = (record.get("input"), record.get("target"))
            if (record.get("seed"), record.get("source_name"), names) != (
                    plan[index].seed, plan[index].photo.path.name, self.pair_names(index)):
                raise UsageError(f"{manifest}: line {number} (pair {index}) does not match the plan; use a new folder")
            if index in records or not all((self.path / n).is_file() and (self.path / n).stat().st_size for n in names):
                dropped += 1  # a duplicate, or an image lost after its line was written
                continue
            records[index] = record
            kept.append(line + b"\n")
        if dropped:
            logger.warning("%s: dropping %d torn, duplicate or dangling line(s)", manifest, dropped)
            with atomic_path(manifest) as tmp:
                tmp.write_bytes(b"".join(kept))
                _fsync(tmp)
        referenced = {n for r in records.values() for n in (r["input"], r["target"])}
        for entry in sorted(self.path.iterdir()):
            if (PAIR_FILE.match(entry.name) and entry.name not in referenced) or TEMP_FILE.match(entry.name):
                logger.info("removing %s, left by an interrupted run", entry.name)
                entry.unlink()
        return records

    def pair_names(self, index: int) -> tuple[str, str]:
        """File names of pair ``index``: (input, target), zero-padded to the folder's fixed width."""
        return f"{index:0{self.width}d}_0.png", f"{index:0{self.width}d}_1.png"

    def _commit_point(self) -> None:
        """Count commits and tell ``on_commit`` which one comes next."""
        self._commits += 1
        if self._on_commit is not None:
            self._on_commit(self._commits)

    def write_image(self, image: Image.Image, name: str, metadata: dict) -> None:
        """Write a PNG atomically and durably; ``metadata`` goes into its text chunk (`ldm.image_io.write_png`)."""
        with atomic_path(self.path / name) as tmp:
            write_png(image, tmp, metadata)
            _fsync(tmp)
            self._commit_point()

    def append_record(self, record: dict) -> None:
        """Append one manifest line in a single write, once the renames of its images are durable."""
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        os.fsync(self._dir_fd)
        if self._manifest_fd is None:
            self._manifest_fd = os.open(self.path / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._commit_point()
        if os.write(self._manifest_fd, data) != len(data):
            raise OSError(f"short write to {self.path / MANIFEST}")
        os.fsync(self._manifest_fd)

    def close(self) -> None:
        """Close the manifest and release the lock."""
        for fd in (self._manifest_fd, self._dir_fd):
            if fd is not None:
                os.close(fd)
        self._manifest_fd = self._dir_fd = None
