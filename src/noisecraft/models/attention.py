"""Attention blocks: softmax(QKᵀ/√d)V through torch's fused scaled_dot_product_attention.

`SelfAttention2d` is the pixel U-Net's block (one fused 1×1 QKV convolution). `Attention` is the general
multi-head attention of the Transformer (Vaswani et al. 2017, eq. 1 and §3.2.2) on token sequences: self-attention
when no context is given, cross-attention when it is — Q from the image tokens, K and V from the context (text
embeddings), as in latent diffusion (Rombach et al. 2022, eq. 3). Its parameter names (to_q, to_k, to_v, to_out.0)
are those of Stable Diffusion checkpoints in the diffusers layout, so their weights load by name.

Attention slicing (`set_attention_slicing`) trades speed for memory: queries are processed a slice at a time, so
the N×L score matrix never exists whole. Each query's softmax runs over all keys either way, so the result is the
same up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoisecraftError


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int | None) -> torch.Tensor:
    """softmax(QKᵀ/√d)V on (…, N, d) tensors, `slice_size` query positions at a time (None: all at once).

    Rows of the output depend only on their own query, so slicing the queries changes memory, not the result."""
    n = q.shape[-2]
    if slice_size is None or slice_size >= n:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[..., i:i + slice_size, :], k, v)
                      for i in range(0, n, slice_size)], dim=-2)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, with a residual connection.

    Pre-norm (GroupNorm), a 1×1 projection to Q, K, V, attention per head, and a zero-initialised output
    projection so a fresh block starts as the identity.
    """

    def __init__(self, channels: int, head_dim: int = 32, groups: int = 8):
        super().__init__()
        if channels % head_dim:
            head_dim = channels  # fall back to a single head for odd widths
        self.heads = channels // head_dim
        self.slice_size: int | None = None   # see set_attention_slicing
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        # (N, heads, positions, head_dim) for each of q, k, v
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)
        out = sliced_attention(q, k, v, self.slice_size)
        out = out.permute(0, 1, 3, 2).reshape(n, c, h, w)
        return x + self.proj(out)


class Attention(nn.Module):
    """Multi-head attention softmax(QKᵀ/√d)V over tokens x (B×N×query_dim), attending to `context` (B×L×context_dim)
    if given (cross-attention), else to x itself (self-attention). Output: B×N×query_dim.

    Q, K and V are bias-free linear maps to heads·head_dim features; the output map has a bias (Stable Diffusion's layout).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, head_dim: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.slice_size: int | None = None   # see set_attention_slicing
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])  # keys to_out.0.*

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """B×N×(heads·d) -> B×heads×N×d."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        q, k, v = self.split_heads(self.to_q(x)), self.split_heads(self.to_k(source)), self.split_heads(self.to_v(source))
        out = sliced_attention(q, k, v, self.slice_size)   # scale 1/√head_dim
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out[1](self.to_out[0](out))


def set_attention_slicing(model: nn.Module, slice_size: int | None) -> nn.Module:
    """Make every Attention and SelfAttention2d inside `model` process `slice_size` query positions at a time
    (None: all at once, the default). Lowers peak memory for large images at some cost in speed; returns `model`."""
    if slice_size is not None and (isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1):
        raise NoisecraftError(f"attention slice size must be a positive integer or None, got {slice_size!r}.")
    for module in model.modules():
        if isinstance(module, (Attention, SelfAttention2d)):
            module.slice_size = slice_size
    return model
