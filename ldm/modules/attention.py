"""Transformer blocks of the SD v1 UNet (CompVis ``ldm/modules/attention.py``), attention through SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


def Normalize(in_channels: int) -> nn.GroupNorm:  # noqa: N802 - CompVis name
    """GroupNorm(32 groups, eps 1e-6) used at the entry of a SpatialTransformer."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, eq. 6): ``x * GELU(gate)`` from one linear layer."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, dim_out)
        return x * F.gelu(gate)  # (B, N, dim_out)


class FeedForward(nn.Module):
    """Transformer MLP: ``Linear→GELU`` (or GEGLU) → Dropout → Linear; keys ``net.0``, ``net.2``."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, N, dim_out)


class CrossAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1) of ``x`` over ``context``.

    Self-attention when no context is given. Heads are computed by ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head**-0.5
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape  # (B, N, query_dim)
        context = x if context is None else context  # (B, M, context_dim)
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(b, -1, h, d).transpose(1, 2)  # (B, h, M, d)
        v = self.to_v(context).view(b, -1, h, d).transpose(1, 2)  # (B, h, M, d)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(b, n, h * d)  # (B, N, h * d)
        return self.to_out(out)  # (B, N, query_dim)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention over ``context``, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)  # self-attention
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )  # self-attention too when context is None
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x  # (B, N, dim)
        x = self.attn2(self.norm2(x), context=context) + x  # (B, N, dim)
        x = self.ff(self.norm3(x)) + x  # (B, N, dim)
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (Rombach et al. 2022, sec. 3.3 cross-attention conditioning).

    GroupNorm, 1x1 conv in, ``depth`` transformer blocks on (B, H*W, C) tokens, zero-initialised 1x1 conv
    out, residual. ``use_checkpoint`` defaults to True as the SD v1 blocks always checkpointed.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim, checkpoint=use_checkpoint
                )
                for _ in range(depth)
            ]
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape  # (B, C, H, W)
        x_in = x
        x = self.proj_in(self.norm(x))  # (B, inner, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            x = block(x, context=context)  # (B, H*W, inner)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()  # (B, inner, H, W), not channels-last strides
        return self.proj_out(x) + x_in  # (B, C, H, W)
