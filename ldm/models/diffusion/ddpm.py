"""DDPM / LatentDiffusion: the facade that owns the weights under their CompVis names and delegates the math.

State-dict layout (the compatibility contract, DESIGN.md §2): the schedule buffers of `schedule.SCHEDULE_BUFFERS`,
``model.diffusion_model.*`` (UNet), ``model_ema.*`` (`LitEma`), ``first_stage_model.*`` (VAE) and
``cond_stage_model.*`` (text encoder), in that order. Schedule math lives in `schedule.py`, the UNet holder in
`wrapper.py`, the training hooks in `training.py`; nothing there adds keys.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.models.diffusion import schedule as sched
from ldm.models.diffusion.conditioning import JointDropout
from ldm.models.diffusion.training import LatentDiffusionTraining
from ldm.models.diffusion.wrapper import ConditioningKey, DiffusionWrapper
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config, report_legacy_param

logger = logging.getLogger(__name__)


class DDPM(pl.LightningModule):
    """Denoising diffusion model (Ho et al. 2020) with the CompVis constructor and buffer names.

    Subclasses build their other modules, then call `finish_init` (checkpoint load, EMA, freezing).

    Args:
        unet_config: ``target``/``params`` of the denoising network.
        timesteps, beta_schedule, linear_start, linear_end, cosine_s, given_betas, v_posterior: the noise schedule.
        use_ema: keep an EMA copy of the UNet as ``model_ema``.
        load_ema: with ``use_ema``, build the EMA before loading ``ckpt_path`` so the file's EMA weights load into
            it (InstructPix2Pix inference); otherwise the EMA starts from the loaded weights (fine-tuning).
        parameterization: what the network predicts, ``"eps"`` (SD v1) or ``"x0"``.
        init_from_ema: when loading ``ckpt_path``, take the UNet weights from the file's EMA copy.
        lora_config: train LoRA adapters instead of the UNet weights (`ldm.lora.LoraSettings`: ``rank``, ``alpha``,
            ``targets``, ``text_encoder``); the base weights stay frozen, an EMA tracks the adapters alone.
        optimizer: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes, 8-bit optimizer states).
        learning_rate: the optimizer's learning rate (``main.py``: ``base_learning_rate``, scaled by ``--scale_lr``).
        train_seed: the run's seed (``main.py --seed``); noise and timesteps derive from (seed, rank, step).
        channels_last: keep the UNet's weights in channels-last (NHWC) memory order, so convolutions run in it; the
            state dict is unchanged. On a 2-core CPU a ShapesWorld fine-tuning step is 4% faster with it
            (bench/bench_cpu_step.py, bench/RESULTS.md); off by default (not measured on GPUs). Known torch bug
            (2.13, CPU): GroupNorm's backward crashes with a segmentation fault when its channels-last input needs no
            gradient but its own weights do, i.e. when the UNet's first blocks are frozen and a later block trains.
            The training modes here (the whole UNet, LoRA adapters, the text encoder alone) never meet that case.
    """

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        timesteps: int = 1000,
        beta_schedule: sched.BetaSchedule = "linear",
        loss_type: Literal["l1", "l2"] = "l2",
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        load_only_unet: bool = False,
        monitor: str = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: ConditioningKey | None = None,
        parameterization: Literal["eps", "x0"] = "eps",
        scheduler_config: Mapping[str, Any] | None = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        load_ema: bool = True,
        init_from_ema: bool = False,
        unfreeze_model: bool = True,
        embedding_reg_weight: float | None = None,
        model_lr: float | None = None,
        lora_config: Mapping[str, Any] | None = None,
        optimizer: str = "adamw",
        learning_rate: float = 1.0e-4,
        train_seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        from ldm.lora import LoraSettings
        from ldm.optim import check_optimizer_name

        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization must be 'eps' or 'x0', got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        if use_positional_encodings:
            raise NotImplementedError("use_positional_encodings is not supported (no SD/IP2P config uses it)")
        owner = type(self).__name__
        report_legacy_param(owner, "embedding_reg_weight", embedding_reg_weight, "textual-inversion leftover")
        report_legacy_param(owner, "model_lr", model_lr, "textual-inversion leftover; base_learning_rate sets the LR")
        report_legacy_param(owner, "log_every_t", log_every_t, "sampling logs only", default=100)
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.monitor = monitor
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.log_every_t = log_every_t
        self.clip_denoised = clip_denoised
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.v_posterior = v_posterior
        self.scheduler_config = scheduler_config
        self.unfreeze_model = unfreeze_model
        self.lora = LoraSettings.from_config(lora_config)
        self.optimizer_name = check_optimizer_name(optimizer)
        self.base_checkpoint: dict[str, Any] = {}  # ckpt_path: path, sha256, EMA weights or not (for LoRA files)
        self.learning_rate = learning_rate
        self.train_seed = train_seed

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)  # load_state_dict copies into these strides
        self.use_ema = use_ema
        self.load_ema = load_ema
        if use_ema and load_ema and self.lora is None:
            self.model_ema = LitEma(self.model)

        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.logvar = logvar
        self._ckpt_path = ckpt_path
        self._ignore_keys = tuple(ignore_keys)
        self._load_only_unet = load_only_unet
        self._init_from_ema = init_from_ema

    def finish_init(self) -> None:
        """Load ``ckpt_path``, add the LoRA adapters, and build the EMA from the loaded weights (or adapters)."""
        if self._ckpt_path:
            self.init_from_ckpt(self._ckpt_path, self._ignore_keys, only_model=self._load_only_unet)
        if self.lora is not None:
            self.add_lora_adapters()
        if self.use_ema and (not self.load_ema or self.lora is not None):
            self.model_ema = LitEma(self.model)
        if not self.unfreeze_model and self.lora is None:
            self.model.eval()
            self.model.requires_grad_(False)

    def register_schedule(
        self,
        given_betas: Sequence[float] | None = None,
        beta_schedule: sched.BetaSchedule = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Compute the schedule in float64 and register it as float32 buffers under the CompVis names."""
        if given_betas is not None:
            betas = torch.as_tensor(given_betas, dtype=torch.float64)
        else:
            betas = sched.make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        buffers = sched.schedule_buffers(betas, self.v_posterior)
        for name in sched.SCHEDULE_BUFFERS:
            self.register_buffer(name, buffers[name].to(torch.float32))
        weights = sched.lvlb_weights(buffers, self.parameterization)
        self.register_buffer("lvlb_weights", weights.to(torch.float32), persistent=False)

    def schedule(self) -> dict[str, torch.Tensor]:
        """The schedule buffers as a dict (for the pure functions of `schedule.py`)."""
        return {name: getattr(self, name) for name in sched.SCHEDULE_BUFFERS}

    def ckpt_migrations(self) -> list[str]:
        """Optional migrations of `ldm.checkpoint` applied when loading ``ckpt_path``."""
        return ["use_ema_weights"] if self._init_from_ema else []

    def ignorable_keys(self) -> list[str]:
        """Regexes of checkpoint keys this model may meet and legitimately not use."""
        if not self.use_ema or not self.load_ema or self.lora is not None:
            return [r"^model_ema\."]  # no EMA here, or the EMA is rebuilt from the loaded weights (or adapters)
        return []

    def add_lora_adapters(self) -> None:
        """LoRA adapters on the UNet (`ldm.lora.add_adapters`); every other UNet weight is frozen."""
        from ldm.lora import add_adapters

        add_adapters(self.model.diffusion_model, self.lora.rank, self.lora.lora_alpha, self.lora.targets, "UNet")

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Load ``path`` strictly (after the named migrations of `ldm.checkpoint`); ``ignore_keys`` are prefixes."""
        from ldm.checkpoint import load_model_weights, load_state_dict_file

        state = load_state_dict_file(path)
        state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_keys))}
        target: nn.Module = self
        if only_model:
            state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            target = self.model
        load_model_weights(
            target, state, source=str(path), migrations=self.ckpt_migrations(), ignorable=self.ignorable_keys()
        )
        logger.info("restored %s from %s", type(target).__name__, path)
        if self.lora is not None:  # LoRA files name the weights they were trained on
            from ldm.fileio import sha256_file

            self.base_checkpoint = {"path": str(path), "sha256": sha256_file(path), "ema": self._init_from_ema}

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap the EMA weights into ``model`` (no-op without EMA)."""
        if not self.use_ema:
            yield
            return
        trained = [p for p in self.model.parameters() if p.requires_grad]  # what the EMA shadows (not a frozen base)
        self.model_ema.store(trained)
        self.model_ema.copy_to(self.model)
        if context is not None:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(trained)
            if context is not None:
                logger.info("%s: restored training weights", context)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) (Ho et al. Eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return sched.q_sample(x_start, t, noise, self.schedule())

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and ε (inverse of Ho et al. Eq. 4)."""
        return sched.predict_start_from_noise(x_t, t, noise, self.schedule())


class LatentDiffusion(LatentDiffusionTraining, DDPM):
    """Latent diffusion (Rombach et al. 2022): DDPM on VAE latents, conditioned through ``cond_stage_model``.

    Args:
        first_stage_config: the autoencoder (frozen, never trained here).
        cond_stage_config: the text encoder; ``cond_stage_trainable`` makes it train with the UNet.
        scale_factor: latents are multiplied by it after encoding (0.18215 for SD v1).
        conditioning_key: ``crossattn`` (SD v1 text-to-image) or ``hybrid`` (InstructPix2Pix: image latent
            concatenated to the input, text through cross-attention).
        reg_weight: DreamBooth prior-preservation weight λ in ``loss_train + λ·loss_reg``.
        reg_log_every: at ``reg_weight`` 0 the prior term is only logged; compute it on every N-th step (its UNet
            call is about a fifth of such a step on a CPU). The weights trained do not depend on it.
        conditioning_dropout: ``{text, both, image}`` probabilities of InstructPix2Pix's joint dropout during
            training (`conditioning.JointDropout`); default 5% each, as InstructPix2Pix was trained, so the
            unconditional branches that guidance uses at inference keep being trained; ``{}`` values of 0 disable it.
        frozen_dtype: ``fp16`` or ``bf16`` holds the frozen VAE (and a frozen text encoder's weights) in half
            precision: half their memory; inputs are cast to it and outputs back to float32. Applied on every device
            (on CPU, fp16 kernels are slow: prefer bf16 there).
    """

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any] | str,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: ConditioningKey | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        reg_weight: float = 1.0,
        reg_log_every: int = 1,
        conditioning_dropout: Mapping[str, float] | None = None,
        personalization_config: Mapping[str, Any] | None = None,
        frozen_dtype: str | None = None,
        **ddpm_kwargs: Any,
    ) -> None:
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        if scale_by_std:
            raise NotImplementedError("scale_by_std is not supported (SD v1 and InstructPix2Pix use a fixed scale)")
        if num_timesteps_cond not in (None, 1):
            raise NotImplementedError(f"num_timesteps_cond={num_timesteps_cond} (conditional schedule shortening)")
        _check_ddpm_kwargs(ddpm_kwargs)
        super().__init__(conditioning_key=conditioning_key, **ddpm_kwargs)
        report_legacy_param(type(self).__name__, "personalization_config", personalization_config,
                            "textual-inversion EmbeddingManager, never built by DreamBooth")
        self.num_timesteps_cond = 1
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_forward = cond_stage_forward
        self.scale_factor = float(scale_factor)
        self.reg_weight = float(reg_weight)
        if int(reg_log_every) < 1:
            raise ValueError(f"reg_log_every must be a positive number of steps, got {reg_log_every}")
        self.reg_log_every = int(reg_log_every)
        self.conditioning_dropout = JointDropout(**(conditioning_dropout or {}))
        self.frozen_dtype = None  # set below, once the weights are loaded in float32
        frozen = _half_dtype(frozen_dtype)
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.finish_init()
        self.frozen_dtype = frozen
        if self.frozen_dtype is not None:
            self.cast_frozen_parts(self.frozen_dtype)

    def instantiate_first_stage(self, config: Mapping[str, Any]) -> None:
        """Build the autoencoder, frozen and in eval mode for good."""
        model = instantiate_from_config(config)
        model.eval()
        model.requires_grad_(False)
        self.first_stage_model = model

    def instantiate_cond_stage(self, config: Mapping[str, Any] | str) -> None:
        """Build the conditioning encoder; frozen unless ``cond_stage_trainable``."""
        if config in ("__is_first_stage__", "__is_unconditional__"):
            raise NotImplementedError(f"cond_stage_config {config!r} (only a text encoder is supported)")
        if self.cond_stage_trainable:
            model = instantiate_from_config(config, **_trainable_kwargs(config))
        else:
            model = instantiate_from_config(config)
            model.eval()
            model.requires_grad_(False)
        self.cond_stage_model = model

    def add_lora_adapters(self) -> None:
        """LoRA on the UNet and, with ``lora_config.text_encoder``, on the text encoder; no other weight trains."""
        from ldm.lora import add_adapters

        super().add_lora_adapters()
        if self.lora.text_encoder:
            add_adapters(self.cond_stage_model, self.lora.rank, self.lora.lora_alpha, self.lora.text_encoder_targets,
                         "text encoder")
            return
        if self.cond_stage_trainable:
            logger.info("LoRA run: the text encoder stays frozen (lora_config.text_encoder adds adapters to it)")
        self.cond_stage_trainable = False
        self.cond_stage_model.eval()
        self.cond_stage_model.requires_grad_(False)

    def cast_frozen_parts(self, dtype: torch.dtype) -> None:
        """Hold the VAE, and the text encoder's frozen weights, in ``dtype`` (adapters, trained weights stay fp32)."""
        if dtype == torch.float16 and not torch.cuda.is_available():
            logger.warning("frozen_dtype fp16 without CUDA: CPU fp16 kernels are slow, bf16 is the CPU choice")
        self.first_stage_model.to(dtype)
        if self.cond_stage_trainable and not (self.lora is not None and self.lora.text_encoder):
            logger.info("frozen_dtype: the text encoder trains, so it stays in float32")
            return
        for param in self.cond_stage_model.parameters():
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(dtype)

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Switch training mode; the frozen parts (VAE, a frozen text encoder) always stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        if not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    def get_learned_conditioning(self, c: Sequence[str]) -> torch.Tensor:
        """Text → cross-attention context (B, L, D)."""
        if self.cond_stage_forward is not None:
            out = getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        else:
            out = self.cond_stage_model.encode(c)
        return out.float() if self.frozen_dtype is not None else out

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """Pixels in [-1, 1] (B, 3, H, W) → the posterior distribution (``.mode()``/``.sample()``), unscaled."""
        if self.frozen_dtype is None:
            return self.first_stage_model.encode(x)
        posterior = self.first_stage_model.encode(x.to(self.frozen_dtype))
        return DiagonalGaussianDistribution(posterior.parameters.float(), posterior.deterministic)

    def get_first_stage_encoding(self, posterior: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the posterior and apply ``scale_factor`` (the diffusion target's latent)."""
        if isinstance(posterior, torch.Tensor):
            z = posterior
        else:
            z = posterior.sample(generator=generator)
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 4, h, w) → pixels (B, 3, 8h, 8w) in about [-1, 1]."""
        if self.frozen_dtype is None:
            return self.first_stage_model.decode(z / self.scale_factor)
        return self.first_stage_model.decode((z / self.scale_factor).to(self.frozen_dtype)).float()

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Run the UNet; ``cond`` is a dict ``{"c_concat": [...], "c_crossattn": [...]}`` or a bare tensor."""
        if not isinstance(cond, Mapping):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        cond = {k: (v if isinstance(v, (list, tuple)) else [v]) for k, v in cond.items()}
        return self.model(x_noisy, t, **cond)

def _half_dtype(name: str | None) -> torch.dtype | None:
    """``frozen_dtype`` → torch dtype (None keeps float32)."""
    dtypes = {None: None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"frozen_dtype {name!r}: choose fp16, bf16 or leave it unset")
    return dtypes[name]


def _trainable_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Ask the encoder to stay trainable when its class supports a ``freeze`` switch."""
    cls = get_obj_from_str(config["target"])
    return {"freeze": False} if "freeze" in inspect.signature(cls).parameters else {}


def _check_ddpm_kwargs(kwargs: Mapping[str, Any]) -> None:
    """LatentDiffusion forwards ``**kwargs`` to DDPM: reject misspelled names here, naming them."""
    accepted = set(inspect.signature(DDPM.__init__).parameters) - {"self", "conditioning_key"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"LatentDiffusion: unknown parameter(s) {', '.join(unknown)} (DDPM accepts: {', '.join(sorted(accepted))})")
