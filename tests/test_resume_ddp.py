"""Exact resumption under DDP: two gloo processes stopped and resumed mid-epoch end bit-identical to a run that never
stopped. Apart from `test_resume.py` (whose helpers it uses) so that a pytest-xdist worker can run it beside that
file: each takes minutes.
"""

from __future__ import annotations

import torch

from ldm.checkpoint import read_checkpoint
from tests.test_resume import first_segment, losses, main_py


def test_ddp_mid_epoch_resume_is_bit_identical(tmp_path):
    """Two gloo processes: 5 steps per epoch per rank; stop at step 2, resume to 7 (across the epoch boundary)."""
    logs = tmp_path / "logs"
    ddp = [*first_segment(tmp_path), "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
           "lightning.modelcheckpoint.params.every_n_train_steps=2"]
    main_py(logs, *ddp, "-t", "-n", "straight", "--max_steps", "7")
    main_py(logs, *ddp, "-t", "-n", "staged", "--max_steps", "2")
    (staged,) = logs.glob("*_staged")
    main_py(logs, "-r", str(staged), "-t", "--max_steps", "7")
    (straight,) = logs.glob("*_straight")
    a, b = (read_checkpoint(run / "checkpoints" / "last.ckpt") for run in (straight, staged))
    assert a["global_step"] == b["global_step"] == 7 and a["epoch"] == b["epoch"] == 1
    assert read_checkpoint(staged / "checkpoints" / "step=000002.ckpt")["DataModuleFromConfig"]["world_size"] == 2
    assert sorted(p.name for p in (staged / "checkpoints").iterdir()) == [
        "last.ckpt", "step=000002.ckpt", "step=000004.ckpt", "step=000006.ckpt"]  # last.ckpt: step 7, the end
    assert [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])] == []
    assert losses(straight) == losses(staged)
