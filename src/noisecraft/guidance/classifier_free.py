"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper: denoiser -> guided denoiser."""

from __future__ import annotations

import torch
from torch import nn

from ..denoiser import DenoiserWrapper, _as_batch


class ClassifierFreeGuidance(DenoiserWrapper):
    """D_w = D(x, σ, ∅) + w·(D(x, σ, c) - D(x, σ, ∅))  (Ho & Salimans 2022, eq. 6, written on x̂0).

    Guidance on x̂0 equals guidance on ε̂ because x̂0 = x - σ ε̂ is affine in ε̂. The conditional and
    unconditional passes run as one batched forward. w = 1 is the plain conditional model; w = 0 the
    unconditional one. `uncond` is the "no condition" input (the null label), or a negative condition.
    """

    def __init__(self, denoiser: nn.Module, scale: float, uncond: torch.Tensor):
        super().__init__(denoiser)
        self.scale = scale
        self.uncond = uncond

    def forward(self, x, sigma, cond=None):
        if cond is None or self.scale == 1.0:
            return self.inner(x, sigma, cond)
        sigma = _as_batch(sigma, x)
        uncond = self.uncond.to(cond.device).expand_as(cond)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)
