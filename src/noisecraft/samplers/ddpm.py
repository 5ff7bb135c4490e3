"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on any subsequence of the training timesteps.

Each step draws x_s ~ p(x_s | x_t) = N(μ̃(x_t, x̂0), var), where μ̃ is the exact posterior mean of
q(x_s | x_t, x0) (DDPM eq. 7) with the model's x̂0 in place of x0. For a skipped step t -> s the "β" of
the step is β = 1 - ᾱ_t/ᾱ_s (it equals β_t when s = t - 1):

    μ̃ = sqrt(ᾱ_s) β / (1 - ᾱ_t) · x̂0 + sqrt(ᾱ_t/ᾱ_s) (1 - ᾱ_s) / (1 - ᾱ_t) · x_t
    var = β̃ = (1 - ᾱ_s)/(1 - ᾱ_t) · β     ("small", the posterior variance)   or   var = β ("large")

Our x lives on the σ scale (x = x0 + σ ε, see denoiser.py), so each step converts x_t = sqrt(ᾱ_t) x in
and out. The last step (σ = 0) returns x̂0 itself, with no noise.
"""

from __future__ import annotations

import torch

from ..errors import NoisecraftError
from .noise import randn_like

VARIANCES = ("small", "large")


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor | None,
              variance: str = "small") -> torch.Tensor:
    """One ancestral step from noise level σ (timestep t) to σ_next (timestep s < t), on the σ scale."""
    a_t, a_s = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
    beta = 1.0 - a_t / a_s
    coef_x0 = a_s**0.5 * beta / (1.0 - a_t)
    coef_xt = (a_t / a_s) ** 0.5 * (1.0 - a_s) / (1.0 - a_t)
    mean = coef_x0 * x0 + coef_xt * (x * a_t**0.5)              # μ̃ in the VP scale
    if sigma_next > 0 and noise is not None:
        var = (1.0 - a_s) / (1.0 - a_t) * beta if variance == "small" else beta
        mean = mean + max(var, 1e-20) ** 0.5 * noise
    return mean / a_s**0.5                                       # back to the σ scale


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, variance: str = "small"):
    """DDPM ancestral sampler. `variance`: "small" (β̃_t, the posterior's) or "large" (β_t)."""
    if variance not in VARIANCES:
        raise NoisecraftError(f"unknown DDPM variance {variance!r}; choose 'small' (posterior β̃) or 'large' (β).")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigma, cond)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": x0})
        noise = randn_like(x, generator) if sigma_next > 0 else None
        x = ddpm_step(x, x0, sigma, sigma_next, noise, variance)
    return x
