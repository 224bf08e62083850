"""First-stage models of latent diffusion: the KL-regularised autoencoder and a pixel-space identity."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, DiracDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


def _split_ddconfig(ddconfig: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route the shared CompVis ``ddconfig`` to Encoder and Decoder; a key neither accepts is an error."""
    encoder_names = set(inspect.signature(Encoder.__init__).parameters) - {"self"}
    decoder_names = set(inspect.signature(Decoder.__init__).parameters) - {"self"}
    unknown = sorted(set(ddconfig) - encoder_names - decoder_names)
    if unknown:
        accepted = ", ".join(sorted(encoder_names | decoder_names))
        raise ValueError(f"ddconfig: unknown parameter(s) {', '.join(unknown)} (accepted: {accepted})")
    encoder_kwargs = {name: value for name, value in ddconfig.items() if name in encoder_names}
    decoder_kwargs = {name: value for name, value in ddconfig.items() if name in decoder_names}
    return encoder_kwargs, decoder_kwargs


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder of Rombach et al. 2022 (Sec. 3.1): image <-> diagonal-Gaussian latent.

    Same constructor and state-dict layout as CompVis ``ldm.models.autoencoder.AutoencoderKL``. It is an
    inference module here (the first stage stays frozen), so it is a plain ``nn.Module``.

    Args:
        ddconfig: Encoder/Decoder hyper-parameters (see :class:`~ldm.modules.diffusionmodules.model.Encoder`).
        lossconfig: ``target``/``params`` of the training loss; ``torch.nn.Identity`` in the SD/IP2P configs.
        embed_dim: latent channels after ``quant_conv`` (4 for SD v1).
        ckpt_path: optional weights file to load strictly (after dropping ``ignore_keys`` prefixes).
        ignore_keys: key prefixes to drop from the file before loading.
        image_key: batch key of the image (kept for config compatibility).
        colorize_nlabels: number of segmentation labels; registers the random ``colorize`` projection buffer.
        monitor: metric name Lightning callbacks may read (kept for config compatibility).
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True (the encoder must output mean and logvar)")
        self.image_key = image_key
        encoder_kwargs, decoder_kwargs = _split_ddconfig(ddconfig)
        self.encoder = Encoder(**encoder_kwargs)
        self.decoder = Decoder(**decoder_kwargs)
        self.loss = instantiate_from_config(lossconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int) or isinstance(colorize_nlabels, bool):
                raise ValueError(f"colorize_nlabels must be an int, got {colorize_nlabels!r}")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load weights strictly from ``path`` after dropping every key that starts with one of ``ignore_keys``."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"AutoencoderKL ckpt_path {path!r} does not exist")
        from ldm.checkpoint import load_state_dict_file

        state_dict = load_state_dict_file(path)
        prefixes = tuple(ignore_keys)
        dropped = [key for key in state_dict if prefixes and key.startswith(prefixes)]
        for key in dropped:
            del state_dict[key]
        if dropped:
            logger.info("Dropped %d key(s) matching ignore_keys %s from %s", len(dropped), list(prefixes), path)
        self.load_state_dict(state_dict, strict=True)
        logger.info("Restored AutoencoderKL from %s", path)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior q(z|x) for images x in [-1, 1] of shape (B, in_channels, H, W)."""
        h = self.encoder(x)  # (B, 2 * z_channels, H / f, W / f)
        moments = self.quant_conv(h)  # (B, 2 * embed_dim, H / f, W / f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, out_ch, h * f, w * f) from latents z of shape (B, embed_dim, h, w)."""
        z = self.post_quant_conv(z)  # (B, z_channels, h, w)
        return self.decoder(z)

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()  # (B, embed_dim, h, w)
        dec = self.decode(z)  # (B, out_ch, H, W)
        return dec, posterior

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a (B, nlabels, H, W) segmentation map to RGB in [-1, 1] with the ``colorize`` buffer."""
        if not hasattr(self, "colorize"):
            raise ValueError("to_rgb needs colorize_nlabels to be set in the AutoencoderKL config")
        x = F.conv2d(x, weight=self.colorize)  # (B, 3, H, W)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class IdentityFirstStage(nn.Module):
    """Pixel-space stand-in for a first stage: the "latent" is the image itself.

    ``encode`` returns a :class:`DiracDistribution` so callers can use ``.mode()``/``.sample()`` as with
    :class:`AutoencoderKL`. ``vq_interface`` makes ``quantize`` return the VQ-style tuple.
    """

    def __init__(self, vq_interface: bool = False) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor) -> DiracDistribution:
        """A point mass at ``x``."""
        return DiracDistribution(x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` unchanged."""
        return x

    def quantize(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None, tuple[None, None, None]]:
        """``x`` unchanged, or ``(x, None, (None, None, None))`` with ``vq_interface``."""
        if self.vq_interface:
            return x, None, (None, None, None)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PatchFirstStage(nn.Module):
    """A lossless, parameter-free first stage: pixels (B, 3, H, W) ↔ patches (B, 3·p², H/p, W/p) (pixel unshuffle).

    Diffusion on p×p patches is pixel-space diffusion with a p-times smaller UNet grid (patched pixel diffusion),
    which is what makes the ShapesWorld base model train on a CPU. ``encode`` returns a point mass, as
    `IdentityFirstStage` does, so callers use ``.mode()``/``.sample()`` as with ``AutoencoderKL``.
    """

    def __init__(self, patch: int = 4) -> None:
        super().__init__()
        if patch < 1:
            raise ValueError(f"patch must be positive, got {patch}")
        self.patch = patch

    def encode(self, x: torch.Tensor) -> DiracDistribution:
        """Pixels (B, 3, H, W) → a point mass at their patches (B, 3·p², H/p, W/p)."""
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch}")
        return DiracDistribution(F.pixel_unshuffle(x, self.patch))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Patches (B, 3·p², h, w) → pixels (B, 3, p·h, p·w)."""
        return F.pixel_shuffle(z, self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).mode())  # (B, 3, H, W), unchanged
