"""Schedule buffers (against closed forms and diffusers' scheduler), LitEma, LambdaLinearScheduler, config plumbing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.lr_scheduler import LambdaLinearScheduler
from ldm.models.diffusion import schedule as sched
from ldm.modules.ema import LitEma
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config


def test_scaled_linear_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ours = sched.schedule_buffers(sched.make_beta_schedule("linear", 1000, 0.00085, 0.012))
    torch.testing.assert_close(ours["betas"].float(), ref.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours["alphas_cumprod"].float(), ref.alphas_cumprod, rtol=1e-5, atol=0)


def test_schedule_closed_forms():
    buffers = sched.schedule_buffers(sched.make_beta_schedule("linear", 50, 0.00085, 0.012))
    ac = buffers["alphas_cumprod"]
    assert buffers["betas"].dtype == torch.float64
    torch.testing.assert_close(buffers["alphas_cumprod_prev"][1:], ac[:-1])
    assert buffers["alphas_cumprod_prev"][0] == 1.0
    torch.testing.assert_close(buffers["sqrt_recipm1_alphas_cumprod"] ** 2, 1 / ac - 1)
    x0, eps, t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 10, 49])
    xt = sched.q_sample(x0, t, eps, buffers)
    torch.testing.assert_close(sched.predict_start_from_noise(xt, t, eps, buffers), x0)
    # Posterior mean coefficients of Ho et al. Eq. 7 recombine x_0 when x_t is noiseless-consistent.
    assert buffers["posterior_variance"][0] == 0 and torch.isfinite(buffers["posterior_log_variance_clipped"]).all()


def test_model_schedule_buffers_are_float32_copies():
    from ldm.models.diffusion.ddpm import DDPM

    class Holder(DDPM):
        pass

    unet = {"target": "torch.nn.Identity"}
    model = Holder(unet_config=unet, linear_start=0.00085, linear_end=0.012, use_ema=False)
    ref = sched.schedule_buffers(sched.make_beta_schedule("linear", 1000, 0.00085, 0.012))
    for name in sched.SCHEDULE_BUFFERS:
        buf = getattr(model, name)
        assert buf.dtype == torch.float32
        assert torch.equal(buf, ref[name].float()), name
    assert "lvlb_weights" not in model.state_dict()


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="quadratic"):
        sched.make_beta_schedule("quadratic", 10)


def test_lit_ema_names_and_update_rule():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    ema = LitEma(net, decay=0.9)
    assert list(ema.state_dict()) == ["decay", "num_updates", "0weight", "0bias", "1weight", "1bias"]
    assert ema.num_updates.dtype == torch.int32
    before = ema.state_dict()["0weight"].clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema(net)
    decay = min(0.9, (1 + 1) / (10 + 1))
    torch.testing.assert_close(ema.state_dict()["0weight"], before + (1 - decay) * 1.0)
    ema.store(net.parameters())
    ema.copy_to(net)
    torch.testing.assert_close(net[0].weight, ema.state_dict()["0weight"])
    ema.restore(net.parameters())
    torch.testing.assert_close(net[0].weight, before + 1.0)


def test_ema_scope_swaps_and_restores():
    from ldm.models.diffusion.ddpm import DDPM

    model = DDPM(unet_config={"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 2}})
    trained = model.model.diffusion_model.weight.detach().clone()
    with torch.no_grad():
        model.model_ema.diffusion_modelweight.fill_(3.0)
    with model.ema_scope():
        assert torch.all(model.model.diffusion_model.weight == 3.0)
    assert torch.equal(model.model.diffusion_model.weight, trained)


def test_lambda_linear_scheduler():
    constant = LambdaLinearScheduler([0], [1.0], [1.0], [1e-6], [10**13])
    assert constant(0) == 1.0 and constant(10**6) == 1.0
    warm = LambdaLinearScheduler([10], [0.0], [1.0], [0.0], [20])
    assert warm(5) == pytest.approx(0.5)
    assert warm(10) == pytest.approx(0.5)  # decays linearly from f_max over the cycle
    assert warm(19) == pytest.approx(0.05)


def test_get_obj_from_str_errors_name_the_target():
    assert get_obj_from_str("torch.nn.Identity") is nn.Identity
    with pytest.raises(ConfigError, match="no_such_module"):
        get_obj_from_str("ldm.no_such_module.Thing")
    with pytest.raises(ConfigError, match="NoSuchClass"):
        get_obj_from_str("torch.nn.NoSuchClass")


def test_instantiate_rejects_misspelled_param():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}})
    assert layer.out_features == 3
    with pytest.raises(ConfigError, match="out_featurez"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_featurez": 3}})
    with pytest.raises(ConfigError, match="target"):
        instantiate_from_config({"params": {}})
