"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16).

    x_s = sqrt(ᾱ_s) x̂0 + sqrt(1 - ᾱ_s - σ_η²) ε̂ + σ_η z,
    σ_η = η · sqrt((1 - ᾱ_s)/(1 - ᾱ_t)) · sqrt(1 - ᾱ_t/ᾱ_s)

η = 0 is the deterministic DDIM sampler; η = 1 has the variance of DDPM's ancestral step. On the σ scale
(x = x0 + σ ε, divide by sqrt(ᾱ_s)) the deterministic step reads x_s = x̂0 + σ_s ε̂: the Euler step of the
probability-flow ODE in σ (Karras et al. 2022, §3), which is why DDIM works with few steps.
"""

from __future__ import annotations

import torch

from ..errors import NoisecraftError
from .noise import randn_like
from .steps import report, sigma_steps


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor | None,
              eta: float = 0.0) -> torch.Tensor:
    """One DDIM step from σ (timestep t) to σ_next (timestep s < t), on the σ scale."""
    a_t, a_s = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
    eps = (x - x0) / sigma
    sigma_eta = eta * ((1 - a_s) / (1 - a_t)) ** 0.5 * (1 - a_t / a_s) ** 0.5
    direction = max(1 - a_s - sigma_eta**2, 0.0) ** 0.5
    x_next = x0 + (direction / a_s**0.5) * eps
    if sigma_eta > 0 and noise is not None:
        x_next = x_next + (sigma_eta / a_s**0.5) * noise
    return x_next


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta: float = 0.0):
    """DDIM sampler; eta in [0, 1] (0: deterministic)."""
    if not 0.0 <= eta <= 1.0:
        raise NoisecraftError(f"DDIM eta must be in [0, 1], got {eta}.")
    for i, sigma, sigma_next in sigma_steps(sigmas):
        x0 = denoiser(x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, x0)
        noise = randn_like(x, generator) if eta > 0 and sigma_next > 0 else None
        x = ddim_step(x, x0, sigma, sigma_next, noise, eta)
    return x
