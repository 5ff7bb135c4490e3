"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on any subsequence of the training timesteps.

Each step draws x_s ~ p(x_s | x_t) = N(μ̃(x_t, x̂0), var), where μ̃ is the exact posterior mean of
q(x_s | x_t, x0) (DDPM eq. 7) with the model's x̂0 in place of x0. For a skipped step t -> s the "β" of
the step is β = 1 - ᾱ_t/ᾱ_s (it equals β_t when s = t - 1):

    μ̃ = sqrt(ᾱ_s) β / (1 - ᾱ_t) · x̂0 + sqrt(ᾱ_t/ᾱ_s) (1 - ᾱ_s) / (1 - ᾱ_t) · x_t
    var = β̃ = (1 - ᾱ_s)/(1 - ᾱ_t) · β     ("small", the posterior variance)   or   var = β ("large")
    log var = frac·log β + (1 - frac)·log β̃   ("learned": improved DDPM eq. 15, frac = (v + 1)/2 from the network)

A model trained with a learned variance (--learn-sigma) samples with it by default; like improved DDPM's respaced
sampler, its interpolation uses the β and β̃ of the step actually taken.

Our x lives on the σ scale (x = x0 + σ ε, see denoiser.py), so each step converts x_t = sqrt(ᾱ_t) x in
and out. The last step (σ = 0) returns x̂0 itself, with no noise.
"""

from __future__ import annotations

import math

import torch

from ..denoiser import VARIANCES, base_denoiser, denoise_with_variance, learned_log_variance
from ..errors import NoisecraftError
from .noise import randn_like
from .steps import report, sigma_steps


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor | None,
              variance: str = "small", v: torch.Tensor | None = None) -> torch.Tensor:
    """One ancestral step from noise level σ (timestep t) to σ_next (timestep s < t), on the σ scale.
    `v` is the network's learned-variance output, used when variance="learned"."""
    a_t, a_s = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
    beta = 1.0 - a_t / a_s
    coef_x0 = a_s**0.5 * beta / (1.0 - a_t)
    coef_xt = (a_t / a_s) ** 0.5 * (1.0 - a_s) / (1.0 - a_t)
    mean = coef_x0 * x0 + coef_xt * (x * a_t**0.5)              # μ̃ in the VP scale
    if sigma_next > 0 and noise is not None:
        small = max((1.0 - a_s) / (1.0 - a_t) * beta, 1e-20)
        if variance == "learned":
            if v is None:
                raise NoisecraftError("the learned DDPM variance needs the network's variance output v; pass v.")
            log_var = learned_log_variance(v, math.log(max(beta, 1e-20)), math.log(small))
            mean = mean + (0.5 * log_var).exp() * noise
        else:
            var = small if variance == "small" else beta
            mean = mean + max(var, 1e-20) ** 0.5 * noise
    return mean / a_s**0.5                                       # back to the σ scale


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, variance: str | None = None):
    """DDPM ancestral sampler. `variance`: "small" (β̃_t, the posterior's), "large" (β_t) or "learned" (the
    model's own, improved DDPM); None: "learned" for a model with a learned variance, else "small"."""
    learned = bool(getattr(base_denoiser(denoiser), "learned_variance", False))
    if variance is None:
        variance = "learned" if learned else "small"
    if variance not in VARIANCES:
        raise NoisecraftError(f"unknown DDPM variance {variance!r}; choose 'small' (posterior β̃), 'large' (β) or "
                              f"'learned' (a model trained with --learn-sigma).")
    if variance == "learned" and not learned:
        raise NoisecraftError("DDPM variance 'learned' needs a model trained with --learn-sigma; use 'small' or "
                              "'large' for this one.")
    for i, sigma, sigma_next in sigma_steps(sigmas):
        if variance == "learned":
            x0, v = denoise_with_variance(denoiser, x, sigma, cond)
        else:
            x0, v = denoiser(x, sigma, cond), None
        report(callback, i, x, sigma, sigma_next, x0)
        noise = randn_like(x, generator) if sigma_next > 0 else None
        x = ddpm_step(x, x0, sigma, sigma_next, noise, variance, v)
    return x
