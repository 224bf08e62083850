"""The SD v1 / InstructPix2Pix UNet: checkpoint key layout, parity with diffusers, checkpointing, init."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample, UNetModel
from ldm.modules.diffusionmodules.util import checkpoint, timestep_embedding
from ldm.util import instantiate_from_config
from tests.reference import manifest_entries, reference_config

PREFIX = "model.diffusion_model."

TINY = dict(
    image_size=32,
    in_channels=8,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    use_checkpoint=False,
    legacy=False,
)
# Three levels, attention at the first and last, fixed head width, two transformer layers, legacy rules.
TINY_HEAD_CHANNELS = dict(
    TINY,
    attention_resolutions=[1, 4],
    num_res_blocks=2,
    channel_mult=[1, 2, 2],
    num_heads=-1,
    num_head_channels=16,
    transformer_depth=2,
    context_dim=24,
    legacy=True,
)
# Class-conditional, scale-shift norm, 4 heads at every level.
TINY_CLASSES = dict(
    TINY,
    attention_resolutions=[1, 2],
    channel_mult=[1, 1],
    num_heads=4,
    num_classes=5,
    use_scale_shift_norm=True,
    use_checkpoint=True,
)


def reference_unet_entries(manifest: str) -> list[tuple[str, list[int]]]:
    """(key without the LatentDiffusion prefix, shape) of the manifest's ``unet`` group, in order."""
    unet = [(e["key"], e["shape"]) for e in manifest_entries(manifest, "unet")]
    assert all(key.startswith(PREFIX) for key, _ in unet)
    return [(key[len(PREFIX) :], shape) for key, shape in unet]


@pytest.mark.parametrize(("config", "manifest"), [("ip2p-generate.yaml", "ip2p"), ("sd-v1-inference.yaml", "sd_v1")])
def test_full_size_keys_match_released_checkpoint(config: str, manifest: str) -> None:
    unet_config = reference_config(config).model.params.unet_config
    with torch.device("meta"):
        model = instantiate_from_config(unet_config)
    ours = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    reference = reference_unet_entries(manifest)
    assert len(ours) == len(reference) == 686
    assert ours == reference


def randomize(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Give every parameter non-zero noise (zero-initialised layers included) so outputs are non-trivial."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, scale)
            else:
                p.add_(torch.randn_like(p) * scale)
    return model


def diffusers_twin(model: UNetModel, params: dict[str, Any]) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel loaded strictly from ``model``'s original-layout state dict."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    checkpoint_sd = {PREFIX + key: value for key, value in model.state_dict().items()}
    converter_params = {k: v for k, v in params.items() if not (k == "num_heads" and v == -1)}
    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": converter_params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # image_size is deprecated there; passing it avoids a guess
        config = create_unet_diffusers_config_from_ldm(original_config, checkpoint_sd, image_size=256)
    # The converter knows SD1 head counts and SD2 linear projections only; fill in the other CompVis options.
    if params.get("num_head_channels", -1) != -1:
        head_channels = params["num_head_channels"]
        config["attention_head_dim"] = [params["model_channels"] * m // head_channels for m in params["channel_mult"]]
    if params.get("use_scale_shift_norm"):
        config["resnet_time_scale_shift"] = "scale_shift"
    converted = convert_ldm_unet_checkpoint(dict(checkpoint_sd), config)
    with torch.device("meta"):
        twin = UNet2DConditionModel(**config)
    twin.load_state_dict(converted, strict=True, assign=True)
    return twin.eval()


def norm_signature(model: torch.nn.Module) -> list[tuple]:
    """Sorted (kind, groups, width, eps) of every normalisation layer: eps is too small for outputs to reveal."""
    signature = []
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            signature.append(("group", module.num_groups, module.num_channels, module.eps))
        elif isinstance(module, torch.nn.LayerNorm):
            signature.append(("layer", 1, module.normalized_shape[0], module.eps))
    return sorted(signature)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("params", [TINY, TINY_HEAD_CHANNELS, TINY_CLASSES], ids=["heads", "head_channels", "classes"])
def test_tiny_unet_matches_diffusers(params: dict[str, Any]) -> None:
    model = randomize(UNetModel(**params)).eval()
    twin = diffusers_twin(model, params)
    batch = 3
    x = torch.randn(batch, 8, 16, 16)
    t = torch.tensor([0, 417, 999])
    context = torch.randn(batch, 7, params["context_dim"])
    y = torch.tensor([0, 4, 2]) if params.get("num_classes") else None
    with torch.no_grad():
        ours = model(x, t, context, y=y)
        reference = twin(x, t, context, class_labels=y).sample
    assert ours.shape == (batch, 4, 16, 16)
    assert reference.abs().max() > 0.1
    assert norm_signature(model) == norm_signature(twin)
    assert relative_error(ours, reference) <= 1e-5


@pytest.mark.slow
def test_full_size_ip2p_unet_matches_diffusers() -> None:
    params = OmegaConf.to_container(reference_config("ip2p-generate.yaml").model.params.unet_config.params)
    model = UNetModel(**params).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    twin = diffusers_twin(model, params)
    x = torch.randn(2, 8, 8, 8)
    t = torch.tensor([3, 801])
    context = torch.randn(2, 77, 768)
    with torch.no_grad():
        ours = model(x, t, context)
        reference = twin(x, t, context).sample
    assert reference.abs().max() > 0.1
    assert relative_error(ours, reference) <= 1e-5


def test_timestep_embedding_is_cos_then_sin() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    for dim in (32, 33):
        ours = timestep_embedding(t, dim)
        reference = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    embedding = timestep_embedding(t, 32)
    torch.testing.assert_close(embedding[:, 0], t.cos())  # first frequency is 1: cos(t) comes first ...
    torch.testing.assert_close(embedding[:, 16], t.sin())  # ... then sin(t)
    assert torch.equal(timestep_embedding(t, 5, repeat_only=True), t[:, None].expand(4, 5))


def test_fresh_model_outputs_exactly_zero() -> None:
    model = UNetModel(**TINY)
    out = model(torch.randn(2, 8, 8, 8), torch.tensor([1, 500]), torch.randn(2, 5, 32))
    assert out.shape == (2, 4, 8, 8)
    assert torch.count_nonzero(out) == 0
    assert all(not module.proj_out.weight.any() for module in model.modules() if isinstance(module, SpatialTransformer))
    assert all(not module.out_layers[-1].weight.any() for module in model.modules() if isinstance(module, ResBlock))


def saved_tensor_count(fn: Any) -> tuple[Any, int]:
    """Run ``fn`` and count the tensors autograd saves for the backward pass."""
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, count


def test_use_checkpoint_gives_same_outputs_and_gradients() -> None:
    params = dict(TINY, dropout=0.1)  # dropout: recomputation must replay the same random masks
    plain = randomize(UNetModel(**params)).train()
    checkpointed = UNetModel(**dict(params, use_checkpoint=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 8, 8)
    t = torch.tensor([5, 600])
    context = torch.randn(2, 6, 32)

    results = []
    for model in (plain, checkpointed):
        x_in = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        out, saved = saved_tensor_count(lambda: model(x_in, t, context))
        out.square().mean().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((out.detach(), x_in.grad, grads, saved))

    (out_a, gx_a, grads_a, saved_a), (out_b, gx_b, grads_b, saved_b) = results
    assert saved_b < saved_a / 2  # activations inside ResBlocks and transformer blocks are not stored
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(gx_b, gx_a, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert grad is not None and grads_b[name] is not None, name
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_wrapper_runs_plainly_without_grad() -> None:
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.no_grad():
        out = checkpoint(layer, (x,), layer.parameters(), True)
    torch.testing.assert_close(out, layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_runs_and_stays_close(dtype: torch.dtype) -> None:
    model = randomize(UNetModel(**TINY)).eval()
    x = torch.randn(2, 8, 8, 8)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        reference = model(x, t, context)
        low = copy.deepcopy(model).to(dtype)(x.to(dtype), t, context.to(dtype))
        mixed = model(x.to(dtype), t, context)  # fp32 weights, low-precision input: output in the input's dtype
    assert low.dtype == dtype and mixed.dtype == dtype
    assert relative_error(low.float(), reference) < 0.05
    assert relative_error(mixed.float(), reference) < 0.01


def test_autocast_bfloat16() -> None:
    model = randomize(UNetModel(**TINY)).eval()
    x = torch.randn(2, 8, 8, 8)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        reference = model(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, context)
    assert out.dtype == torch.float32
    assert relative_error(out, reference) < 0.05


@pytest.mark.gpu
def test_cuda_float16_stays_close_to_cpu_float32() -> None:
    model = randomize(UNetModel(**TINY)).eval()
    x = torch.randn(2, 8, 8, 8)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        reference = model(x, t, context)
        model = model.to("cuda", torch.float16)
        out = model(x.to("cuda", torch.float16), t.to("cuda"), context.to("cuda", torch.float16))
    assert out.dtype == torch.float16 and out.device.type == "cuda"
    assert relative_error(out.float().cpu(), reference) < 0.02


def test_scalar_timestep_is_broadcast() -> None:
    model = randomize(UNetModel(**TINY)).eval()
    x = torch.randn(2, 8, 8, 8)
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(42), context), model(x, torch.tensor([42, 42]), context))


def test_spatial_transformer_returns_contiguous_nchw() -> None:
    # A channels-last view leaking out of the transformer would switch every later conv to another,
    # slower CPU kernel (and copy its weight on each call).
    block = SpatialTransformer(64, 4, 16, context_dim=32)
    out = block(torch.randn(2, 64, 4, 6), torch.randn(2, 3, 32))
    assert out.shape == (2, 64, 4, 6)
    assert out.is_contiguous()


def test_conv_resample_false_uses_parameter_free_resampling() -> None:
    model = UNetModel(**dict(TINY, conv_resample=False))
    resamplers = [m for m in model.modules() if isinstance(m, (Downsample, Upsample))]
    assert len(resamplers) == 2 and all(not list(m.parameters()) for m in resamplers)
    out = model(torch.randn(1, 8, 8, 8), torch.tensor([3]), torch.randn(1, 4, 32))
    assert out.shape == (1, 4, 8, 8)


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"use_spatial_transformer": False}, "use_spatial_transformer"),
        ({"resblock_updown": True}, "resblock_updown"),
        ({"n_embed": 16}, "n_embed"),
        ({"use_fp16": True}, "use_fp16"),
        ({"dims": 3}, "dims"),
    ],
)
def test_unsupported_options_raise_naming_the_parameter(override: dict[str, Any], name: str) -> None:
    with pytest.raises(NotImplementedError, match=name):
        UNetModel(**dict(TINY, **override))


def test_invalid_arguments_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(**dict(TINY, context_dim=None))
    with pytest.raises(ValueError, match="num_heads"):
        UNetModel(**dict(TINY, num_heads=-1))
    with pytest.raises(ValueError, match="num_classes"):
        UNetModel(**TINY)(torch.randn(1, 8, 8, 8), torch.tensor([1]), torch.randn(1, 4, 32), y=torch.tensor([0]))
