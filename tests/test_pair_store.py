"""ldm.data.pair_store.PairStore: the commit callback, and what a crash at a commit leaves behind."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from ldm.data.pair_store import MANIFEST, SETTINGS, SETTINGS_FORMAT, PairStore
from ldm.image_io import read_metadata


class Crash(Exception):
    pass


def _write_pair(store: PairStore, index: int) -> None:
    names = store.pair_names(index)
    record = {"index": index, "input": names[0], "target": names[1], "seed": index, "source_name": "photo.png"}
    for role, name in zip(("input", "target"), names):
        store.write_image(Image.new("RGB", (8, 8), (index, 0, 0)), name, {**record, "role": role})
    store.append_record(record)


def test_on_commit_is_called_before_each_commit_in_order(tmp_path: Path) -> None:
    seen: list[tuple[int, set[str]]] = []
    store = PairStore(tmp_path / "out", on_commit=lambda n: seen.append((n, {p.name for p in store.path.iterdir()})))
    store.open(force=False, photo_dirs=[])
    try:
        _write_pair(store, 0)
    finally:
        store.close()
    assert [n for n, _ in seen] == [1, 2, 3]
    assert "000_0.png" not in seen[0][1] and "000_0.png" in seen[1][1]  # called before the rename
    assert "000_1.png" in seen[2][1]
    assert read_metadata(store.path / "000_1.png")["role"] == "target"


def test_a_crash_at_a_commit_is_repaired_by_recover(tmp_path: Path) -> None:
    def crash(n: int) -> None:
        if n == 5:  # the second pair's target
            raise Crash

    store = PairStore(tmp_path / "out", on_commit=crash)
    store.open(force=False, photo_dirs=[])
    store.write_settings({"format": SETTINGS_FORMAT})
    with pytest.raises(Crash):
        _write_pair(store, 0)
        _write_pair(store, 1)
    store.close()
    assert {p.name for p in store.path.iterdir()} == {"000_0.png", "000_1.png", "001_0.png", MANIFEST, SETTINGS}

    plan = [SimpleNamespace(seed=i, photo=SimpleNamespace(path=Path("photo.png"))) for i in range(2)]
    again = PairStore(store.path)
    again.open(force=False, photo_dirs=[])
    try:
        assert set(again.recover(plan)) == {0}
    finally:
        again.close()
    assert {p.name for p in store.path.iterdir()} == {"000_0.png", "000_1.png", MANIFEST, SETTINGS}
