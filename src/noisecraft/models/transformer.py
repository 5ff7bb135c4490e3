"""The spatial transformer of latent diffusion (Rombach et al. 2022, §3.3 and appendix; Vaswani et al. 2017).

It lets text steer the U-Net: every position of a feature map becomes a token, the tokens attend to each other
and then to the text embeddings (cross-attention, eq. 3: Q = W_Q·φ(z_t), K = W_K·τ(y), V = W_V·τ(y)), then pass
a feed-forward layer; the result is added back to the feature map.

    x ─┬─ GroupNorm ─ proj_in ─ [BasicTransformerBlock] × depth ─ proj_out ─(+)─ out
       └──────────────────────────────────────────────────────────────────┘

Module and parameter names follow diffusers' Transformer2DModel / BasicTransformerBlock (norm, proj_in,
transformer_blocks.i.{norm1, attn1, norm2, attn2, norm3, ff.net.0.proj, ff.net.2}, proj_out), the layout of
Stable Diffusion checkpoints in diffusers form, so such weights load with a plain `load_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5): a · GELU(g), where
    one linear map produces both halves [a, g]."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """The Transformer's position-wise feed-forward layer (Vaswani et al. 2017, eq. 2) with a GEGLU in place of
    ReLU and a 4× wider hidden layer; `net` = [GEGLU, dropout, linear] gives the keys ff.net.0.proj and ff.net.2."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm Transformer block on tokens x (B×N×dim): self-attention, cross-attention to the context
    (B×L×context_dim), feed-forward, each as x + f(LayerNorm(x)). Without context_dim it has no cross-attention
    (and no norm2/attn2, as in diffusers)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim, dropout)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim, heads, head_dim, dropout)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> depth × BasicTransformerBlock -> proj_out, plus the input (a residual block).

    Input B×C×H×W, context B×L×context_dim; output B×C×H×W. The transformer works on heads·head_dim features.
    `use_linear_projection` selects linear proj_in/proj_out on tokens (Stable Diffusion 2.x) instead of 1×1
    convolutions on the map (1.x); both compute the same function, only the weight shapes differ. proj_out starts
    at zero, so a fresh block is the identity (loaded weights replace it).
    """

    def __init__(self, in_channels: int, heads: int, head_dim: int, context_dim: int | None = None, depth: int = 1,
                 groups: int = 32, use_linear_projection: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth)])
        if use_linear_projection:
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear_projection:
            tokens = self.proj_in(tokens)
        # B×C×H×W -> B×(H·W)×C; a view, without a copy, for channels-last maps.
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear_projection:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear_projection:
            tokens = self.proj_out(tokens)
        out = tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2)   # back to B×C×H×W (channels-last memory)
        if not self.use_linear_projection:
            out = self.proj_out(out)
        return x + out
