"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2; the SDE form as in diffusers' "sde-dpmsolver++" and
k-diffusion's `sample_dpmpp_2m_sde`).

DPM-Solver++ integrates the diffusion ODE in the data-prediction form, in the half log-SNR
λ = log(α/σ_vp) = -log σ (σ the noise level of our σ scale). With h = λ_next - λ, solving the linear
part exactly and holding x̂0 constant over the step gives the first-order update, here divided by α to
move to the σ scale (it equals deterministic DDIM):

    x_next = (σ_next/σ)·x - (e^{-h} - 1)·x̂0.

The multistep second-order method (Algorithm 2, DPM-Solver++(2M)) replaces x̂0 by a linear
extrapolation from the previous step's x̂0_prev, with r = (λ - λ_prev)/h:

    D = (1 + 1/(2r))·x̂0 - 1/(2r)·x̂0_prev.

The first step (no history) and the last step (to σ = 0, where h = ∞ and the update is x_next = x̂0) are
first order, as in diffusers' DPMSolverMultistepScheduler with its default final_sigmas_type="zero".

SDE variant (diffusers' "sde-dpmsolver++" with the "midpoint" solver type at η = 1; k-diffusion's
`sample_dpmpp_2m_sde` with its η): the same exponential integrator applied to the reverse SDE,

    x_next = (σ_next/σ)·e^{-ηh}·x + (1 - e^{-(1+η)h})·D + σ_next·sqrt(1 - e^{-2ηh})·z,

with D = x̂0 + (x̂0 - x̂0_prev)/(2r) after the first step. η = 0 gives back the deterministic 2M sampler.
"""

from __future__ import annotations

import math

import torch

from ..errors import NoisecraftError
from .noise import randn_like
from .steps import report, sigma_steps


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """DPM-Solver++(2M): second-order multistep in λ = -log σ, data prediction; deterministic."""
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = denoiser(x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:                              # λ_next = ∞: the first-order update is x̂0 itself
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)       # λ_next - λ
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta: float = 1.0,
                        s_noise: float = 1.0):
    """DPM-Solver++(2M) SDE ("midpoint" second-order term). eta = 1: the reverse SDE; eta = 0: DPM++ 2M."""
    if eta < 0:
        raise NoisecraftError(f"DPM++ 2M SDE eta must be >= 0, got {eta}.")
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = denoiser(x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        decay = -math.expm1(-(1 + eta) * h)                # 1 - e^{-(1+η)h}
        x = (sigma_next / sigma) * math.exp(-eta * h) * x + decay * denoised
        if old_denoised is not None:
            r = h_last / h
            x = x + 0.5 * decay / r * (denoised - old_denoised)
        if eta > 0:
            noise_std = sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
            x = x + noise_std * randn_like(x, generator)
        old_denoised, h_last = denoised, h
    return x
