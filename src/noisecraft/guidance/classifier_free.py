"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper: denoiser -> guided denoiser."""

from __future__ import annotations

import torch
from torch import nn

from ..denoiser import DenoiserWrapper, batch_sigma


class ClassifierFreeGuidance(DenoiserWrapper):
    """D_w = D(x, σ, ∅) + w·(D(x, σ, c) - D(x, σ, ∅))  (Ho & Salimans 2022, eq. 6, written on x̂0).

    Our w is the paper's w + 1: the paper writes ε̃ = (1 + w)·ε(c) - w·ε(∅), we write
    ε̃ = ε(∅) + w·(ε(c) - ε(∅)) (as Stable Diffusion's guidance_scale does), so our w = 1 is no guidance (the
    plain conditional model), w = 0 the unconditional one, and the paper's w = 3 is our 4.

    Guidance on x̂0 equals guidance on ε̂ because x̂0 = x - σ ε̂ is affine in ε̂. The conditional and
    unconditional passes run as one batched forward. `uncond` is the "no condition" input (the null label), or
    a negative condition.
    """

    def __init__(self, denoiser: nn.Module, scale: float, uncond: torch.Tensor):
        super().__init__(denoiser)
        self.scale = scale
        self.uncond = uncond

    def forward(self, x, sigma, cond=None):
        if cond is None or self.scale == 1.0:
            return self.inner(x, sigma, cond)
        sigma = batch_sigma(sigma, x)
        uncond = self.uncond.to(cond.device).expand_as(cond)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)
