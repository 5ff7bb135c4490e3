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

from .euler import check_churn, churn, to_d


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """EDM's Heun sampler (Algorithm 2)."""
    check_churn(s_churn, s_noise)
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = churn(x, sigma, steps, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma_hat, "sigma_next": sigma_next, "denoised": denoised})
        d = to_d(x, denoised, sigma_hat)
        dt = sigma_next - sigma_hat
        x_euler = x + dt * d
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, denoiser(x_euler, sigma_next, cond), sigma_next)
            x = x + dt * (d + d_next) / 2
    return x
