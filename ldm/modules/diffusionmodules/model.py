"""Convolutional encoder/decoder of the KL autoencoder (first stage of latent diffusion).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G.
The module tree (``down.i.block.j``, ``mid.attn_1``, ``up.i.upsample``, ...) is the CompVis one, so that
released checkpoints load key for key; only computations that leave no trace in the state dict are modern
(``F.silu``, ``F.scaled_dot_product_attention``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ATTN_TYPES = ("vanilla",)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups, eps 1e-6 and affine parameters, as in the CompVis VAE."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, ``x * sigmoid(x)`` (Ramachandran et al. 2017)."""
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if self.with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling: asymmetric zero pad (0, 1, 0, 1) then a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if self.with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H + 1, W + 1)
            return self.conv(x)  # (B, C, H / 2, W / 2)
        return F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, C, H / 2, W / 2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, swish, 3x3 conv) x 2 with an optional timestep projection."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if self.in_channels != self.out_channels:
            if self.use_conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))  # (B, C_out, H, W)
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))  # (B, C_out, H, W)
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions with 1x1-conv projections (Vaswani et al. 2017)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # The 1x1 convolutions are per-position linear maps: run them as one matmul on (B, HW, C).
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        q = F.linear(tokens, self.q.weight.flatten(1), self.q.bias)  # (B, HW, C)
        k = F.linear(tokens, self.k.weight.flatten(1), self.k.bias)  # (B, HW, C)
        v = F.linear(tokens, self.v.weight.flatten(1), self.v.bias)  # (B, HW, C)
        # softmax(q k^T / sqrt(C)) v with a single head
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(b, c, height, width)  # (B, C, H, W)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """Attention block of the requested type; only the CompVis "vanilla" AttnBlock is provided."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type {attn_type!r} is not supported (supported: {', '.join(ATTN_TYPES)})")
    return AttnBlock(in_channels)


def _resolve_attn_type(use_linear_attn: bool, attn_type: str) -> str:
    """The CompVis flag ``use_linear_attn`` selects linear attention, which this fork does not provide."""
    if use_linear_attn:
        raise ValueError("use_linear_attn=True (linear attention) is not supported; use attn_type 'vanilla'")
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type {attn_type!r} is not supported (supported: {', '.join(ATTN_TYPES)})")
    return attn_type


class Encoder(nn.Module):
    """VAE encoder: image (B, in_channels, H, W) -> moments (B, 2 * z_channels, H / f, W / f), f = 2^(levels-1).

    Args:
        ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels.
        out_ch: unused by the encoder (part of the shared CompVis ``ddconfig``).
        ch_mult: channel multiplier per resolution level.
        num_res_blocks: ResnetBlocks per level.
        attn_resolutions: feature-map sizes (relative to ``resolution``) that get an AttnBlock after each block.
        dropout: dropout inside the ResnetBlocks.
        resamp_with_conv: learned (conv) downsampling instead of average pooling.
        in_channels: image channels.
        resolution: nominal image size, only used to place attention blocks.
        z_channels: latent channels.
        double_z: output mean and log-variance (2 * z_channels) instead of z_channels.
        use_linear_attn, attn_type: attention flavour; only "vanilla" is supported.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
    ) -> None:
        super().__init__()
        attn_type = _resolve_attn_type(use_linear_attn, attn_type)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, self.ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1, *tuple(ch_mult))
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(self.num_res_blocks):
                block.append(
                    ResnetBlock(
                        in_channels=block_in, out_channels=block_out, temb_channels=self.temb_ch, dropout=dropout
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temb = None
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h, temb)  # (B, ch * ch_mult[i_level], H_i, W_i)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)  # (B, C, H_i / 2, W_i / 2)

        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)  # (B, C_last, H / f, W / f)

        h = nonlinearity(self.norm_out(h))
        return self.conv_out(h)  # (B, 2 * z_channels or z_channels, H / f, W / f)


class Decoder(nn.Module):
    """VAE decoder: latent (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f).

    ``up`` is built from the lowest resolution upwards and inserted at the front, so ``up.i`` is level ``i``
    (the CompVis indexing that checkpoint keys use). Arguments as in :class:`Encoder`, plus:

    Args:
        give_pre_end: return the features before ``norm_out`` / ``conv_out``.
        tanh_out: squash the output with tanh.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
    ) -> None:
        super().__init__()
        attn_type = _resolve_attn_type(use_linear_attn, attn_type)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        logger.debug("Decoder works with z of shape %s = %d dimensions", self.z_shape, z_channels * curr_res**2)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(self.num_res_blocks + 1):
                block.append(
                    ResnetBlock(
                        in_channels=block_in, out_channels=block_out, temb_channels=self.temb_ch, dropout=dropout
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)  # prepend: up.i stays level i

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.last_z_shape = z.shape
        temb = None
        h = self.conv_in(z)  # (B, C_last, h, w)

        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h, temb)  # (B, ch * ch_mult[i_level], h_i, w_i)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)  # (B, C, 2 h_i, 2 w_i)

        if self.give_pre_end:
            return h  # (B, ch * ch_mult[0], h * f, w * f)

        h = self.conv_out(nonlinearity(self.norm_out(h)))  # (B, out_ch, h * f, w * f)
        if self.tanh_out:
            h = torch.tanh(h)
        return h
