"""The text-encoder interface: prompts -> (token embeddings B×L×D, pooled B×D).

Latent diffusion (Rombach et al. 2022, §3.3, eq. 3) conditions the U-Net on τ_θ(y) ∈ R^{L×D}, a sequence of
token embeddings that the U-Net's cross-attention reads as keys and values. Every encoder answers
`encoder(prompts) -> (tokens B×L×D, pooled B×D)` with a fixed L, so the embeddings of any two prompts
stack into one batch (and an empty prompt gives the "unconditional" embedding of classifier-free guidance).
Implementations: models/clip.py (our CLIP), models/hf_text_encoder.py (Hugging Face); models/text_encoders.py
loads any of them from a folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import NoisecraftError

TEXT_ENCODER_FILE = "text_encoder.json"


class TextEncoder(nn.Module):
    """prompts -> (tokens B×L×D, pooled B×D).

    `dim` is D, the U-Net's cross-attention context dimension; `pooled_dim` the size of the pooled
    vector (one per prompt); `max_length` is L: every call pads to exactly L tokens.
    """

    dim: int
    pooled_dim: int
    max_length: int

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        """Write a folder that `load_text_encoder` reads back."""
        raise NotImplementedError

    def token_strings(self, prompt: str) -> list[str]:
        """The token at each position of the prompt's encoding, special tokens included and padding left out: what
        position i of the embeddings stands for (prompt mixing names positions)."""
        raise NotImplementedError

    def freeze(self) -> TextEncoder:
        """No gradients and evaluation mode (no dropout), for good: see `train`."""
        self.requires_grad_(False)
        self._frozen = True
        return super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        # A parent's model.train() must not switch dropout back on in a frozen encoder.
        return super().train(False if getattr(self, "_frozen", False) else mode)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise NoisecraftError("prompts must be strings; pass a string or a list of strings.")
    return prompts
