"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

A consistency model f(x, σ) maps any point of a probability-flow ODE trajectory straight to its start, x0, so one
evaluation at σ_max is already a sample. More steps trade evaluations for quality by re-noising: after each x̂0 the
sampler jumps to the next, lower σ of the list with FRESH noise and asks f again,

    x̂0 = f(x, σ_i),      x ← x̂0 + sqrt(σ_{i+1}² - σ_min²)·z,  z ~ N(0, I),

ending with the last x̂0. (The paper's sqrt(τ² - ε²) keeps the total noise at τ: x̂0 already sits at σ_min.)
Unlike an ODE step this forgets x, so errors do not accumulate; unlike DDPM's step it re-noises all the way.

Any denoiser can be sampled this way, but only a consistency model (a `ConsistencyFunction` trained by
`noisecraft distill --method consistency`) gives good pictures in 1-4 steps.
"""

from __future__ import annotations

import math

import torch

from .noise import randn_like
from .steps import report, sigma_steps


def sample_consistency(denoiser, x, sigmas, *, cond=None, generator=None, callback=None) -> torch.Tensor:
    """Algorithm 1 of Song et al. 2023 on a descending σ list ending in 0: one evaluation per step."""
    sigma_min = float(denoiser.sigma_min)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        x0 = denoiser(x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, x0)
        if sigma_next > 0:
            x = x0 + math.sqrt(max(sigma_next**2 - sigma_min**2, 0.0)) * randn_like(x, generator)
        else:
            x = x0
    return x
