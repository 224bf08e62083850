"""The CPU speed options: a channels-last UNet (``model.params.channels_last``) and torch's fused AdamW. Both must
compute what the plain model and the per-tensor AdamW compute; only the memory order and the kernel differ."""

from __future__ import annotations

import torch

from ldm.checkpoint import load_state_dict_file
from ldm.export import export_weights
from tests.test_train import _batch, _dreambooth_model


def _convs(model):
    return [m.weight for m in model.model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_unet_computes_the_same_and_exports_the_same_weights(tmp_path):
    plain = _dreambooth_model()
    fast = _dreambooth_model(channels_last=True)
    fast.load_state_dict(plain.state_dict())
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _convs(fast))
    assert not any(w.is_contiguous() for w in _convs(fast) if w.shape[-1] > 1)  # 1x1 kernels look the same in both
    assert all(w.is_contiguous() for w in _convs(plain))

    unet_plain, unet_fast = plain.model.diffusion_model, fast.model.diffusion_model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 8, generator=generator)
    t = torch.tensor([10, 900])
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(unet_fast(x, t, context=context), unet_plain(x, t, context=context),
                                   rtol=1e-5, atol=1e-5)

    # One training step each (same noise): the same loss and gradients (Adam's first step is about lr * sign(grad),
    # so the updated weights themselves are no fair comparison where a gradient is near 0).
    losses, grads = [], []
    for model in (plain, fast):
        optimizer = model.configure_optimizers()
        loss, _ = model.shared_step(_batch(0, size=32), torch.Generator().manual_seed(3))
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        optimizer.step()
    assert abs(losses[0] - losses[1]) < 1e-5
    assert len(grads[0]) == len(grads[1]) > 0
    scale = max(float(g.abs().max()) for g in grads[0])  # float32 summation order: errors scale with the largest
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5 * scale)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _convs(fast))  # the step kept the order

    path = export_weights(fast, tmp_path / "model.safetensors")
    exported = load_state_dict_file(path)
    assert exported.keys() == plain.state_dict().keys()
    for key, value in fast.state_dict().items():
        assert torch.equal(exported[key], value), key


def test_adamw_is_the_fused_kernel_on_cpu_and_steps_like_the_loop():
    model = _dreambooth_model()
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    loop = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in model.trainable_parameters()],
                             lr=optimizer.defaults["lr"], foreach=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for fused_param, loop_param in zip(model.trainable_parameters(), loop.param_groups[0]["params"]):
            grad = torch.randn(fused_param.shape, generator=generator)
            fused_param.grad, loop_param.grad = grad, grad.clone()
        optimizer.step()
        loop.step()
    for fused_param, loop_param in zip(model.trainable_parameters(), loop.param_groups[0]["params"]):
        torch.testing.assert_close(fused_param, loop_param, rtol=1e-5, atol=1e-7)
