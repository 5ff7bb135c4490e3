"""Euler samplers for the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", EDM).

On the σ scale (x = x0 + σ·ε) the probability-flow ODE is (EDM eq. 1 with σ(t) = t, and eq. 3)

    dx/dσ = (x - D(x, σ)) / σ = ε̂(x, σ),

so one Euler step from σ to σ_next is x_next = x + (σ_next - σ)·(x - D(x, σ))/σ. Without churn this is
EDM's Algorithm 2 with the second-order correction left out, and it equals deterministic DDIM.

Churn (EDM Algorithm 2, lines 4-6): before the step, raise the noise level from σ to σ̂ = (1 + γ)σ by
adding fresh noise of variance σ̂² - σ², with γ = min(S_churn / N, √2 - 1) while σ ∈ [S_tmin, S_tmax]
(N = number of steps), and S_noise slightly above 1 to make up for detail lost by the denoiser.

"Euler a" (ancestral, k-diffusion): each step goes down to σ_down with the ODE and then adds fresh noise
σ_up, where σ_down² + σ_up² = σ_next², so the marginal noise level is right. With η = 1,
σ_up² = σ_next²(σ² - σ_next²)/σ² is DDPM's posterior variance β̃ on the σ scale, and the whole step
x̂0 + σ_down·ε̂ + σ_up·z is DDIM's η = 1 step, i.e. DDPM's ancestral step (Ho et al. 2020, Algorithm 2).
"""

from __future__ import annotations

import math

import torch

from ..errors import NoisecraftError
from .noise import randn_like
from .steps import report, sigma_steps


def to_d(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """dx/dσ = (x - D(x, σ)) / σ, the probability-flow ODE on the σ scale (EDM eq. 3)."""
    return (x - denoised) / sigma


def churn(x: torch.Tensor, sigma: float, steps: int, generator, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float) -> tuple[torch.Tensor, float]:
    """EDM Algorithm 2, lines 4-6: γ_i, σ̂ = σ(1 + γ_i), x̂ = x + sqrt(σ̂² - σ²)·S_noise·z. Returns (x̂, σ̂).

    No noise is drawn when γ = 0, so s_churn = 0 leaves the generator untouched.
    """
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn_like(x, generator)
    return x, sigma_hat


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_next²; σ_up = η·sqrt(σ_next²(σ² - σ_next²)/σ²), at most σ_next."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def check_churn(s_churn: float, s_noise: float) -> None:
    if s_churn < 0 or s_noise < 0:
        raise NoisecraftError(f"s_churn and s_noise must be >= 0, got {s_churn} and {s_noise}.")


def edm_sampler(denoiser, x, sigmas, *, cond, generator, callback, s_churn: float, s_tmin: float, s_tmax: float,
                s_noise: float, heun: bool, steer=None) -> torch.Tensor:
    """EDM Algorithm 2 line by line: churn (lines 4-6), the Euler step of dx/dσ (lines 7-8) and, with heun=True
    and σ_next > 0, the trapezoidal correction with the slope at σ_next (lines 9-11). steer(x, σ, x̂0, i), if given,
    moves x after the slope is taken (guidance/loss.py: LatentSteering, the tutorials' recipe)."""
    check_churn(s_churn, s_noise)
    steps = len(sigmas) - 1
    for i, sigma, sigma_next in sigma_steps(sigmas):
        x, sigma_hat = churn(x, sigma, steps, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat, cond)
        report(callback, i, x, sigma_hat, sigma_next, denoised)
        d = to_d(x, denoised, sigma_hat)
        if steer is not None:
            x = steer(x, sigma_hat, denoised, i)
        dt = sigma_next - sigma_hat
        x_euler = x + dt * d
        if heun and sigma_next != 0:
            d_next = to_d(x_euler, denoiser(x_euler, sigma_next, cond), sigma_next)
            x = x + dt * (d + d_next) / 2
        else:
            x = x_euler
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, steer=None):
    """Euler on the probability-flow ODE (EDM Algorithm 2 without the Heun correction).

    s_churn > 0 adds EDM's churn noise (see the module docstring); s_churn = 0 is deterministic.
    """
    return edm_sampler(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, s_churn=s_churn,
                       s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, heun=False, steer=steer)


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta: float = 1.0,
                           s_noise: float = 1.0):
    """"Euler a": an Euler step down to σ_down, then fresh noise of standard deviation σ_up (η = 0: Euler)."""
    if not 0.0 <= eta <= 1.0:
        raise NoisecraftError(f"Euler ancestral eta must be in [0, 1], got {eta}.")
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = denoiser(x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * to_d(x, denoised, sigma)
        if sigma_up > 0:
            x = x + sigma_up * s_noise * randn_like(x, generator)
    return x
