"""Attention blocks: softmax(QKᵀ/√d)V through torch's fused scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.permute(0, 1, 3, 2).reshape(n, c, h, w)
        return x + self.proj(out)
