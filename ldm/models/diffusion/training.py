"""The training half of `LatentDiffusion`: steps, losses and logs, RNG and LoRA state in checkpoints, optimizers.

A mixin of the LightningModule hooks, kept apart from the model facade (`ddpm.py`): it adds no weights, so the
state-dict keys stay those of `ddpm.py`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ldm import rng
from ldm.models.diffusion.conditioning import hybrid_conditioning, mask_image, mask_text
from ldm.models.diffusion.losses import diffusion_loss, prior_preservation_loss
from ldm.util import instantiate_from_config


class LatentDiffusionTraining:
    """Training, validation and optimizer hooks of `ldm.models.diffusion.ddpm.LatentDiffusion`."""

    def step_generator(self, batch_idx: int, salt: int = 0) -> torch.Generator:
        """CPU generator for this step's timesteps, noise and dropout: a function of (seed, rank, step, batch).

        Being stateless, it makes resumed runs draw exactly what an uninterrupted run draws, and DDP ranks draw
        different samples (the original seeded every rank identically).
        """
        step = self.global_step if self._trainer is not None else 0
        rank = self.global_rank if self._trainer is not None else 0
        seed = (((self.train_seed * 1_000_003 + step) * 1009 + batch_idx) * 101 + rank) * 7 + salt
        return torch.Generator().manual_seed(seed % (2**63))

    def get_input(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """Split a batch into the target pixels (B, 3, H, W), the captions and the input-image pixels.

        Accepts the seed's layout (``image``/``caption``/``c_concat``) and InstructPix2Pix's nested one
        (``edited`` and ``edit: {c_crossattn, c_concat}``); HWC tensors are transposed to CHW.
        """
        target = _to_chw(batch[self.first_stage_key])
        cond = batch[self.cond_stage_key]
        if isinstance(cond, Mapping):
            captions, image = cond["c_crossattn"], cond.get("c_concat")
        else:
            captions, image = cond, batch.get("c_concat")
        captions = [captions] if isinstance(captions, str) else list(captions)
        return target, captions, None if image is None else _to_chw(image)

    def noised_inputs(self, batch: Mapping[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One batch made ready for the UNet: encode, drop conditioning, noise at random t (LDM Eq. 2).

        Returns ``(x_noisy, t, text, image_latent, goal)``; ``image_latent`` is None without image conditioning and
        ``goal`` is what the network should predict (the noise, or the clean latent for x0-prediction).
        """
        target, captions, image = self.get_input(batch)
        batch_size = target.shape[0]
        with torch.no_grad():
            z = self.get_first_stage_encoding(self.encode_first_stage(target), generator=generator)  # (B, 4, h, w)
        text = self.get_learned_conditioning(captions)  # (B, L, D); with grad when the encoder trains
        drop_text, drop_image = self.conditioning_dropout.masks(batch_size, generator)
        if bool(drop_text.any()):
            text = mask_text(text, self.get_learned_conditioning([""]), drop_text)
        image_latent = None
        if self.model.conditioning_key in ("concat", "hybrid"):
            if image is None:
                raise KeyError("hybrid conditioning needs the input image under 'c_concat' in the batch")
            with torch.no_grad():
                image_latent = mask_image(self.encode_first_stage(image).mode(), drop_image)  # unscaled, as IP2P
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator).to(self.device)
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(self.device)
        goal = noise if self.parameterization == "eps" else z
        return self.q_sample(z, t, noise), t, text, image_latent, goal

    def batch_loss(self, pred: torch.Tensor, goal: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """`diffusion_loss` with this model's weighting."""
        return diffusion_loss(pred, goal, t, self.logvar, self.lvlb_weights, self.l_simple_weight,
                              self.original_elbo_weight, self.loss_type)

    def shared_step(self, batch: Mapping[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """ε- (or x0-) prediction loss of one batch: `noised_inputs`, one UNet call, `batch_loss`."""
        x_noisy, t, text, image_latent, goal = self.noised_inputs(batch, generator)
        pred = self.apply_model(x_noisy, t, hybrid_conditioning(text, image_latent))
        return self.batch_loss(pred, goal, t)

    def joint_step(self, train_batch: Mapping[str, Any], reg_batch: Mapping[str, Any], generators: tuple[
            torch.Generator, torch.Generator]) -> tuple[tuple[torch.Tensor, dict], tuple[torch.Tensor, dict]]:
        """`shared_step` of the subject and the prior batch with one UNet call on both (as diffusers' DreamBooth
        concatenates instance and class images): the same losses, and one larger batch runs faster than two
        (a ShapesWorld step 12% faster on a 2-core CPU, bench/RESULTS.md). Batches of different latent sizes get
        two calls."""
        train, reg = (self.noised_inputs(batch, g) for batch, g in zip((train_batch, reg_batch), generators))
        inputs = list(zip(train[:4], reg[:4]))  # (x_noisy, t, text, image_latent) of each
        if all(a is None and b is None or a.shape[1:] == b.shape[1:] for a, b in inputs):
            x, t, text, image = (None if a is None else torch.cat([a, b]) for a, b in inputs)
            preds = self.apply_model(x, t, hybrid_conditioning(text, image)).split([len(train[0]), len(reg[0])])
        else:
            preds = [self.apply_model(x, t, hybrid_conditioning(text, image)) for x, t, text, image, _ in (train, reg)]
        return tuple(self.batch_loss(pred, part[4], part[1]) for pred, part in zip(preds, (train, reg)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """DreamBooth step: ``loss_train + reg_weight · loss_reg`` when the batch is [train, reg] (both logged)."""
        if isinstance(batch, (list, tuple)):
            train_batch, reg_batch = batch
        else:
            train_batch, reg_batch = batch, None
        generators = self.step_generator(batch_idx, salt=0), self.step_generator(batch_idx, salt=1)
        if reg_batch is not None and self.reg_weight != 0 and torch.is_grad_enabled():
            (loss_train, parts), (loss_reg, reg_parts) = self.joint_step(train_batch, reg_batch, generators)
        else:
            loss_train, parts = self.shared_step(train_batch, generators[0])
            if reg_batch is not None and self.reg_weight == 0 and self.global_step % self.reg_log_every:
                reg_batch = None  # a step without the logged-only prior term (reg_log_every)
            if reg_batch is not None:
                # At reg_weight 0 (the ablation) the prior term is only logged: no graph, no backward through it.
                # It draws from its own generator, so computing it or not leaves the trained weights alike.
                with torch.no_grad():
                    loss_reg, reg_parts = self.shared_step(reg_batch, generators[1])
        size = len(self.get_input(train_batch)[1])
        logs = {f"train/{k}": v for k, v in parts.items()}
        loss = loss_train
        if reg_batch is not None:
            loss = prior_preservation_loss(loss_train, loss_reg, self.reg_weight)
            if self.reg_weight == 0 and self.reg_log_every > 1:
                # Lightning repeats a step metric's last value on the steps that do not log it: to the loggers directly.
                for logger in self.loggers:
                    logger.log_metrics({"train/loss_reg": float(reg_parts["loss"])}, step=self.global_step)
            else:
                logs["train/loss_reg"] = reg_parts["loss"]
        logs["train/loss_train"] = parts["loss"]
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=size)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, logger=False, batch_size=size)
        if reg_batch is not None:
            self.log("reg", reg_parts["loss"], prog_bar=True, on_step=True, logger=False, batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the EMA after each optimizer step."""
        if self.use_ema:
            self.model_ema(self.model)

    @torch.no_grad()
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss with fixed noise per batch index (comparable across steps), and with the EMA weights."""
        batch = batch[0] if isinstance(batch, (list, tuple)) else batch
        size = len(self.get_input(batch)[1])
        _, parts = self.shared_step(batch, torch.Generator().manual_seed(batch_idx))
        self.log_dict({f"val/{k}": v for k, v in parts.items()}, on_epoch=True, batch_size=size)
        if self.use_ema:
            with self.ema_scope():
                _, parts = self.shared_step(batch, torch.Generator().manual_seed(batch_idx))
            self.log_dict({f"val/{k}_ema": v for k, v in parts.items()}, on_epoch=True, batch_size=size)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the global RNG states (data order and augmentations draw from them) so a resume is exact.

        A LoRA run also stores its settings and base checkpoint (``checkpoint["lora"]``): `scripts/export.py` needs
        alpha to merge or extract the adapters.
        """
        checkpoint["rng_states"] = rng.collect_states()
        if self.lora is not None:
            checkpoint["lora"] = {**self.lora.as_dict(), "base_checkpoint": dict(self.base_checkpoint)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states saved by `on_save_checkpoint` (older checkpoints have none)."""
        if "rng_states" in checkpoint:
            rng.restore_states(checkpoint["rng_states"])
        if self.lora is not None and "lora" in checkpoint:
            self.base_checkpoint = dict(checkpoint["lora"].get("base_checkpoint", {}))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """UNet (``unfreeze_model``) or its LoRA adapters, text encoder (``cond_stage_trainable``) or its adapters,
        ``logvar`` (``learn_logvar``)."""
        params: list[nn.Parameter] = []
        if self.unfreeze_model or self.lora is not None:
            params += [p for p in self.model.parameters() if p.requires_grad]
        if self.cond_stage_trainable or (self.lora is not None and self.lora.text_encoder):
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self) -> Any:
        """``optimizer`` on the trainable parts at ``learning_rate``; ``scheduler_config`` adds a per-step LambdaLR."""
        from ldm.optim import build_optimizer

        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: set unfreeze_model or cond_stage_trainable in the model config")
        optimizer = build_optimizer(self.optimizer_name, params, self.learning_rate)
        if not self.scheduler_config:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _to_chw(x: torch.Tensor) -> torch.Tensor:
    """Images as (B, C, H, W) float: the seed's datasets yielded (B, H, W, C)."""
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    return x.float().contiguous()
