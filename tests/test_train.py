"""Fine-tuning: main.py end to end (artifacts, exact resume, DDP), learning, prior-preservation gradients, freezing."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import read_checkpoint
from ldm.models.diffusion.conditioning import JointDropout
from ldm.models.diffusion.losses import prior_preservation_loss
from tests.tiny import REPO, build_tiny_model, save_tiny_checkpoint

TINY_TRAIN = REPO / "configs" / "tiny" / "dreambooth-tiny.yaml"
NO_IMAGES = "lightning.callbacks.image_logger.params.disabled=true"


def make_pairs(folder: Path, count: int, seed: int, size=(80, 96)) -> Path:
    """A seed-layout dataset: NN_0 (input) and NN_1 (target) of different content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        for k in (0, 1):
            pixels = (rng.random((size[0], size[1], 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}_{k}.png")
    return folder


def make_photos(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8)).save(folder / f"photo{i}.jpg")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Training and regularization sets made by the real generator from photos (issue 5: no renaming step)."""
    from scripts.generate_dataset import main as generate

    root = tmp_path_factory.mktemp("train")
    ckpt = save_tiny_checkpoint(root / "base.ckpt", seed=5)
    common = ["--ckpt", str(ckpt), "--config", str(REPO / "configs" / "tiny" / "ip2p-tiny.yaml"), "--steps", "2",
              "--resolution", "64", "--class_word", "dog", "--source_word", "wolf", "--quiet"]
    assert generate(["--mode", "train", "--subject_dir", str(make_photos(root / "my_dog", 2, 1)),
                     "--output", str(root / "training"), *common]) == 0
    assert generate(["--mode", "reg", "--reg_source_dir", str(make_photos(root / "wolves", 2, 2)), "--num_pairs", "3",
                     "--output", str(root / "regularization"), *common]) == 0
    return {"root": root, "ckpt": ckpt, "train": root / "training", "reg": root / "regularization", "logs": root / "logs"}


def run_main(workspace, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "main.py"), "-l", str(workspace["logs"]), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("INSTRUCT2DREAM_RUN_TIMESTAMP", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def base_args(workspace) -> list[str]:
    return ["-b", str(TINY_TRAIN), "--actual_resume", str(workspace["ckpt"]), "--data_root", str(workspace["train"]),
            "--reg_data_root", str(workspace["reg"]), "--class_word", "dog", "--source_word", "wolf"]


def run_dir(workspace, name: str) -> Path:
    (found,) = workspace["logs"].glob(f"*_{name}")
    return found


@pytest.fixture(scope="module")
def straight_run(workspace) -> Path:
    workspace["straight_stderr"] = run_main(workspace, *base_args(workspace), "-t", "-n", "straight",
                                            "--max_steps", "4").stderr
    return run_dir(workspace, "straight")


def test_cli_writes_checkpoints_images_metrics_and_export(workspace, straight_run):
    assert sorted(p.name for p in workspace["train"].iterdir()) == [
        "000_0.png", "000_1.png", "001_0.png", "001_1.png", "generate_dataset.json", "pairs.jsonl"]
    assert sorted(p.name for p in (straight_run / "checkpoints").iterdir()) == [
        "last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    assert sorted(p.name for p in (straight_run / "images" / "train").iterdir()) == ["gs-000002.png", "gs-000004.png"]
    grid = Image.open(straight_run / "images" / "train" / "gs-000004.png")
    assert grid.width >= 3 * 64 and grid.height >= 2 * 64  # input | edit | target, two validation pairs
    configs = sorted(p.name.split("-")[-1] for p in (straight_run / "configs").iterdir())
    assert configs == ["lightning.yaml", "project.yaml"]
    with open(straight_run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for column in ("train/loss_train", "train/loss_reg", "train/loss"):
        values = [float(r[column]) for r in rows if r.get(column)]
        assert len(values) == 4 and all(np.isfinite(values)), column
    assert not any(key.startswith(("val/clip", "val/dino")) for key in rows[0])  # no eval_models: no scoring
    step_rows = [r for r in rows if r.get("train/loss")]
    for row in step_rows:  # loss = loss_train + reg_weight (1.0) * loss_reg
        assert float(row["train/loss"]) == pytest.approx(float(row["train/loss_train"]) + float(row["train/loss_reg"]), rel=1e-5)
    checkpoint = read_checkpoint(straight_run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4 and checkpoint["optimizer_states"] and "rng_states" in checkpoint
    export = straight_run / "export" / "model.safetensors"
    from safetensors.torch import load_file

    weights = load_file(str(export))
    assert not any(k.startswith("model_ema.") for k in weights)
    assert torch.equal(weights["model.diffusion_model.out.2.weight"], checkpoint["state_dict"]["model.diffusion_model.out.2.weight"])
    # Lightning's warnings that a user can do nothing about stay out of the log (main.py filters them).
    for noise in ("LeafSpec", "in eval mode at the start of training"):
        assert noise not in workspace["straight_stderr"], noise


def test_resume_is_exact(workspace, straight_run):
    """Stop at step 2 (the straight run's step-2 checkpoint, alone in a copy of its log dir), resume to 4."""
    half = workspace["logs"] / f"{straight_run.name.rsplit('_', 1)[0]}_half"
    shutil.copytree(straight_run, half, ignore=shutil.ignore_patterns("last.ckpt", "step=000004.ckpt", "export", "images"))
    run_main(workspace, "-r", str(half / "checkpoints" / "step=000002.ckpt"), "-t", "--max_steps", "4", NO_IMAGES)
    resumed = read_checkpoint(half / "checkpoints" / "last.ckpt")
    straight = read_checkpoint(straight_run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 4
    differing = [k for k, v in straight["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert differing == []
    trained = read_checkpoint(half / "checkpoints" / "step=000002.ckpt")["state_dict"]
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(trained[key], resumed["state_dict"][key]), "the resumed run must have trained further"


def test_short_run_keeps_one_last_checkpoint(workspace):
    """max_steps below the checkpoint interval: one last.ckpt at the final step, not a second train-end copy
    (Lightning 2.6 saves ``last`` at train end when nothing was saved during the run, as last-v1.ckpt)."""
    run_main(workspace, *base_args(workspace), "-t", "-n", "short", "--max_steps", "3", NO_IMAGES,
             "lightning.modelcheckpoint.params.every_n_train_steps=100")
    checkpoints = run_dir(workspace, "short") / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    saved = read_checkpoint(checkpoints / "last.ckpt")
    assert saved["global_step"] == 3
    assert saved["callbacks"]  # a full checkpoint: the data position and the checkpoint callback's state


def test_exported_weights_edit(straight_run, tmp_path):
    from scripts.edit_cli import main as edit_main

    photo = tmp_path / "wolf.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(photo)
    (project,) = (straight_run / "configs").glob("*-project.yaml")
    out = tmp_path / "edited.png"
    code = edit_main(["--ckpt", str(straight_run / "export" / "model.safetensors"), "--config", str(project),
                      "--input", str(photo), "--output", str(out), "--edit", "replace the wolf with a sks dog",
                      "--steps", "2", "--resolution", "64", "--quiet"])
    assert code == 0 and Image.open(out).size == (64, 64)


def test_ddp_two_processes(workspace):
    probe = workspace["root"] / "probe"
    run_main(workspace, *base_args(workspace), "-t", "-n", "ddp", "--max_steps", "2", NO_IMAGES,
             "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
             "lightning.callbacks.probe.target=tests.ddp_probe.DDPProbe",
             f"lightning.callbacks.probe.params.out_dir={probe}")
    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["weights"] == records[1]["weights"], "DDP ranks must end with identical weights"
    assert len(records[0]["seen"]) == len(records[1]["seen"]) == 2
    for step, (first, second) in enumerate(zip(records[0]["seen"], records[1]["seen"])):
        assert not set(first) & set(second), f"step {step}: both ranks trained on the same pair"
    assert len(list(workspace["logs"].glob("*_ddp"))) == 1
    ddp = run_dir(workspace, "ddp")
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.ckpt", "step=000002.ckpt"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["-t"], "give at least one config"),
        (["-b", "nope.yaml", "-t"], "config not found: nope.yaml"),
        (["-b", str(TINY_TRAIN), "-t", "--data_root", "/no/such/dir"], "--data_root /no/such/dir"),
        (["-b", str(TINY_TRAIN), "-t", "--data_root", "/", "--data_root", "/no/such/second"],
         "--data_root /no/such/second"),
        (["-b", str(TINY_TRAIN)], "nothing to do"),
        (["-r", "/no/such/logdir", "-t"], "--resume /no/such/logdir"),
    ],
)
def test_bad_flags_are_clear_errors(args, message, capsys, tmp_path):
    from main import main

    assert main([*args, "-l", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_bad_argument_shapes_exit(tmp_path):
    from main import main

    for args in (["-n", "x", "-r", "y"], ["--bogus"], ["-b", str(TINY_TRAIN), "--max_steps", "1", "oops"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2


# ------------------------------------------------------------------------------------ in-process training checks


def _batch(seed: int, batch_size: int = 2, caption: str = "replace the wolf with a sks dog", size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1,
        "c_concat": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1,
        "caption": [caption] * batch_size,
    }


def _dreambooth_model(**params):
    defaults = dict(use_ema=False, cond_stage_trainable=True, first_stage_key="image", cond_stage_key="caption")
    return build_tiny_model(seed=2, **{**defaults, **params}).train()


def _eval_loss(model, batch) -> float:
    with torch.no_grad():
        losses = [model.shared_step(batch, torch.Generator().manual_seed(i))[0] for i in range(8)]
    return float(torch.stack(losses).mean())


def test_overfitting_two_pairs_lowers_the_loss():
    model = _dreambooth_model(conditioning_dropout={"text": 0, "both": 0, "image": 0}, cond_stage_trainable=False)
    batch = _batch(0, size=32)
    before = _eval_loss(model, batch)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    for step in range(100):
        loss, _ = model.shared_step(batch, torch.Generator().manual_seed(1000 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _eval_loss(model, batch)
    assert after < 0.6 * before, (before, after)


def _gradients(model, train_batch, reg_batch, reg_weight):
    model.zero_grad()
    loss_train, _ = model.shared_step(train_batch, torch.Generator().manual_seed(1))
    loss_reg, _ = model.shared_step(reg_batch, torch.Generator().manual_seed(2))
    prior_preservation_loss(loss_train, loss_reg, reg_weight).backward()
    return torch.cat([p.grad.flatten() for p in model.model.parameters()])


def test_reg_weight_changes_the_gradient():
    model = _dreambooth_model()
    train_batch, reg_batch = _batch(0), _batch(1, caption="replace the wolf with a dog")
    g0 = _gradients(model, train_batch, reg_batch, 0.0)
    g1 = _gradients(model, train_batch, reg_batch, 1.0)
    model.zero_grad()
    model.shared_step(train_batch, torch.Generator().manual_seed(1))[0].backward()
    g_train = torch.cat([p.grad.flatten() for p in model.model.parameters()])
    torch.testing.assert_close(g0, g_train)
    assert (g1 - g0).norm() > 1e-3 * g0.norm()


@pytest.mark.parametrize("reg_weight", [0.0, 0.5])
def test_training_step_with_a_reg_batch(reg_weight, monkeypatch):
    """training_step on [train, reg]: the loss is loss_train + reg_weight · loss_reg, both parts are logged, and
    each part and the gradient are what two separate `shared_step` calls with the step's generators give (the
    trained prior term runs in one UNet call with the subject batch). At reg_weight 0 the prior term is computed
    for the log only (no graph), and the gradient is the train-only one."""
    model = _dreambooth_model()
    model.reg_weight = reg_weight
    logged = {}
    monkeypatch.setattr(model, "log_dict", lambda values, **kwargs: logged.update(values))
    monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.update({name: value}))
    unet_batches, unet = [], model.model.diffusion_model.forward
    monkeypatch.setattr(model.model.diffusion_model, "forward",
                        lambda x, *a, **k: unet_batches.append((len(x), torch.is_grad_enabled())) or unet(x, *a, **k))
    train_batch, reg_batch = _batch(0), _batch(1, caption="replace the wolf with a dog")
    model.zero_grad()
    loss = model.training_step([train_batch, reg_batch], 3)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.model.parameters()])
    torch.testing.assert_close(loss.detach(), logged["train/loss_train"] + reg_weight * logged["train/loss_reg"])
    assert logged["train/loss_reg"] > 0
    assert unet_batches == ([(2, True), (2, False)] if reg_weight == 0 else [(4, True)])

    model.zero_grad()
    loss_train, _ = model.shared_step(train_batch, model.step_generator(3, salt=0))
    loss_reg, _ = model.shared_step(reg_batch, model.step_generator(3, salt=1))
    torch.testing.assert_close(logged["train/loss_train"], loss_train.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logged["train/loss_reg"], loss_reg.detach(), rtol=1e-5, atol=1e-7)
    (loss_train + reg_weight * loss_reg).backward()
    separate = torch.cat([p.grad.flatten() for p in model.model.parameters()])
    torch.testing.assert_close(grads, separate, rtol=1e-4, atol=1e-5 * float(separate.abs().max()))
    if reg_weight:
        model.zero_grad()
        loss_train.detach_()
        model.shared_step(train_batch, model.step_generator(3, salt=0))[0].backward()
        train_only = torch.cat([p.grad.flatten() for p in model.model.parameters()])
        assert (grads - train_only).norm() > 1e-3 * train_only.norm()


def test_reg_log_every_computes_the_logged_only_prior_term_on_every_nth_step(monkeypatch):
    """At reg_weight 0 the prior term is only logged; with reg_log_every 3 it is computed (and logged) on steps 0
    and 3 only, and every step's loss and gradient are those of a model that computes it on every step. It then goes
    to the loggers directly, at its step (Lightning would log its last value again on the steps between). With prior
    preservation the term is trained on every step whatever reg_log_every says."""
    calls, logged = [], {}

    class Logger:
        def log_metrics(self, metrics, step):
            logged.update({f"{name}@{step}": value for name, value in metrics.items()})

    train_batch, reg_batch = _batch(0), _batch(1, caption="replace the wolf with a dog")

    def run(reg_weight, every):
        model = _dreambooth_model(reg_weight=reg_weight, reg_log_every=every)
        unet = model.model.diffusion_model.forward
        monkeypatch.setattr(model.model.diffusion_model, "forward",
                            lambda x, *a, **k: calls.append(len(x)) or unet(x, *a, **k))
        steps = []
        for step in range(4):
            calls.clear()
            logged.clear()
            monkeypatch.setattr(type(model), "global_step", property(lambda self, s=step: s))
            monkeypatch.setattr(type(model), "loggers", property(lambda self: [Logger()]))
            monkeypatch.setattr(model, "log_dict", lambda values, **kwargs: logged.update(values))
            monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.update({name: value}))
            model.zero_grad()
            loss = model.training_step([train_batch, reg_batch], 0)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.model.parameters()])
            has_reg = {"train/loss_reg", f"train/loss_reg@{step}"} & set(logged)
            assert len(has_reg) <= 1 and all(float(logged[k]) > 0 for k in has_reg)
            steps.append((list(calls), has_reg and has_reg.pop(), loss.detach(), grads))
        return steps

    every_step, every_third = run(0.0, 1), run(0.0, 3)
    assert [(calls, has_reg) for calls, has_reg, _, _ in every_third] == [
        ([2, 2], "train/loss_reg@0"), ([2], set()), ([2], set()), ([2, 2], "train/loss_reg@3")]
    assert all(has_reg == "train/loss_reg" for _, has_reg, _, _ in every_step)
    for (_, _, loss_a, grads_a), (_, _, loss_b, grads_b) in zip(every_step, every_third):
        assert torch.equal(loss_a, loss_b) and torch.equal(grads_a, grads_b)
    assert all(calls == [4] and has_reg == "train/loss_reg" for calls, has_reg, _, _ in run(0.5, 3))
    with pytest.raises(ValueError, match="reg_log_every"):
        _dreambooth_model(reg_log_every=0)


def test_joint_step_with_batches_of_different_sizes_makes_two_calls(monkeypatch):
    """Subject and prior photos of different sizes cannot share a UNet call: two calls, the same losses."""
    model = _dreambooth_model()
    unet_batches, unet = [], model.model.diffusion_model.forward
    monkeypatch.setattr(model.model.diffusion_model, "forward",
                        lambda x, *a, **k: unet_batches.append(tuple(x.shape)) or unet(x, *a, **k))
    train_batch, reg_batch = _batch(0, size=32), _batch(1, caption="replace the wolf with a dog", size=64)
    with torch.no_grad():
        (loss_train, _), (loss_reg, _) = model.joint_step(
            train_batch, reg_batch, (torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)))
        assert [shape[0] for shape in unet_batches] == [2, 2] and unet_batches[0][2:] != unet_batches[1][2:]
        torch.testing.assert_close(loss_train, model.shared_step(train_batch, torch.Generator().manual_seed(5))[0])
        torch.testing.assert_close(loss_reg, model.shared_step(reg_batch, torch.Generator().manual_seed(6))[0])


@pytest.mark.parametrize("cond_stage_trainable,unfreeze_model", [(False, True), (True, True), (False, False)])
def test_frozen_parts_stay_bit_identical(cond_stage_trainable, unfreeze_model):
    model = _dreambooth_model(cond_stage_trainable=cond_stage_trainable, unfreeze_model=unfreeze_model)
    parts = {"vae": model.first_stage_model, "text": model.cond_stage_model, "unet": model.model}
    before = {name: [p.detach().clone() for p in part.parameters()] for name, part in parts.items()}
    params = model.trainable_parameters()
    if not params:
        with pytest.raises(ValueError, match="nothing to train"):
            model.configure_optimizers()
        params = [model.logvar.requires_grad_(True)]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(2):
        loss, _ = model.shared_step(_batch(step), torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expect_change = {"vae": False, "text": cond_stage_trainable, "unet": unfreeze_model}
    for name, part in parts.items():
        same = all(torch.equal(a, b) for a, b in zip(before[name], part.parameters()))
        assert same != expect_change[name], name
    assert not model.first_stage_model.training


def test_joint_dropout_rates():
    drop_text, drop_image = JointDropout().masks(200_000, torch.Generator().manual_seed(0))
    text_only = (drop_text & ~drop_image).float().mean()
    both = (drop_text & drop_image).float().mean()
    image_only = (~drop_text & drop_image).float().mean()
    for value in (text_only, both, image_only):
        assert abs(float(value) - 0.05) < 0.003
    none = JointDropout(0, 0, 0).masks(1000)
    assert not none[0].any() and not none[1].any()
    with pytest.raises(ValueError):
        JointDropout(0.5, 0.4, 0.2)


class _FixedMasks:
    """A dropout policy returning given masks; `calls` records the batch sizes it was asked for."""

    def __init__(self, drop_text: list[bool], drop_image: list[bool]) -> None:
        self.drop_text, self.drop_image = torch.tensor(drop_text), torch.tensor(drop_image)
        self.calls: list[int] = []

    def masks(self, batch_size, generator=None):
        self.calls.append(batch_size)
        return self.drop_text.clone(), self.drop_image.clone()


class _RecordedMasks:
    """The real JointDropout draw, with every returned pair of masks recorded."""

    def __init__(self, policy: JointDropout) -> None:
        self.policy = policy
        self.drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def masks(self, batch_size, generator=None):
        drop_text, drop_image = self.policy.masks(batch_size, generator)
        self.drawn.append((drop_text.clone(), drop_image.clone()))
        return drop_text, drop_image


def _unet_inputs(model, batch, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Run shared_step; return what reached the UNet: its input x (B, 4 + 4, h, w) and its context (B, L, D)."""
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0].detach().clone(), kwargs["context"].detach().clone()))

    handle = model.model.diffusion_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.shared_step(batch, generator)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _dropout_batch(captions: list[str]) -> dict:
    batch = _batch(7, batch_size=len(captions), size=32)
    batch["caption"] = captions
    return batch


def _assert_wiring(model, batch, drop_text, drop_image, x, context) -> None:
    """Per sample: dropped text is encoder(""), dropped image a zero latent; kept ones are the sample's own."""
    with torch.no_grad():
        own_text = model.get_learned_conditioning(batch["caption"])  # (B, L, D)
        null_text = model.get_learned_conditioning([""])[0]  # (L, D)
        own_image = model.encode_first_stage(batch["c_concat"]).mode()  # (B, 4, h, w), unscaled
    assert x.shape[1] == 8 and context.shape == own_text.shape
    for i in range(len(batch["caption"])):
        expected_text = null_text if drop_text[i] else own_text[i]
        assert torch.equal(context[i], expected_text), (i, bool(drop_text[i]))
        image = x[i, 4:]
        if drop_image[i]:
            assert torch.equal(image, torch.zeros_like(image)), i
        else:
            assert torch.equal(image, own_image[i]), i
        assert x[i, :4].abs().max() > 0  # the noisy target is there, untouched by the masks


def test_dropout_masks_reach_the_unet_per_sample():
    """Known masks covering the four cases: what the UNet receives follows them sample by sample."""
    model = _dreambooth_model(cond_stage_trainable=False)
    captions = ["replace the wolf with a sks dog", "make it snow", "turn the wolf into a cat", "add a red hat"]
    batch = _dropout_batch(captions)
    drop_text, drop_image = [False, True, False, True], [False, False, True, True]  # none, text, image, both
    model.conditioning_dropout = _FixedMasks(drop_text, drop_image)
    with torch.no_grad():
        # The check can only tell the cases apart if texts, the null text and the images all differ.
        own_text = model.get_learned_conditioning(captions)
        null_text = model.get_learned_conditioning([""])[0]
        own_image = model.encode_first_stage(batch["c_concat"]).mode()
    for i in range(4):
        assert not torch.equal(own_text[i], null_text) and own_image[i].abs().max() > 0
        for j in range(i):
            assert not torch.equal(own_text[i], own_text[j]) and not torch.equal(own_image[i], own_image[j])
    x, context = _unet_inputs(model, batch, torch.Generator().manual_seed(0))
    assert model.conditioning_dropout.calls == [4]
    _assert_wiring(model, batch, drop_text, drop_image, x, context)


def test_drawn_dropout_masks_reach_the_unet():
    """The real JointDropout draw inside shared_step (high rates, several steps) is what the UNet sees."""
    model = _dreambooth_model(cond_stage_trainable=False)
    captions = [f"replace the wolf with a sks dog number {i}" for i in range(6)]
    batch = _dropout_batch(captions)
    model.conditioning_dropout = _RecordedMasks(JointDropout(text=0.25, both=0.25, image=0.25))
    cases = set()
    for seed in range(4):
        x, context = _unet_inputs(model, batch, torch.Generator().manual_seed(seed))
        drop_text, drop_image = model.conditioning_dropout.drawn[-1]
        _assert_wiring(model, batch, drop_text, drop_image, x, context)
        cases |= {(bool(t), bool(m)) for t, m in zip(drop_text, drop_image)}
    assert len(model.conditioning_dropout.drawn) == 4
    assert cases == {(False, False), (True, False), (True, True), (False, True)}


def test_optimizer_scheduler_and_ema_update():
    """AdamW on the trainable parts, a per-step LambdaLR from scheduler_config, and the EMA tracking the UNet."""
    scheduler = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                 "params": {"warm_up_steps": [10], "cycle_lengths": [100], "f_start": [0.1], "f_max": [1.0],
                            "f_min": [0.0]}}
    model = _dreambooth_model(use_ema=True, load_ema=False, scheduler_config=scheduler, cond_stage_trainable=False,
                              learning_rate=1e-3)
    config = model.configure_optimizers()
    optimizer, lr_config = config["optimizer"], config["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and lr_config["interval"] == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)  # warm-up starts at f_start
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(p.numel() for p in model.model.parameters())
    shadow = model.model_ema.diffusion_modelout2weight.clone()
    loss, _ = model.shared_step(_batch(0, size=32), torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    lr_config["scheduler"].step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (0.1 + 0.9 / 10))
    model.on_train_batch_end(None, None, 0)
    updated = model.model_ema.diffusion_modelout2weight
    assert not torch.equal(updated, shadow) and not torch.equal(updated, model.model.diffusion_model.out[2].weight)


def test_mixed_precision_training_step_runs():
    """bf16 autocast (Lightning's bf16-mixed on CPU) gives a finite loss and fp32 gradients."""
    model = _dreambooth_model(cond_stage_trainable=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.shared_step(_batch(0, size=32), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


@pytest.mark.slow  # torch.compile of even the tiny UNet takes ~30-60 s on a CPU
def test_compile_flag_trains_with_unchanged_checkpoint_keys(workspace, straight_run):
    run_main(workspace, *base_args(workspace), "-t", "-n", "compiled", "--max_steps", "2", "--compile", NO_IMAGES)
    compiled = read_checkpoint(run_dir(workspace, "compiled") / "checkpoints" / "last.ckpt")["state_dict"]
    eager = read_checkpoint(straight_run / "checkpoints" / "last.ckpt")["state_dict"]
    assert compiled.keys() == eager.keys()  # no _orig_mod. prefix: exports and resumes keep the original names
