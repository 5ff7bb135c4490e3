"""Time and class embeddings for the U-Net."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import NoisecraftError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer's positional encoding.

    DDPM (Ho et al. 2020, appendix B) feeds t to every residual block through this embedding. Half of
    the channels are cos, half sin, at frequencies 1/max_period^(i/half) for i = 0..half-1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """t -> sinusoidal features -> 2-layer MLP (SiLU), shared by all residual blocks."""

    def __init__(self, base_dim: int, emb_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Sinusoidal features in float32 (timesteps up to 1000 need its precision), then the MLP in the weights' dtype.
        return self.mlp(timestep_embedding(t, self.base_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """Class labels -> vectors, with one extra learned "null" class for classifier-free guidance.

    Label `num_classes` (one past the last real class) means "no label"; training replaces real labels
    with it at random (label dropout), so the same network also learns the unconditional model
    (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Algorithm 1).
    """

    def __init__(self, num_classes: int, emb_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, emb_dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Integer labels (shape N), or mixing weights over the num_classes + 1 rows (shape N×(num_classes+1),
        float): the weighted sum of their embeddings, for interpolating between classes."""
        if labels.is_floating_point():
            if labels.ndim != 2 or labels.shape[1] != self.num_classes + 1:
                raise NoisecraftError(f"soft labels must have shape N×{self.num_classes + 1} (one weight per class "
                                      f"and the null class), got {tuple(labels.shape)}.")
            return labels.to(self.table.weight.dtype) @ self.table.weight
        return self.table(labels.long())
