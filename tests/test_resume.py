"""Exact resumption at any step: a run stopped and resumed mid-epoch ends bit-identical to one that never stopped.

The epoch here is 10 steps (5 training pairs x repeats 2, batch 1); checkpoints come every 3 steps, so the stops at
steps 3 and 6 are mid-epoch and the last segment crosses the epoch boundary. A worker process loads the data,
regularization pairs are drawn, random crops and flips are on, and the non-default seed is given to the first
segment only: the resumed segments must take it (and the config, and the data position) from the run. The same under
DDP: test_resume_ddp.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import read_checkpoint
from tests.test_train import TINY_TRAIN, make_pairs
from tests.tiny import REPO, save_tiny_checkpoint

SEED = "7"
SETTINGS = ["data.params.num_workers=1", "data.params.train.params.repeats=2",
            "lightning.modelcheckpoint.params.every_n_train_steps=3",
            "lightning.callbacks.image_logger.params.disabled=true"]


def main_py(logs: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("INSTRUCT2DREAM_RUN_TIMESTAMP", None)
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "-l", str(logs), *args], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def first_segment(root: Path) -> list[str]:
    """The first segment's arguments: a tiny base checkpoint, 5 training and 3 regularization pairs, the seed."""
    ckpt = save_tiny_checkpoint(root / "base.ckpt", seed=5)
    train, reg = make_pairs(root / "training", 5, seed=11), make_pairs(root / "reg", 3, seed=12)
    return ["-b", str(TINY_TRAIN), "--actual_resume", str(ckpt), "--data_root", str(train), "--reg_data_root",
            str(reg), "--class_word", "dog", "--source_word", "wolf", "--seed", SEED, *SETTINGS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    logs = root / "logs"
    first = first_segment(root)
    main_py(logs, *first, "-t", "-n", "straight", "--max_steps", "12")
    main_py(logs, *first, "-t", "-n", "staged", "--max_steps", "3")
    (staged,) = logs.glob("*_staged")
    main_py(logs, "-r", str(staged), "-t", "--max_steps", "6")
    main_py(logs, "-r", str(staged), "-t", "--max_steps", "12")
    (straight,) = logs.glob("*_straight")
    return {"straight": straight, "staged": staged, "logs": logs, "first": first}


def losses(run: Path) -> dict[int, tuple[float, float, float]]:
    with open(run / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    by_step = {int(r["step"]): (float(r["train/loss"]), float(r["train/loss_train"]), float(r["train/loss_reg"]))
               for r in rows}
    assert len(by_step) == len(rows), "a step was logged twice"
    return by_step


def test_mid_epoch_resume_is_bit_identical(runs):
    straight = read_checkpoint(runs["straight"] / "checkpoints" / "last.ckpt")
    staged = read_checkpoint(runs["staged"] / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == staged["global_step"] == 12
    assert straight["epoch"] == staged["epoch"] == 1  # the last segment crossed into the second epoch
    differing = [k for k, v in straight["state_dict"].items() if not torch.equal(v, staged["state_dict"][k])]
    assert differing == [], f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    (opt_a,), (opt_b,) = straight["optimizer_states"], staged["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][name])), (index, name)
    assert losses(runs["straight"]) == losses(runs["staged"])
    assert sorted(losses(runs["staged"])) == list(range(12))


def test_stops_were_mid_epoch_and_the_resumed_segments_trained(runs):
    checkpoints = runs["staged"] / "checkpoints"
    for step in (3, 6):
        saved = read_checkpoint(checkpoints / f"step={step:06d}.ckpt")
        assert saved["epoch"] == 0 and saved["global_step"] == step  # inside the 10-step epoch
        position = saved["DataModuleFromConfig"]
        assert (position["epoch"], position["batches_done"], position["seed"]) == (0, step, int(SEED))
    key = "model.diffusion_model.out.2.weight"
    at_6 = read_checkpoint(checkpoints / "step=000006.ckpt")["state_dict"][key]
    assert not torch.equal(at_6, read_checkpoint(checkpoints / "last.ckpt")["state_dict"][key])


def test_a_different_seed_changes_the_run(runs):
    """Guards the test above against passing because the seed has no effect."""
    logs = runs["logs"]
    args = [a if a != SEED else "8" for a in runs["first"]]
    main_py(logs, *args, "-t", "-n", "otherseed", "--max_steps", "3")
    (other,) = logs.glob("*_otherseed")
    assert losses(other)[0] != losses(runs["straight"])[0]


@pytest.mark.parametrize("flags,named", [
    (["--seed", "3"], "--seed 3"),
    (["model.params.reg_weight=0.5"], "model.params.reg_weight"),
    (["--class_word", "cat"], "placeholder_token"),
    (["data.params.batch_size=2"], "data.params.batch_size"),
])
def test_conflicting_flags_on_resume_are_errors(runs, flags, named):
    result = main_py(runs["logs"], "-r", str(runs["staged"]), "-t", "--max_steps", "13", *flags, expect=2)
    assert named in result.stderr and "Traceback" not in result.stderr
    assert read_checkpoint(runs["staged"] / "checkpoints" / "last.ckpt")["global_step"] == 12  # nothing trained
