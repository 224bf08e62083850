"""User errors print the message alone and exit 2 (every front end); bugs in our code keep their traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_train import TINY_TRAIN, make_pairs
from tests.tiny import REPO, save_tiny_checkpoint

TINY_IP2P = REPO / "configs" / "tiny" / "ip2p-tiny.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    bad = make_pairs(root / "unpaired", 2, seed=3)
    (bad / "01_1.png").unlink()                          # 01_0 has no target
    Image.new("RGB", (8, 8)).save(bad / "07_1.png")      # a target without input
    (bad / "02_0.png").write_bytes(b"not an image")       # and an unreadable file
    (bad / "02_1.png").write_bytes(b"not an image")
    photo = root / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(photo)
    return {"root": root, "ckpt": save_tiny_checkpoint(root / "tiny.ckpt", seed=1), "bad": bad,
            "good": make_pairs(root / "good", 2, seed=4), "photo": photo}


def shell(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    full_env.pop("INSTRUCT2DREAM_RUN_TIMESTAMP", None)
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=full_env,
                          cwd=env.get("CWD", REPO), timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-3000:])


def test_train_sh_unpaired_dataset_lists_every_problem_without_traceback(files, tmp_path):
    result = shell("train.sh", {"CKPT": str(files["ckpt"]), "CONFIG": str(TINY_TRAIN), "DATA_ROOT": str(files["bad"]),
                                "REG_DATA_ROOT": str(files["good"]), "LOGDIR": str(tmp_path), "MAX_STEPS": "1"})
    assert_user_error(result, "01_0.png", "07_1.png", "02_0.png")
    assert not list(tmp_path.glob("*/checkpoints/*.ckpt"))  # stopped before any training


def test_main_gpus_without_cuda_is_a_user_error(files, tmp_path):
    if torch.cuda.is_available():
        pytest.fail("this check needs a machine without CUDA; the GPU tier covers --gpus")
    result = shell("train.sh", {"CKPT": str(files["ckpt"]), "CONFIG": str(TINY_TRAIN), "DATA_ROOT": str(files["good"]),
                                "REG_DATA_ROOT": str(files["good"]), "LOGDIR": str(tmp_path), "GPUS": "0,"})
    assert_user_error(result, "--gpus 0,", "CUDA is not available")


def test_main_bad_gpu_ids_and_missing_checkpoint(files, tmp_path):
    from main import main

    common = ["-b", str(TINY_TRAIN), "-t", "--data_root", str(files["good"]), "--reg_data_root", str(files["good"]),
              "-l", str(tmp_path)]
    assert main([*common, "--gpus", "a,b"]) == 2
    assert main([*common, "--actual_resume", str(tmp_path / "nope.ckpt")]) == 2


def test_edit_sh_errors(files, tmp_path):
    missing_ckpt = shell("edit.sh", {"INPUT": str(files["photo"]), "OUTPUT": str(tmp_path / "out"),
                                     "CKPT": str(tmp_path / "none.ckpt"), "CONFIG": str(TINY_IP2P)})
    assert_user_error(missing_ckpt, "checkpoint not found", "download_checkpoint.py")
    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"\xff\xd8 truncated")
    broken = shell("edit.sh", {"INPUT": str(bad_image), "OUTPUT": str(tmp_path / "out"), "CKPT": str(files["ckpt"]),
                               "CONFIG": str(TINY_IP2P), "STEPS": "1", "RESOLUTION": "64"})
    assert_user_error(broken, "broken.jpg")
    no_cuda = shell("edit.sh", {"INPUT": str(files["photo"]), "OUTPUT": str(tmp_path / "out"), "CKPT": str(files["ckpt"]),
                                "CONFIG": str(TINY_IP2P), "STEPS": "1", "RESOLUTION": "64", "DEVICE": "cuda"})
    if not torch.cuda.is_available():
        assert_user_error(no_cuda, "cuda", "not available")


def test_generate_dataset_sh_errors(files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = shell("generate_dataset.sh", {"MODE": "train", "SUBJECT_DIR": str(empty), "OUTPUT": str(tmp_path / "o"),
                                           "CKPT": str(files["ckpt"]), "CONFIG": str(TINY_IP2P)})
    assert_user_error(result, str(empty), "no image files")
    missing = shell("generate_dataset.sh", {"MODE": "train", "SUBJECT_DIR": str(files["good"]),
                                            "OUTPUT": str(tmp_path / "o2"), "CKPT": str(tmp_path / "no.ckpt"),
                                            "CONFIG": str(TINY_IP2P)})
    assert_user_error(missing, "checkpoint not found")
    paired = shell("generate_dataset.sh", {"MODE": "reg", "REG_SOURCE_PAIRS": str(empty),
                                           "OUTPUT": str(tmp_path / "o3"), "CKPT": str(files["ckpt"]),
                                           "CONFIG": str(TINY_IP2P)})
    assert_user_error(paired, str(empty), "no image pairs found")
    labelled = shell("generate_dataset.sh", {"MODE": "train", "SOURCE_DIR": str(empty), "OUTPUT": str(tmp_path / "o4"),
                                             "CKPT": str(files["ckpt"]), "CONFIG": str(TINY_IP2P)})
    assert_user_error(labelled, f"--source_dir {empty}", "no image files")
    neither = shell("generate_dataset.sh", {"MODE": "train", "OUTPUT": str(tmp_path / "o5")})
    assert_user_error(neither, "set SUBJECT_DIR", "SOURCE_DIR")


def test_bugs_keep_their_traceback(monkeypatch, tmp_path, files):
    """A KeyError/ValueError raised by our code is not a user error: it must not be turned into 'error: ...'."""
    import argparse

    from scripts.edit_cli import run_cli

    def buggy(_args):
        return {}["x"]

    with pytest.raises(KeyError):
        run_cli(buggy, argparse.Namespace(quiet=True))

    import main as main_module

    def broken_flatten(*_args, **_kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(main_module, "apply_data_flags", broken_flatten)
    with pytest.raises(ValueError, match="a bug"):
        main_module.main(["-b", str(TINY_TRAIN), "-t", "-l", str(tmp_path)])


def test_user_errors_are_one_family():
    from ldm.checkpoint import CheckpointError
    from ldm.data.personalized_edit import DatasetError
    from ldm.data.transforms import ImageLoadError
    from ldm.errors import MissingFileError, UsageError, UserError
    from ldm.util import ConfigError

    for error in (CheckpointError, DatasetError, ImageLoadError, ConfigError, UsageError, MissingFileError):
        assert issubclass(error, UserError), error
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(ConfigError, ValueError)


def test_main_error_messages_name_the_file(files, tmp_path):
    """The message names the bad folder even when run from another working directory."""
    result = shell("train.sh", {"CKPT": str(files["ckpt"]), "CONFIG": str(TINY_TRAIN), "DATA_ROOT": str(tmp_path / "x"),
                                "REG_DATA_ROOT": str(files["good"]), "LOGDIR": str(tmp_path), "CWD": str(tmp_path)})
    assert_user_error(result, f"--data_root {tmp_path / 'x'}")
    assert Path(files["bad"] / "00_0.png").exists()  # nothing the user had was touched


@pytest.mark.parametrize("script, argv", [("scripts.generate_dataset", []), ("scripts.edit_cli", []),
                                          ("scripts.edit_app", []), ("scripts.evaluate", []),
                                          ("scripts.convert_to_diffusers", []), ("main", []),
                                          ("scripts.shapesworld", ["demo"]), ("scripts.shapesworld", ["base"])])
def test_help_shows_defaults_but_never_none(script, argv, capsys):
    """--help lists each option's default; an option whose default is None ("not given") says in its help what
    happens instead of printing "(default: None)" after, e.g., "pairs per subject photo (default 1)"."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: " in text and "(default: None)" not in text and "(default: [])" not in text
