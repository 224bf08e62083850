"""The Stable Diffusion v1 / InstructPix2Pix UNet (CompVis ``openaimodel.py``), same module tree and keys.

The network is the ADM UNet (Dhariwal & Nichol 2021, app. A) with SpatialTransformer cross-attention
blocks (Rombach et al. 2022, sec. 3.3). Only the spatial-transformer path of the original is built; the
options that no SD v1 / InstructPix2Pix config uses and that need separate modules raise
NotImplementedError naming the parameter.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

logger = logging.getLogger(__name__)


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands ``emb`` to TimestepBlocks and ``context`` to SpatialTransformers."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution (key ``conv``)."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got input of shape {tuple(x.shape)}")
        if self.dims == 3:  # (B, C, T, H, W): only the spatial axes grow
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        if self.use_conv:
            x = self.conv(x)  # (B, C_out, 2H, 2W)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or average pooling (key ``op``)."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError(
                    f"Downsample without conv cannot change channels ({self.channels} -> {self.out_channels})"
                )
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got input of shape {tuple(x.shape)}")
        return self.op(x)  # (B, C_out, H/2, W/2)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020, app. B; ADM scale-shift option).

    ``in_layers`` (norm, SiLU, conv) → add ``emb_layers(emb)`` → ``out_layers`` (norm, SiLU, dropout,
    zero-initialised conv), plus ``skip_connection`` (identity, or a 1x1/3x3 conv when channels change).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up or down:
            raise NotImplementedError("ResBlock(up=True/down=True) (UNetModel resblock_updown) is not implemented")
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        emb_out = self.emb_layers(emb).to(h.dtype)  # (B, C_out) or (B, 2 C_out)
        emb_out = emb_out.view(*emb_out.shape, *([1] * (h.ndim - 2)))  # (B, C_out[*2], 1, 1)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)  # 2 x (B, C_out, 1, 1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)  # (B, C_out, H, W)
        else:
            h = self.out_layers(h + emb_out)  # (B, C_out, H, W)
        return self.skip_connection(x) + h  # (B, C_out, H, W)


class UNetModel(nn.Module):
    """The SD v1 UNet: predicts the noise ``eps`` of a latent from the timestep and cross-attention context.

    Accepts the whole CompVis constructor signature. ``image_size`` is unused (as in the original);
    ``num_heads_upsample`` and ``use_new_attention_order`` only concern the legacy AttentionBlock, so,
    as in the original, they have no effect on the spatial-transformer path. ``use_checkpoint`` covers the
    transformer blocks too (CompVis SD v1 always checkpointed those; SD 2 made it follow the flag).
    """

    def __init__(
        self,
        image_size: int | None,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        unsupported = {
            "use_spatial_transformer=False (legacy AttentionBlock)": not use_spatial_transformer,
            "resblock_updown=True": resblock_updown,
            "n_embed (codebook-id prediction)": n_embed is not None,
            "use_fp16=True (cast the model, e.g. .half(), or use autocast instead)": use_fp16,
            f"dims={dims} (the spatial transformer is 2D)": dims != 2,
        }
        for name, hit in unsupported.items():
            if hit:
                raise NotImplementedError(f"UNetModel: {name} is not implemented")
        if context_dim is None:
            raise ValueError("UNetModel: use_spatial_transformer needs context_dim (the cross-attention width)")
        if not isinstance(context_dim, int):
            raise ValueError(f"UNetModel: context_dim must be an int, got {context_dim!r}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels")
        if num_heads_upsample != -1 or use_new_attention_order:
            logger.info(
                "UNetModel: num_heads_upsample=%s / use_new_attention_order=%s have no effect with the spatial "
                "transformer (as in CompVis)",
                num_heads_upsample,
                use_new_attention_order,
            )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = list(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = list(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
            )

        def transformer(ch: int) -> SpatialTransformer:
            # CompVis head rules: a fixed head count (dim_head = ch // num_heads) or a fixed head width
            # (num_heads = ch // num_head_channels); `legacy` recomputes dim_head from the head count.
            nonlocal num_heads
            if num_head_channels == -1:
                dim_head = ch // num_heads
            else:
                num_heads = ch // num_head_channels
                dim_head = num_head_channels
            if legacy:
                dim_head = ch // num_heads
            return SpatialTransformer(
                ch, num_heads, dim_head, depth=transformer_depth, context_dim=context_dim, use_checkpoint=use_checkpoint
            )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                downsample = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(downsample))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), transformer(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict eps for latents ``x`` (B, C_in, H, W) at ``timesteps`` (B,) given ``context`` (B, M, D).

        ``y`` (B,) holds class labels for a class-conditional model. Returns (B, C_out, H, W) in ``x``'s dtype;
        the network itself runs in its parameters' dtype (or under autocast).
        """
        if timesteps is None:
            raise ValueError("UNetModel.forward needs timesteps")
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                f"UNetModel: pass y exactly when the model is class-conditional (num_classes={self.num_classes})"
            )
        dtype = self.time_embed[0].weight.dtype
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])  # (B,)
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)  # (B, model_channels)
        emb = self.time_embed(t_emb.to(dtype))  # (B, 4 * model_channels)
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"UNetModel: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)  # (B, 4 * model_channels)

        hs = []
        h = x.to(dtype)  # (B, C_in, H, W)
        for module in self.input_blocks:
            h = module(h, emb, context)  # (B, ch, H / ds, W / ds)
            hs.append(h)
        h = self.middle_block(h, emb, context)  # (B, ch, H / ds, W / ds)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)  # (B, ch + skip_ch, H / ds, W / ds)
            h = module(h, emb, context)  # (B, ch, H / ds', W / ds')
        return self.out(h).to(x.dtype)  # (B, C_out, H, W)
