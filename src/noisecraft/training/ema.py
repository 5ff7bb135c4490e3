"""Exponential moving average of weights (Polyak averaging), which is what sampling uses."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ_ema ← d·θ_ema + (1 - d)·θ, with a warm-up d_k = min(decay, (1 + k)/(10 + k)) so short runs are not
    dominated by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)   # one fused kernel for all tensors
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
