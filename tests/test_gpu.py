"""GPU tier (``-m gpu``; skipped without CUDA, run by ``bench/gpu.sh``): the real CLIs on a GPU, tiny models.

Training with ``--gpus 0,`` and editing with ``--device cuda`` must work end to end, and a CUDA edit in fp32 must
match the CPU edit of the same seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_train import TINY_TRAIN, make_pairs
from tests.tiny import REPO, save_tiny_checkpoint

pytestmark = pytest.mark.gpu
TINY_IP2P = REPO / "configs" / "tiny" / "ip2p-tiny.yaml"


def test_train_on_gpu_then_edit_on_gpu(tmp_path):
    from main import main as train
    from scripts.edit_cli import main as edit

    ckpt = save_tiny_checkpoint(tmp_path / "base.ckpt", seed=5)
    data = make_pairs(tmp_path / "train", 3, seed=1)
    assert train(["-b", str(TINY_TRAIN), "-t", "-n", "gpu", "-l", str(tmp_path / "logs"), "--gpus", "0,",
                  "--actual_resume", str(ckpt), "--data_root", str(data), "--reg_data_root", str(data),
                  "--max_steps", "3", "--precision", "bf16-mixed"]) == 0
    (export,) = (tmp_path / "logs").glob("*_gpu/export/model.safetensors")
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(photo)
    outputs = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "fp16")):
        out = tmp_path / f"edit-{device}-{precision}.png"
        assert edit(["--input", str(photo), "--output", str(out), "--edit", "make it red", "--ckpt", str(export),
                     "--config", str(TINY_IP2P), "--steps", "4", "--resolution", "64", "--seed", "3",
                     "--device", device, "--precision", precision, "--quiet"]) == 0
        outputs[(device, precision)] = np.asarray(Image.open(out), dtype=np.float32)
    assert np.abs(outputs[("cuda", "fp32")] - outputs[("cpu", "fp32")]).max() <= 2  # 8-bit rounding only
    assert np.abs(outputs[("cuda", "fp16")] - outputs[("cpu", "fp32")]).mean() <= 4


def test_cuda_device_is_used(tmp_path):
    from ldm.editing import load_model

    ckpt = save_tiny_checkpoint(tmp_path / "m.ckpt", seed=2)
    loaded = load_model(TINY_IP2P, ckpt, device="cuda")
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    assert torch.cuda.memory_allocated() > 0
