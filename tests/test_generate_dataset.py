"""generate_dataset.sh / scripts/generate_dataset.py on a tiny checkpoint: pair layout and alignment, manifest,
crash recovery (SIGKILL mid-write, torn manifest line), resume and growth, refused reruns, and bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.transforms import load_for_edit
from ldm.data.pair_store import MANIFEST, SETTINGS
from scripts.generate_dataset import main
from tests.tiny import REPO, TINY_CONFIG, save_tiny_checkpoint

RESOLUTION = 64
COMMON = ["--config", str(TINY_CONFIG), "--steps", "2", "--resolution", str(RESOLUTION), "--quiet"]
WORDS = ["--class_word", "dog", "--source_word", "wolf"]


def _photo(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    """A smooth random picture (a noise grid upsampled), saved in the format of the file name."""
    rng = np.random.default_rng(seed)
    channels = len(mode)
    grid = Image.fromarray((rng.random((6, 6, channels)) * 255).astype(np.uint8).squeeze(), mode=mode)
    grid.resize(size, Image.Resampling.BICUBIC).save(path)


@pytest.fixture(scope="module", autouse=True)
def _cheap_runs():
    """In-process runs share one loaded model per checkpoint (generation never changes it), and run on one thread:
    on a busy 2-core machine the tiny model is several times faster without OpenMP threads waiting on each other."""
    import torch

    import ldm.editing

    real_load, loaded, threads = ldm.editing.load_model, {}, torch.get_num_threads()

    def load_once(config, ckpt, **kwargs):
        key = (str(config), str(ckpt), repr(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = real_load(config, ckpt, **kwargs)
        return loaded[key]

    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm.editing, "load_model", load_once)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", seed=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Subject photos (three aspect ratios, JPEG/PNG/RGBA), wolf photos and dog photos."""
    root = tmp_path_factory.mktemp("photos")
    folders = {name: root / name for name in ("subject", "wolves", "dogs")}
    for folder in folders.values():
        folder.mkdir()
    _photo(folders["subject"] / "a.jpg", (150, 100), 1)
    _photo(folders["subject"] / "b.png", (90, 160), 2)
    _photo(folders["subject"] / "c.png", (120, 120), 3, mode="RGBA")
    (folders["subject"] / "notes.txt").write_text("not a photo")
    _photo(folders["wolves"] / "w1.jpg", (160, 100), 4)
    _photo(folders["wolves"] / "w2.jpg", (100, 100), 5)
    _photo(folders["dogs"] / "d1.png", (130, 90), 6)
    return folders


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _fitted(photo: Path) -> np.ndarray:
    return np.asarray(load_for_edit(photo, RESOLUTION))


def _train_args(photos, ckpt: Path, output: Path, *extra: str) -> list[str]:
    return ["--mode", "train", "--subject_dir", str(photos["subject"]), "--samples_per_image", "2",
            "--output", str(output), "--ckpt", str(ckpt), *WORDS, *COMMON, *extra]


@pytest.fixture(scope="module")
def train_set(photos, tiny_ckpt, tmp_path_factory) -> Path:
    before = _digest(photos["subject"])
    output = tmp_path_factory.mktemp("sets") / "training"
    assert main(_train_args(photos, tiny_ckpt, output, "--batch-size", "3")) == 0
    assert _digest(photos["subject"]) == before, "source photos must never be modified"
    return output


@pytest.fixture(scope="module")
def reg_set(photos, tiny_ckpt, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("sets") / "regularization"
    code = main(["--mode", "reg", "--reg_source_dir", str(photos["wolves"]), "--reg_class_dir", str(photos["dogs"]),
                 "--num_pairs", "5", "--output", str(output), "--ckpt", str(tiny_ckpt), *WORDS, *COMMON])
    assert code == 0
    return output


def test_training_pairs_are_aligned_and_described(train_set, photos):
    records = _records(train_set)
    assert [r["index"] for r in records] == list(range(6))  # one batch per image size, committed pair by pair
    expected = {f"{i:03d}_{side}.png" for i in range(6) for side in (0, 1)} | {MANIFEST, SETTINGS}
    assert {p.name for p in train_set.iterdir()} == expected
    assert [r["source_name"] for r in records] == ["a.jpg", "b.png", "c.png"] * 2  # pair i uses photo i mod n
    assert len({r["seed"] for r in records}) == 6
    for r in records:
        assert (r["input"], r["target"]) == (f"{r['index']:03d}_0.png", f"{r['index']:03d}_1.png")
        assert r["instruction"] == "replace the wolf with a sks dog"
        assert r["edit_instruction"] == r["reverse_instruction"] == "replace the dog with a wolf"
        assert (r["kind"], r["generated"], r["mode"]) == ("train", "input", "train")
        assert (r["steps"], r["resolution"], r["cfg_text"], r["cfg_image"]) == (2, RESOLUTION, 7.5, 1.5)
        assert r["checkpoint"] == "tiny.ckpt" and len(r["checkpoint_sha256"]) == 64
        photo = photos["subject"] / r["source_name"]
        assert r["source_sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest()
        made, real = _pixels(train_set / r["input"]), _pixels(train_set / r["target"])
        assert made.shape == real.shape == (r["height"], r["width"], 3)
        np.testing.assert_array_equal(real, _fitted(photo))  # the target is the photo under the edit's resize rule
        assert json.loads(Image.open(train_set / r["input"]).text["instruct2dream"])["role"] == "input"
    # Different seeds of one photo give different edits.
    assert not np.array_equal(_pixels(train_set / "000_0.png"), _pixels(train_set / "003_0.png"))


def test_regularization_pairs_mix_both_directions(reg_set, photos):
    records = _records(reg_set)
    assert [(r["kind"], r["source_name"]) for r in records] == [
        ("reg_source", "w1.jpg"), ("reg_class", "d1.png"), ("reg_source", "w2.jpg"),
        ("reg_source", "w1.jpg"), ("reg_class", "d1.png")]
    for r in records:
        assert r["instruction"] == "replace the wolf with a dog" and "sks" not in r["instruction"]
        made, real = (r["input"], r["target"]) if r["generated"] == "input" else (r["target"], r["input"])
        photo = photos["wolves" if r["kind"] == "reg_source" else "dogs"] / r["source_name"]
        np.testing.assert_array_equal(_pixels(reg_set / real), _fitted(photo))
        assert _pixels(reg_set / made).shape == _pixels(reg_set / real).shape
        if r["kind"] == "reg_source":  # real wolf (input) → generated dog (target)
            assert (r["generated"], r["edit_instruction"]) == ("target", "replace the wolf with a dog")
        else:  # generated wolf (input) → real dog (target)
            assert (r["generated"], r["edit_instruction"]) == ("input", "replace the dog with a wolf")


def test_paired_prior_edits_every_training_input_with_the_class_prompt(train_set, photos, tiny_ckpt, tmp_path,
                                                                       capsys):
    """--reg_source_pairs: after the --num_pairs pairs of the photo folders (the same pairs, pixel for pixel, as
    without it), one pair per training pair whose input is that training input, unchanged, and whose target is its
    edit with the class prompt; the set loads as regularization data."""
    from ldm.data import personalized_edit

    output = tmp_path / "paired"
    argv = ["--mode", "reg", "--reg_source_dir", str(photos["wolves"]), "--reg_class_dir", str(photos["dogs"]),
            "--num_pairs", "3", "--reg_source_pairs", str(train_set), "--ckpt", str(tiny_ckpt), *WORDS, *COMMON]
    assert main([*argv, "--output", str(output)]) == 0
    plain = tmp_path / "plain"
    assert main([*argv[:8], *argv[10:], "--output", str(plain)]) == 0  # no --reg_source_pairs
    records, training = _records(output), _records(train_set)
    assert [r["kind"] for r in records] == ["reg_source", "reg_class", "reg_source"] + ["reg_paired"] * len(training)
    for r in records[:3]:
        for side in ("input", "target"):
            np.testing.assert_array_equal(_pixels(output / r[side]), _pixels(plain / r[side]))
    for r, t in zip(records[3:], training):
        assert r["source_photo"] == str(train_set / t["input"])
        assert (r["generated"], r["instruction"], r["edit_instruction"]) == (
            "target", "replace the wolf with a dog", "replace the wolf with a dog")
        np.testing.assert_array_equal(_pixels(output / r["input"]), _pixels(train_set / t["input"]))
        assert _pixels(output / r["target"]).shape == _pixels(train_set / t["input"]).shape
    assert len({r["seed"] for r in records}) == len(records)
    reg = personalized_edit.PersonalizedBase(str(output), size=64, repeats=1, placeholder_token="dog", reg=True)
    assert len(reg) == 3 + len(training) and reg[3]["caption"] == "replace the wolf with a dog"
    # More photo pairs would renumber the paired ones: refused, nothing touched.
    before = _digest(output)
    assert main([*argv[:7], "4", *argv[8:], "--output", str(output)]) == 2
    assert "does not match the plan" in capsys.readouterr().err and _digest(output) == before


def test_source_photos_are_labelled_with_the_identifier(photos, tiny_ckpt, tmp_path):
    """--source_dir (train): after the subject pairs (and their variants), one pair per source photo whose input is
    the real photo and whose target is its forward edit with the identifier caption (kind train_source, no variants:
    only a generated input is varied); they load as training pairs beside a folder of generated ones."""
    from ldm.data.personalized_edit import PersonalizedBase

    output = tmp_path / "mixed"
    assert main(_train_args(photos, tiny_ckpt, output, "--source_dir", str(photos["wolves"]),
                            "--vary_template", "make the {source} white", "--samples_per_image", "1",
                            "--paste_back", "0.08")) == 0
    records = _records(output)
    assert [(r["kind"], r["source_name"], r.get("follow_up_instruction")) for r in records] == [
        ("train", "a.jpg", None), ("train", "a.jpg", "make the wolf white"), ("train", "b.png", None),
        ("train", "b.png", "make the wolf white"), ("train", "c.png", None), ("train", "c.png", "make the wolf white"),
        ("train_source", "w1.jpg", None), ("train_source", "w2.jpg", None)]
    for r in records[6:]:
        assert (r["generated"], r["instruction"], r["edit_instruction"]) == (
            "target", "replace the wolf with a sks dog", "replace the wolf with a sks dog")
        real = _fitted(photos["wolves"] / r["source_name"])
        np.testing.assert_array_equal(_pixels(output / r["input"]), real)
        assert not np.array_equal(_pixels(output / r["target"]), real)
    alone = tmp_path / "labelled"
    assert main(["--mode", "train", "--source_dir", str(photos["wolves"]), "--output", str(alone),
                 "--ckpt", str(tiny_ckpt), *WORDS, *COMMON]) == 0
    assert [(r["kind"], r["index"]) for r in _records(alone)] == [("train_source", 0), ("train_source", 1)]
    data = PersonalizedBase([output, alone], size=64, repeats=1, placeholder_token="dog")
    assert len(data) == 10 and data[9]["caption"] == "replace the wolf with a sks dog"


def test_paired_prior_of_a_folder_without_pairs_is_a_clear_error(photos, tiny_ckpt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, needle in (("missing", "does not exist"), ("empty", "no image pairs found")):
        assert main(["--mode", "reg", "--reg_class_dir", str(photos["dogs"]), "--reg_source_pairs",
                     str(tmp_path / folder), "--output", str(tmp_path / "out"), "--ckpt", str(tiny_ckpt), *WORDS,
                     *COMMON]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(tmp_path / folder) in err
        assert not (tmp_path / "out").exists()


def test_variants_share_the_reverse_edit_and_target(train_set, photos, tiny_ckpt, tmp_path, capsys):
    """--vary_template: each group is the plain pair (the same as without the option: same seed, same pixels up to
    one level of rounding, as the two runs batch photo a's edits differently and some CPUs' convolutions then differ
    in the last float bits) and one pair per follow-up edit, whose input is that edit of the plain input (edit_cli
    with the recorded seed gives it again) and whose target is the same real photo."""
    from scripts import edit_cli

    output = tmp_path / "varied"
    vary = ["--vary_template", "make the {source} white", "--vary_template", "make the {source} black"]
    assert main(_train_args(photos, tiny_ckpt, output, "--samples_per_image", "1", "--batch-size", "4", *vary)) == 0
    records = _records(output)
    assert [r["index"] for r in records] == list(range(9))  # 3 photos × (plain + 2 variants)
    assert [r["source_name"] for r in records] == ["a.jpg"] * 3 + ["b.png"] * 3 + ["c.png"] * 3
    for group in range(3):
        plain, *variants = records[3 * group : 3 * group + 3]
        assert "follow_up_instruction" not in plain and plain["seed"] == _records(train_set)[group]["seed"]
        for name, side in ((plain["input"], 0), (plain["target"], 1)):
            ours, without = _pixels(output / name).astype(int), _pixels(train_set / f"{group:03d}_{side}.png")
            assert ours.shape == without.shape and np.abs(ours - without).max() <= 1
        seeds = set()
        for record, colour in zip(variants, ("white", "black")):
            assert (record["seed"], record["follow_up_instruction"]) == (plain["seed"], f"make the wolf {colour}")
            assert record["instruction"] == "replace the wolf with a sks dog"
            np.testing.assert_array_equal(_pixels(output / record["target"]), _pixels(output / plain["target"]))
            again = tmp_path / f"again_{record['index']}"
            assert edit_cli.main(["--input", str(output / plain["input"]), "--output", str(again), "--edit",
                                  record["follow_up_instruction"], "--seed", str(record["follow_up_seed"]),
                                  "--ckpt", str(tiny_ckpt), *COMMON]) == 0
            # Equal up to float rounding of batched convolutions (one 8-bit level, on a handful of pixels).
            np.testing.assert_allclose(_pixels(output / record["input"]), _pixels(again / plain["input"]), atol=1)
            assert not np.array_equal(_pixels(output / record["input"]), _pixels(output / plain["input"]))
            seeds.add(record["follow_up_seed"])
        assert len(seeds) == 2 and plain["seed"] not in seeds
    # The variants are part of the recipe: a rerun without them, or with others, is refused, naming the option.
    for vary in ([], vary[:2]):
        assert main(_train_args(photos, tiny_ckpt, output, "--samples_per_image", "1", *vary)) == 2
        assert "vary_template: ['make the {source} white', 'make the {source} black'] in the folder" in \
            capsys.readouterr().err


@pytest.mark.parametrize("mode", ["train", "reg"])
def test_paste_back_composites_the_generated_side(train_set, reg_set, photos, tiny_ckpt, tmp_path, capsys, mode):
    """--paste_back: the generated side is `paste_back` of the edit a run without it made (same seeds) onto the
    real side; the real side is untouched; the threshold is recorded and part of the recipe."""
    from ldm.data.paste_back import paste_back

    plain, output = (train_set, tmp_path / "pasted") if mode == "train" else (reg_set, tmp_path / "pasted_reg")
    threshold = "0.15"
    args = (_train_args(photos, tiny_ckpt, output, "--batch-size", "3") if mode == "train" else
            ["--mode", "reg", "--reg_source_dir", str(photos["wolves"]), "--reg_class_dir", str(photos["dogs"]),
             "--num_pairs", "5", "--output", str(output), "--ckpt", str(tiny_ckpt), *WORDS, *COMMON])
    assert main([*args, "--paste_back", threshold]) == 0
    records, before = _records(output), _records(plain)[: len(_records(output))]
    kept = changed = 0
    for record, old in zip(records, before):
        assert record["paste_back"] == 0.15 and record["seed"] == old["seed"]
        made, real = ("input", "target") if record["generated"] == "input" else ("target", "input")
        np.testing.assert_array_equal(_pixels(output / record[real]), _pixels(plain / old[real]))
        expected = paste_back(Image.open(plain / old[made]), Image.open(plain / old[real]), 0.15)
        np.testing.assert_array_equal(_pixels(output / record[made]), np.asarray(expected))
        pasted = _pixels(output / record[made]) == _pixels(output / record[real])
        kept, changed = kept + pasted.all(-1).sum(), changed + (~pasted).any(-1).sum()
    assert kept and changed, "the tiny model's edits should be partly pasted back at this threshold"
    assert main(args) == 2  # a rerun without it is refused, naming the setting
    assert "paste_back: 0.15 in the folder, None now" in capsys.readouterr().err


def _killing_python(tmp_path: Path, commit: int) -> Path:
    """A stand-in for ``$PYTHON`` of generate_dataset.sh: runs the script's ``main`` with an ``on_commit`` callback
    that SIGKILLs the process just before its ``commit``-th commit."""
    code = ("import os, signal, sys; from scripts.generate_dataset import main; "
            f"main(sys.argv[1:], on_commit=lambda n: n == {commit} and os.kill(os.getpid(), signal.SIGKILL))")
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nshift  # the script path\nexec "{sys.executable}" -c "{code}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_sigkill_mid_write_then_rerun_completes_the_same_set(train_set, photos, tiny_ckpt, tmp_path):
    """The generator (through generate_dataset.sh) kills itself before its 5th commit, with an image written to a
    temporary file; a power-loss-style torn manifest line is added; the rerun repairs and completes the set."""
    output = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHON": str(_killing_python(tmp_path, 5)),
           "MODE": "train",
           "SUBJECT_DIR": str(photos["subject"]), "CLASS_WORD": "dog", "SOURCE_WORD": "wolf", "OUTPUT": str(output),
           "CKPT": str(tiny_ckpt), "CONFIG": str(TINY_CONFIG), "STEPS": "2", "RESOLUTION": str(RESOLUTION),
           "SAMPLES_PER_IMAGE": "2", "BATCH_SIZE": "2"}
    result = subprocess.run(["bash", str(REPO / "generate_dataset.sh"), "--quiet"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr
    names = {p.name for p in output.iterdir()}
    assert len(_records(output)) == 1  # commits: image, image, line, image, [killed before the 2nd image]
    assert any(n.startswith(".") and n.endswith(".tmp") for n in names), names
    assert len([n for n in names if n.endswith(".png")]) == 3  # one finished pair + an orphan input
    with open(output / MANIFEST, "ab") as handle:
        handle.write(b'{"index": 3, "input": "003_0.p')

    assert main(_train_args(photos, tiny_ckpt, output, "--batch-size", "4")) == 0
    assert {p.name for p in output.iterdir()} == {p.name for p in train_set.iterdir()}
    records = _records(output)
    assert sorted(r["index"] for r in records) == list(range(6))  # no duplicate, no gap
    assert sorted(records, key=lambda r: r["index"]) == _records(train_set)
    for r in records:  # the same pairs: seeds decide, not batching (which moves float rounding by a level at most)
        assert (output / r["target"]).read_bytes() == (train_set / r["target"]).read_bytes()
        diff = np.abs(_pixels(output / r["input"]).astype(int) - _pixels(train_set / r["input"]))
        assert diff.max() <= 2 and diff.mean() < 0.05, (r["input"], diff.max(), diff.mean())


def test_rerun_grows_and_refuses_other_settings(train_set, photos, tiny_ckpt, tmp_path, capsys):
    output = tmp_path / "copy"
    shutil.copytree(train_set, output)
    before = _digest(output)
    # Finished: nothing to do, and no model (not even the checkpoint file) is needed.
    assert main(_train_args(photos, tmp_path / "gone.ckpt", output)) == 0
    assert "0 new, 6 already there" in capsys.readouterr().out
    for change, needle in ((["--class_word", "cat"], "class_word: 'dog' in the folder, 'cat' now"),
                           (["--steps", "3"], "steps: 2 in the folder, 3 now"),
                           (["--seed", "1"], "seed: 0 in the folder, 1 now")):
        assert main(_train_args(photos, tiny_ckpt, output, *change)) == 2
        assert needle in capsys.readouterr().err
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"other weights")
    assert main(_train_args(photos, other, output)) == 2
    assert "generated with checkpoint tiny.ckpt" in capsys.readouterr().err
    assert main(_train_args(photos, tiny_ckpt, output, "--samples_per_image", "1")) == 2
    assert "holds pair 3 but only 3 are planned" in capsys.readouterr().err
    assert _digest(output) == before
    # More seeds per photo: three pairs are added, the first six are untouched.
    assert main(_train_args(photos, tiny_ckpt, output, "--samples_per_image", "3")) == 0
    assert sorted(r["index"] for r in _records(output)) == list(range(9))
    after = _digest(output)
    assert all(after[name] == digest for name, digest in before.items() if name.endswith(".png"))


def test_bad_photos_are_named_or_skipped_and_listed(photos, tiny_ckpt, tmp_path, capsys, caplog):
    folder = tmp_path / "subject"
    folder.mkdir()
    shutil.copy(photos["subject"] / "a.jpg", folder / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"this is not a png")
    output = tmp_path / "out"
    args = ["--mode", "train", "--subject_dir", str(folder), "--output", str(output), "--ckpt", str(tiny_ckpt),
            *WORDS, *COMMON]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 photo(s) cannot be read" in err and "empty.jpg" in err and "corrupt.png" in err
    assert not output.exists()
    assert main([*args, "--skip-unreadable"]) == 0
    assert [r["source_name"] for r in _records(output)] == ["good.jpg"]
    skipped = " ".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped"))
    assert "empty.jpg" in skipped and "corrupt.png" in skipped


def test_foreign_files_are_refused_unless_forced(photos, tiny_ckpt, tmp_path, capsys):
    def reg_args(output: Path) -> list[str]:
        return ["--mode", "reg", "--reg_class_dir", str(photos["dogs"]), "--num_pairs", "1", "--output", str(output),
                "--ckpt", str(tiny_ckpt), *WORDS, *COMMON]

    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    args = reg_args(output)
    assert main(args) == 2
    assert "1 file(s) that are not ours (notes.txt)" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert (output / "notes.txt").read_text() == "mine" and len(_records(output)) == 1
    # Pair-like files we did not make are never adopted (a later run would delete them as orphans).
    other = tmp_path / "other"
    other.mkdir()
    (other / "000_0.png").write_bytes(b"someone else's")
    assert main([*reg_args(other), "--force"]) == 2
    assert "not made by this script" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"--subject_dir": "empty"}, "contains no image files"),
        ({"--subject_dir": "missing"}, "no such folder"),
        ({"--ckpt": "missing.ckpt"}, "checkpoint not found"),
        ({"--forward_template": "replace the {source} with a {kind}"}, "unknown field 'kind'"),
        ({"--class_word": " "}, "give one word"),
        ({"--vary_template": "make the {colour} white"}, "--vary_template 'make the {colour} white': unknown field"),
    ],
    ids=["empty-folder", "missing-folder", "missing-checkpoint", "bad-template", "blank-word", "bad-variant"],
)
def test_bad_inputs_are_clear_errors(photos, tiny_ckpt, tmp_path, capsys, change, needle):
    (tmp_path / "empty").mkdir()
    values = {"--subject_dir": str(photos["subject"]), "--ckpt": str(tiny_ckpt), "--class_word": "dog"}
    for key, value in change.items():
        values[key] = str(tmp_path / value) if key in ("--subject_dir", "--ckpt") else value
    args = ["--mode", "train", "--source_word", "wolf", "--output", str(tmp_path / "out"), *COMMON]
    assert main([*args, *(x for item in values.items() for x in item)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_arguments_exit_2():
    for argv in (["--mode", "train", *WORDS, "--output", "o"],  # no --subject_dir or --source_dir
                 ["--mode", "reg", "--reg_class_dir", "d", "--source_dir", "w", *WORDS, "--output", "o"],
                 ["--mode", "reg", *WORDS, "--output", "o"],  # no reg folder
                 ["--mode", "reg", "--reg_class_dir", "d", "--samples_per_image", "2", *WORDS, "--output", "o"],
                 # reg targets must stay faithful edits of their inputs: no recoloured variants
                 ["--mode", "reg", "--reg_class_dir", "d", "--vary_template", "make the {source} white", *WORDS,
                  "--output", "o"],
                 ["--mode", "reg", "--reg_class_dir", "d", "--paste_back", "1.5", *WORDS, "--output", "o"],
                 ["--mode", "train", "--subject_dir", "s", "--reg_source_pairs", "t", *WORDS, "--output", "o"],
                 # without photo folders --num_pairs has nothing to count: one pair per training pair
                 ["--mode", "reg", "--reg_source_pairs", "t", "--num_pairs", "5", *WORDS, "--output", "o"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert main(["--mode", "reg", "--reg_class_dir", "d", *WORDS, "--output", "o",
                 "--forward_template", "replace the {source} with a {identifier} {class}"]) == 2


def test_generated_sets_load_as_training_data(train_set, reg_set):
    from ldm.data import personalized_edit

    train = personalized_edit.PersonalizedBase(str(train_set), size=64, repeats=1, placeholder_token="dog")
    reg = personalized_edit.PersonalizedBase(str(reg_set), size=64, repeats=1, placeholder_token="dog", reg=True)
    assert (len(train), len(reg)) == (6, 5)
    item = train[0]
    assert item["caption"] == "replace the wolf with a sks dog"
    assert tuple(item["image"].shape) == tuple(item["c_concat"].shape) and 64 in item["image"].shape
    assert reg[1]["caption"] == "replace the wolf with a dog"
