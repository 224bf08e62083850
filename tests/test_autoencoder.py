"""KL autoencoder (first stage): checkpoint key layout, parity with diffusers, the posterior distribution."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl
from ldm.util import instantiate_from_config
from tests.reference import manifest, manifest_entries, reference_config

PREFIX = "first_stage_model."
IDENTITY_LOSS = {"target": "torch.nn.Identity"}

# f = 8 with attention at the 16x16 level (encoder down.2, decoder up.2) besides the mid-block attention.
TINY_F8_ATTN: dict[str, Any] = dict(
    double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)  # fmt: skip
# f = 4, two blocks per level (nin_shortcut at the channel changes), mid-block attention only.
TINY_F4: dict[str, Any] = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)  # fmt: skip


def tiny_vae(ddconfig: dict[str, Any], embed_dim: int = 4) -> AutoencoderKL:
    """A tiny VAE in eval mode whose GroupNorm affines are random too (convs keep their random init)."""
    model = AutoencoderKL(ddconfig=ddconfig, lossconfig=IDENTITY_LOSS, embed_dim=embed_dim).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| (Frobenius norms)."""
    return ((ours - ref).norm() / ref.norm()).item()


def first_stage_config(ddconfig: dict[str, Any]) -> dict[str, Any]:
    """The slice of an original LatentDiffusion config that diffusers' VAE converter reads."""
    ae_params = {"embed_dim": ddconfig["z_channels"], "ddconfig": ddconfig, "lossconfig": IDENTITY_LOSS}
    return {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": {"params": ae_params}}}}


_LEVEL_ATTN = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$")
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def to_diffusers(model: AutoencoderKL, ddconfig: dict[str, Any]) -> torch.nn.Module:
    """diffusers' AutoencoderKL with ``model``'s weights, converted by diffusers' own single-file converter.

    diffusers' converter knows only the mid-block attention; per-level attention (``down.i.attn.j``,
    ``up.i.attn.j``) maps onto its Attn*Block2D types, whose 10 keys per block are renamed here.
    """
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    level_attn = {k: v for k, v in state.items() if _LEVEL_ATTN.match(k)}
    checkpoint = {PREFIX + k: v for k, v in state.items() if k not in level_attn}

    config = create_vae_diffusers_config_from_ldm(copy.deepcopy(first_stage_config(ddconfig)), dict(checkpoint))
    converted = convert_ldm_vae_checkpoint(dict(checkpoint), config)

    n_levels = len(ddconfig["ch_mult"])
    for key, value in level_attn.items():
        side, level, index, name, kind = _LEVEL_ATTN.match(key).groups()
        if side == "encoder.down":
            config["down_block_types"][int(level)] = "AttnDownEncoderBlock2D"
            block = f"encoder.down_blocks.{level}"
        else:  # decoder.up.i is diffusers' up_blocks[n - 1 - i]
            config["up_block_types"][n_levels - 1 - int(level)] = "AttnUpDecoderBlock2D"
            block = f"decoder.up_blocks.{n_levels - 1 - int(level)}"
        weight = value.flatten(1) if value.ndim == 4 else value  # 1x1 conv -> linear
        converted[f"{block}.attentions.{index}.{_ATTN_NAMES[name]}.{kind}"] = weight

    reference = DiffusersAutoencoderKL(**config).eval()
    reference.load_state_dict(converted, strict=True)
    return reference


# fp32 differences are rounding only: with batch > 1, diffusers' attention output is a channels-last view, so
# every conv after its mid-block attention runs oneDNN's NHWC kernels. fp64 shows the math is the same.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def assert_parity(
    model: AutoencoderKL, reference: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype = torch.float32
) -> None:
    """Same posterior moments and same decoded images as diffusers, to the rounding of ``dtype``."""
    model, reference, images = model.to(dtype), reference.to(dtype=dtype), images.to(dtype)
    tolerance = TOLERANCE[dtype]
    with torch.no_grad():
        posterior = model.encode(images)
        ref_posterior = reference.encode(images).latent_dist
        assert rel_err(posterior.mean, ref_posterior.mean) <= tolerance
        assert rel_err(posterior.logvar, ref_posterior.logvar) <= tolerance
        latents = torch.randn_like(posterior.mean)
        decoded = model.decode(latents)
        assert decoded.shape == images.shape
        assert rel_err(decoded, reference.decode(latents).sample) <= tolerance


# (a) checkpoint layout -------------------------------------------------------------------------------------


def test_full_size_keys_match_ip2p_checkpoint() -> None:
    cfg = reference_config("ip2p-generate.yaml").model.params.first_stage_config
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    assert isinstance(model, AutoencoderKL)
    expected = [(e["key"].removeprefix(PREFIX), e["shape"]) for e in manifest_entries("ip2p", "vae")]
    assert len(expected) == manifest("ip2p")["groups"]["vae"]["keys"] == 248
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == expected
    assert sum(p.numel() for p in model.parameters()) == manifest("ip2p")["groups"]["vae"]["numel"]


def test_level_attention_placement() -> None:
    keys = tiny_vae(TINY_F8_ATTN).state_dict().keys()
    attn_levels = {re.match(r"(encoder\.down|decoder\.up)\.(\d)\.attn", k).group(0) for k in keys if ".attn." in k}
    assert attn_levels == {"encoder.down.2.attn", "decoder.up.2.attn"}
    assert "decoder.up.2.attn.1.q.weight" in keys  # one per decoder block: num_res_blocks + 1
    assert "encoder.down.3.downsample.conv.weight" not in keys and "decoder.up.0.upsample.conv.weight" not in keys


# (b) parity with diffusers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("ddconfig", [TINY_F8_ATTN, TINY_F4], ids=["f8-attn16", "f4"])
def test_parity_with_diffusers(ddconfig: dict[str, Any], dtype: torch.dtype) -> None:
    model = tiny_vae(ddconfig)
    reference = to_diffusers(model, ddconfig)
    images = torch.rand(2, 3, 32, 48) * 2 - 1  # non-square to catch H/W mix-ups in the attention
    assert_parity(model, reference, images, dtype)


@pytest.mark.slow
def test_full_size_parity_with_diffusers() -> None:
    params = reference_config("ip2p-generate.yaml").model.params.first_stage_config.params
    cfg = OmegaConf.to_container(params.ddconfig)
    model = tiny_vae(cfg, embed_dim=params.embed_dim)
    reference = to_diffusers(model, cfg)
    assert_parity(model, reference, torch.rand(1, 3, 64, 64) * 2 - 1, torch.float32)
    assert_parity(model, reference, torch.rand(2, 3, 64, 64) * 2 - 1, torch.float64)


# model behaviour and config errors -------------------------------------------------------------------------


def test_forward_samples_with_generator() -> None:
    model = tiny_vae(TINY_F4)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dec_a, posterior = model(images, generator=torch.Generator().manual_seed(7))
        dec_b, _ = model(images, generator=torch.Generator().manual_seed(7))
        dec_mode, _ = model(images, sample_posterior=False)
        assert torch.equal(dec_a, dec_b)
        assert torch.equal(dec_mode, model.decode(posterior.mode()))
        assert not torch.allclose(dec_a, dec_mode)
    assert posterior.mean.shape == (2, 4, 4, 4)


def test_decoder_flags() -> None:
    kwargs = {k: v for k, v in TINY_F4.items() if k != "double_z"}
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        pre_end = Decoder(**kwargs, give_pre_end=True)(z)
        bounded = Decoder(**kwargs, tanh_out=True)(z * 100)
    assert pre_end.shape == (1, 32, 16, 16)
    assert bounded.abs().max() <= 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [({"use_linear_attn": True}, "use_linear_attn"), ({"attn_type": "linear"}, "'linear'")],
)
def test_unsupported_attention_is_an_error(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Encoder(**TINY_F4, **override)


def test_unknown_ddconfig_key_is_named() -> None:
    with pytest.raises(ValueError, match="num_res_block\\b"):
        AutoencoderKL(ddconfig={**TINY_F4, "num_res_block": 2}, lossconfig=IDENTITY_LOSS, embed_dim=4)


# (c) the posterior distribution ----------------------------------------------------------------------------


def test_distribution_moments_and_mode() -> None:
    parameters = torch.randn(3, 8, 5, 6)
    dist = DiagonalGaussianDistribution(parameters)
    assert torch.equal(dist.mode(), parameters[:, :4]) and torch.equal(dist.mean, parameters[:, :4])
    assert torch.equal(dist.logvar, parameters[:, 4:])
    torch.testing.assert_close(dist.std, torch.exp(0.5 * parameters[:, 4:]))
    torch.testing.assert_close(dist.var, torch.exp(parameters[:, 4:]))


def test_distribution_sample_is_seeded() -> None:
    dist = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    first = dist.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, dist.sample(generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, dist.sample(generator=torch.Generator().manual_seed(4)))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, dist.mean + dist.std * noise)


def test_distribution_kl_and_nll_closed_form() -> None:
    p = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    q = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    normal = torch.distributions.Normal
    p_ref, q_ref = normal(p.mean, p.std), normal(q.mean, q.std)
    standard = normal(torch.zeros_like(p.mean), torch.ones_like(p.std))
    dims = (1, 2, 3)
    torch.testing.assert_close(p.kl(), torch.distributions.kl_divergence(p_ref, standard).sum(dims))
    torch.testing.assert_close(p.kl(q), torch.distributions.kl_divergence(p_ref, q_ref).sum(dims))
    x = torch.randn_like(p.mean)
    torch.testing.assert_close(p.nll(x), -p_ref.log_prob(x).sum(dims))
    torch.testing.assert_close(
        normal_kl(p.mean, p.logvar, 0.0, 0.0), torch.distributions.kl_divergence(p_ref, standard)
    )


def test_distribution_logvar_clamp_and_deterministic() -> None:
    mean = torch.randn(1, 2, 2, 2)
    logvar = torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert dist.logvar[:, 0].eq(-30.0).all() and dist.logvar[:, 1].eq(20.0).all()
    torch.testing.assert_close(dist.std[:, 1], torch.full_like(dist.std[:, 1], torch.exp(torch.tensor(10.0)).item()))
    frozen = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1), deterministic=True)
    assert torch.equal(frozen.sample(), mean)
    assert torch.equal(frozen.kl(), torch.zeros(1))


# (d) identity first stage and checkpoint loading -----------------------------------------------------------


def test_identity_first_stage_round_trip() -> None:
    stage = instantiate_from_config({"target": "ldm.models.autoencoder.IdentityFirstStage"})
    x = torch.randn(2, 3, 8, 8)
    posterior = stage.encode(x)
    assert posterior.mode() is x and posterior.sample() is x
    assert stage.decode(posterior.mode()) is x and stage(x) is x
    assert stage.quantize(x) is x
    assert IdentityFirstStage(vq_interface=True).quantize(x) == (x, None, (None, None, None))
    assert not list(stage.state_dict())


def test_missing_ckpt_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-vae.ckpt"
    with pytest.raises(FileNotFoundError, match="no-such-vae.ckpt"):
        AutoencoderKL(ddconfig=TINY_F4, lossconfig=IDENTITY_LOSS, embed_dim=4, ckpt_path=str(missing))


def test_ckpt_path_loads_strictly_after_ignore_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = tiny_vae(TINY_F4)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "vae.safetensors"
    save_file({**state, "loss.logvar": torch.zeros(())}, str(path))

    loaded = AutoencoderKL(
        ddconfig=TINY_F4, lossconfig=IDENTITY_LOSS, embed_dim=4, ckpt_path=str(path), ignore_keys=["loss."]
    )
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(RuntimeError, match="loss.logvar"):
        AutoencoderKL(ddconfig=TINY_F4, lossconfig=IDENTITY_LOSS, embed_dim=4, ckpt_path=str(path))
