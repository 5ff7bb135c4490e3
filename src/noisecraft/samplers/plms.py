"""PLMS: the pseudo linear multistep method of Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
Models on Manifolds" (PNDM), as used by the latent-diffusion code and by diffusers' PNDMScheduler with
skip_prk_steps=True (no Runge–Kutta warm-up).

PNDM splits a step into a "gradient part", an estimate ε' of the noise, and a "transfer part" φ that
moves x_t to x_{t-δ} along the DDIM update with that ε' (PNDM eq. 9):

    x_{t-δ} = sqrt(ᾱ_{t-δ}/ᾱ_t)·x_t - (ᾱ_{t-δ} - ᾱ_t) / (ᾱ_t·sqrt(1 - ᾱ_{t-δ}) + sqrt(ᾱ_t(1 - ᾱ_t)ᾱ_{t-δ}))·ε'.

On the σ scale (x = x_t / sqrt(ᾱ_t)) this is exactly x_next = x + (σ_next - σ)·ε', an Euler step of
dx/dσ = ε; what makes PLMS higher order is ε', the fourth-order Adams–Bashforth combination of the
last four ε's taken at the visited noise levels, as if the steps were evenly spaced (eq. 12):

    ε' = (55 ε_i - 59 ε_{i-1} + 37 ε_{i-2} - 9 ε_{i-3}) / 24,

with the lower-order formulas while fewer are known: (3 ε_i - ε_{i-1})/2 and (23 ε_i - 16 ε_{i-1} + 5 ε_{i-2})/12.

The first step is special (as in the latent-diffusion code and diffusers): it is a Heun step, i.e. an
Euler step to σ_1, a second network evaluation ε(x', σ_1) there, and the step redone from x_0 with the
average (ε_0 + ε(x', σ_1))/2. That extra evaluation is not kept in the history, so the next steps
combine ε_0 with the ε's of the accepted points. N steps therefore cost N + 1 network evaluations.
(When the first step already ends at σ = 0 it stays an Euler step.)
"""

from __future__ import annotations

import torch

from .euler import to_d
from .steps import report, sigma_steps

# Adams–Bashforth coefficients, newest ε first, for 1..4 known ε's.
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """PNDM's PLMS (Algorithm 2 of the paper without the Runge–Kutta start); deterministic."""
    history: list[torch.Tensor] = []                      # ε_i, ε_{i-1}, ... newest first
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = denoiser(x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        eps = to_d(x, denoised, sigma)                   # ε̂ = (x - x̂0)/σ = dx/dσ
        dt = sigma_next - sigma
        if i == 0 and sigma_next > 0:                    # the warm-up Heun step
            x_euler = x + dt * eps
            eps_next = to_d(x_euler, denoiser(x_euler, sigma_next, cond), sigma_next)
            history = [eps]
            x = x + dt * (eps + eps_next) / 2
            continue
        history = [eps] + history[:3]
        eps_prime = sum(c * e for c, e in zip(ADAMS_BASHFORTH[len(history)], history))
        x = x + dt * eps_prime
    return x
