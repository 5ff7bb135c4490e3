"""Heun's 2nd-order sampler (Karras et al. 2022, EDM, Algorithm 2 "deterministic sampling using Heun's
2nd order method with arbitrary σ(t) and s(t)", here with σ(t) = t and s(t) = 1, plus optional churn).

Each step takes an Euler step of dx/dσ = (x - D(x, σ))/σ to σ_next, evaluates the slope there and
repeats the step with the average of the two slopes (the trapezoidal rule, EDM Alg. 2 lines 7-11):

    d  = (x̂ - D(x̂, σ̂)) / σ̂,           x' = x̂ + (σ_next - σ̂)·d
    d' = (x' - D(x', σ_next)) / σ_next,   x_next = x̂ + (σ_next - σ̂)·(d + d')/2

The last step, to σ_next = 0, stays a plain Euler step (line 8: "if t_{i+1} ≠ 0"), because d' would
divide by zero; a run of N steps therefore costs 2N - 1 network evaluations. Churn options as in
`sample_euler` (s_churn = 0: deterministic).
"""

from __future__ import annotations

import torch

from .euler import edm_sampler


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, steer=None):
    """EDM's Heun sampler (Algorithm 2)."""
    return edm_sampler(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, s_churn=s_churn,
                       s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, heun=True, steer=steer)
