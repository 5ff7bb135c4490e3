"""Linear multistep in σ (Adams–Bashforth with variable steps; k-diffusion's `sample_lms`, diffusers'
LMSDiscreteScheduler, the "LMS" sampler of Stable Diffusion front ends).

The probability-flow ODE dx/dσ = d(x, σ) = (x - D(x, σ))/σ (Karras et al. 2022, eq. 3) is integrated
over [σ_i, σ_{i+1}] with d replaced by the polynomial through the last k slopes d_i, d_{i-1}, ...,
d_{i-k+1} (k = min(i + 1, order)): the Adams–Bashforth construction, here for uneven steps. In the
Lagrange basis this reads

    x_{i+1} = x_i + Σ_j c_j·d_{i-j},     c_j = ∫_{σ_i}^{σ_{i+1}} Π_{m≠j} (τ - σ_{i-m}) / (σ_{i-j} - σ_{i-m}) dτ.

The integrand is a polynomial of degree k - 1, so Gauss–Legendre quadrature with k nodes integrates it
exactly (to rounding); diffusers calls scipy.integrate.quad, which agrees to ~1e-12. With k = 1 this is
Euler's method.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NoisecraftError
from .euler import to_d
from .steps import report, sigma_steps


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """c_j for j = 0..order-1: the integral over [σ_i, σ_{i+1}] of the Lagrange basis polynomial of node σ_{i-j}."""
    nodes = [sigmas[i - j] for j in range(order)]
    a, b = sigmas[i], sigmas[i + 1]
    u, w = np.polynomial.legendre.leggauss(order)          # nodes and weights on [-1, 1]
    taus = (b - a) / 2 * u + (a + b) / 2
    weights = (b - a) / 2 * w
    coefficients = []
    for j in range(order):
        basis = np.ones_like(taus)
        for m in range(order):
            if m != j:
                basis *= (taus - nodes[m]) / (nodes[j] - nodes[m])
        coefficients.append(float(np.sum(weights * basis)))
    return coefficients


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, order: int = 4, steer=None):
    """Linear multistep of up to `order` (1..4) past slopes, with exact variable-step coefficients. steer(x, σ, x̂0, i),
    if given, moves x after the slope is taken (guidance/loss.py: LatentSteering, the tutorials' recipe)."""
    if order not in (1, 2, 3, 4):
        raise NoisecraftError(f"LMS order must be 1, 2, 3 or 4, got {order!r}.")
    sigma_list = [float(s) for s in sigmas]
    slopes: list[torch.Tensor] = []                       # d_i, d_{i-1}, ... newest first
    for i, sigma, sigma_next in sigma_steps(sigma_list):
        denoised = denoiser(x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        slopes = [to_d(x, denoised, sigma)] + slopes[:order - 1]
        if steer is not None:
            x = steer(x, sigma, denoised, i)
        coefficients = lms_coefficients(sigma_list, i, len(slopes))
        x = x + sum(c * d for c, d in zip(coefficients, slopes))
    return x
