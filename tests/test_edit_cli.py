"""edit.sh / scripts/edit_cli.py end to end on a tiny checkpoint: outputs, sweeps, seeds, and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.transforms import edit_size
from ldm.image_io import read_metadata
from scripts.edit_cli import main
from tests.tiny import REPO, TINY_CONFIG, save_tiny_checkpoint

COMMON = ["--config", str(TINY_CONFIG), "--steps", "3", "--resolution", "128", "--quiet"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", seed=1)


def _write_photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    _write_photo(folder / "wide.jpg", (150, 100), 1)
    _write_photo(folder / "tall.png", (90, 160), 2)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(args, capture_output=True, text=True, env=environment, cwd=REPO, timeout=600)


def test_edit_sh_folder_in_images_out_and_seeds_reproducible(tiny_ckpt, photos, tmp_path):
    out_sh = tmp_path / "out_sh"
    result = _run(
        ["bash", str(REPO / "edit.sh"), "--seed", "5", *COMMON],
        CKPT=str(tiny_ckpt), INPUT=str(photos), OUTPUT=str(out_sh), EDIT="make it snowy", PYTHON=sys.executable,
    )
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in out_sh.iterdir())
    assert files == ["tall.png", "wide.png"]
    assert Image.open(out_sh / "wide.png").size == edit_size(150, 100, 128) == (192, 128)
    assert Image.open(out_sh / "tall.png").size == edit_size(90, 160, 128)
    meta = json.loads(Image.open(out_sh / "wide.png").text["instruct2dream"])
    assert meta["seed"] == 5 and meta["edit"] == "make it snowy" and meta["cfg_text"] == 7.5

    # The same command through the Python CLI (--batch-size 2; these two sizes still run alone): identical bytes.
    out_py = tmp_path / "out_py"
    result = _run([sys.executable, "scripts/edit_cli.py", "--ckpt", str(tiny_ckpt), "--input", str(photos),
                   "--output", str(out_py), "--edit", "make it snowy", "--seed", "5", "--batch-size", "2", *COMMON])
    assert result.returncode == 0, result.stderr
    for name in files:
        assert (out_py / name).read_bytes() == (out_sh / name).read_bytes(), name


def test_sweep_writes_every_setting_and_a_labelled_grid(tiny_ckpt, photos, tmp_path):
    out = tmp_path / "sweep"
    code = main(["--ckpt", str(tiny_ckpt), "--input", str(photos / "wide.jpg"), "--output", str(out),
                 "--edit", "x", "--seed", "1", "--cfg-text", "3", "7.5", "--cfg-image", "1.2", "1.5", *COMMON])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["wide_grid.png", "wide_txt3_img1.2.png", "wide_txt3_img1.5.png",
                     "wide_txt7.5_img1.2.png", "wide_txt7.5_img1.5.png"]
    grid = Image.open(out / "wide_grid.png")
    assert grid.width > 2 * 192 and grid.height > 2 * 128
    meta = read_metadata(out / "wide_grid.png")
    assert meta["input"] == "wide.jpg" and meta["cfg_text"] == [3, 7.5] and meta["cfg_image"] == [1.2, 1.5]
    a = np.asarray(Image.open(out / "wide_txt3_img1.2.png"), dtype=np.int16)
    b = np.asarray(Image.open(out / "wide_txt7.5_img1.5.png"), dtype=np.int16)
    assert np.abs(a - b).max() > 0, "different guidance must give different edits"


def test_existing_outputs_and_inputs_are_never_overwritten(tiny_ckpt, photos, tmp_path, capsys):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    args = ["--ckpt", str(tiny_ckpt), "--input", str(photos / "wide.jpg"), "--edit", "x", *COMMON]
    assert main([*args, "--output", str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_bytes() == b"precious"
    original = (photos / "tall.png").read_bytes()
    assert main(["--ckpt", str(tiny_ckpt), "--input", str(photos / "tall.png"), "--edit", "x",
                 "--output", str(photos / "tall.png"), "--overwrite", *COMMON]) == 2
    assert "refusing to overwrite input" in capsys.readouterr().err
    assert (photos / "tall.png").read_bytes() == original
    assert main([*args, "--output", str(target), "--overwrite", "--seed", "2"]) == 0
    assert Image.open(target).size == (192, 128)


@pytest.mark.parametrize(
    "content,needle", [(b"", "empty"), (b"this is not a jpeg", "cannot read image")], ids=["zero-bytes", "corrupt"]
)
def test_unreadable_image_is_named(tiny_ckpt, tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    code = main(["--ckpt", str(tiny_ckpt), "--input", str(bad), "--output", str(tmp_path / "o"), "--edit", "x", *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "bad.jpg" in err
    assert not (tmp_path / "o").exists()


def test_missing_or_corrupt_checkpoint_is_a_clear_error(photos, tmp_path, capsys):
    args = ["--input", str(photos / "wide.jpg"), "--output", str(tmp_path / "o"), "--edit", "x", *COMMON]
    assert main([*args, "--ckpt", str(tmp_path / "nope.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert main([*args, "--ckpt", str(corrupt)]) == 2
    assert "corrupt.safetensors" in capsys.readouterr().err


def test_checkpoint_of_another_model_names_keys_and_shapes(photos, tmp_path, capsys):
    """A 4-channel (SD-style) UNet into the 8-channel config is refused, naming the key and both shapes."""
    ckpt = save_tiny_checkpoint(tmp_path / "sd4.safetensors", seed=2, use_ema=False)
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = state[key][:, :4].contiguous()
    save_file(state, str(ckpt))
    assert main(["--ckpt", str(ckpt), "--input", str(photos / "wide.jpg"), "--output", str(tmp_path / "o"),
                 "--edit", "x", *COMMON]) == 2
    err = capsys.readouterr().err
    assert f"{key}: (32, 4, 3, 3) vs (32, 8, 3, 3)" in err


def test_ema_selection(tiny_ckpt, photos, tmp_path, capsys):
    args = ["--ckpt", str(tiny_ckpt), "--input", str(photos / "wide.jpg"), "--edit", "x", "--seed", "3", *COMMON]
    assert main([*args, "--output", str(tmp_path / "ema.png"), "--ema"]) == 0
    assert main([*args, "--output", str(tmp_path / "plain.png"), "--no-ema"]) == 0
    assert main([*args, "--output", str(tmp_path / "auto.png")]) == 0
    ema, plain, auto = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("ema", "plain", "auto"))
    assert np.array_equal(ema, auto) and not np.array_equal(ema, plain)
    no_ema_ckpt = save_tiny_checkpoint(tmp_path / "noema.ckpt", seed=1, use_ema=False)
    assert main([*args[2:], "--ckpt", str(no_ema_ckpt), "--output", str(tmp_path / "x.png"), "--ema"]) == 2
    assert "EMA" in capsys.readouterr().err


def test_bad_arguments_exit_nonzero(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", "a.jpg", "--output", "o", "--edit", "x", "--steps", "0"])
    assert exit_info.value.code == 2
    assert main(["--input", str(tmp_path / "missing*.jpg"), "--output", "o", "--edit", "x"]) == 2


@pytest.mark.slow  # torch.compile takes ~30-60 s on a CPU even for the tiny model
def test_compile_flag_gives_the_eager_edit(tiny_ckpt, tmp_path):
    photo = _write_photo(tmp_path / "in.png", (64, 64))
    outputs = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"out{len(flags)}.png"
        assert main(["--input", str(photo), "--output", str(out), "--edit", "make it red", "--ckpt", str(tiny_ckpt),
                     "--config", str(TINY_CONFIG), "--steps", "3", "--resolution", "64", "--seed", "1", "--quiet",
                     *flags]) == 0
        outputs[len(flags)] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(outputs[0] - outputs[1]).max() <= 1  # same kernels up to fusion rounding


@pytest.mark.parametrize("config", ["configs/instruct-pix2pix/generate.yaml", "tests/data/configs/ip2p-generate.yaml",
                                    "configs/tiny/ip2p-tiny.yaml"])
def test_tokenizer_flag_reaches_the_text_encoder(config: str) -> None:
    """--tokenizer lands in the text encoder's params, also when the config gives the encoder none (IP2P's own
    configs): OmegaConf's setdefault used to return a detached dict, and the flag was silently dropped."""
    from ldm.editing import inference_config

    prepared = inference_config(REPO / config, tokenizer="models/clip-tokenizer")
    assert prepared.model.params.cond_stage_config.params.tokenizer == "models/clip-tokenizer"
    assert prepared.model.params.use_ema is False
    assert "ckpt_path" not in prepared.model.params


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddim"])
def test_contrast_flag_changes_the_edit_and_is_recorded(tiny_ckpt, tmp_path, sampler):
    from ldm import cli
    from ldm.editing import CONTRAST_MIN_SIGMA

    assert cli.CONTRAST_MIN_SIGMA == CONTRAST_MIN_SIGMA  # --help's default is the library's
    photo = _write_photo(tmp_path / "in.png", (96, 64))
    base = ["--input", str(photo), "--edit", "replace the wolf with a sks dog", "--ckpt", str(tiny_ckpt),
            "--seed", "3", "--sampler", sampler, *COMMON]
    assert main([*base, "--output", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "--output", str(tmp_path / "contrast.png"), "--contrast", "replace the wolf with a dog",
                 "--cfg-contrast", "3"]) == 0
    meta = json.loads(Image.open(tmp_path / "contrast.png").text["instruct2dream"])
    assert meta["contrast"] == "replace the wolf with a dog" and meta["cfg_contrast"] == 3.0
    assert meta["contrast_min_sigma"] == CONTRAST_MIN_SIGMA
    assert "contrast" not in json.loads(Image.open(tmp_path / "plain.png").text["instruct2dream"])
    plain, contrast = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("plain", "contrast"))
    assert plain.shape == contrast.shape and np.abs(plain - contrast).max() > 0


@pytest.mark.parametrize("flags, message", [(["--cfg-contrast", "2"], "--cfg-contrast needs --contrast"),
                                            (["--contrast-min-sigma", "1"], "--contrast-min-sigma needs --contrast"),
                                            (["--contrast", "x", "--contrast-min-sigma", "-1"], "at least 0")])
def test_contrast_flag_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", "a.jpg", "--output", "o", "--edit", "x", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
