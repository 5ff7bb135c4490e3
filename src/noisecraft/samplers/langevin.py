"""The score-based family: annealed Langevin dynamics (NCSN) and the predictor-corrector sampler of score SDEs.

Both use only the score of the noised data, which on the σ scale (x = x0 + σ·ε) follows from the denoiser by
Tweedie's formula (EDM eq. 3):

    s(x, σ) = ∇_x log p_σ(x) = (D(x, σ) - x) / σ².

Annealed Langevin dynamics (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data
Distribution", Algorithm 1). For each noise level σ_1 > ... > σ_L, run T Langevin updates with a step size
that shrinks with the noise level,

    α_i = ε·σ_i²/σ_L²,    x ← x + (α_i/2)·s(x, σ_i) + sqrt(α_i)·z,    z ~ N(0, I),

and end with one denoising step x ← D(x, σ_L) = x + σ_L²·s(x, σ_L) (Tweedie's formula; Jolicoeur-Martineau et
al. 2020, "Adversarial score matching and improved sampling for image generation", and NCSNv2), which removes
the noise of level σ_L that Langevin dynamics leaves in the sample.

The step size. α_i/σ_i² = ε/σ_L² is the same at every level, so ε only means something together with σ_L,
the last level. NCSN's code used ε' = 2·10⁻⁵ with σ_L = 0.01 and T = 100 in the form x + ε'·s + sqrt(2ε')·z,
which is the form above with α = 2ε': a step α_i = 0.4·σ_i². Here σ_L is whatever the σ list ends on (0.006
to 0.03 for σ_min of the built-in schedules, 0.1 and more with trailing spacing), so a fixed ε would mean a
different sampler for every schedule and spacing; the default keeps the ratio instead, ε = σ_L², i.e. α_i = σ_i²:

    x ← x + (D(x, σ_i) - x)/2 + σ_i·z,

each update goes half way to the denoiser's guess and adds noise of the level's own size. With T = 5 updates
per level and the 50-1000 levels of a diffusion schedule (NCSN had 10 levels and T = 100), the chain must mix
within a few updates: on a Gaussian toy problem α_i = σ_i² gives far more accurate samples than NCSN's
0.4·σ_i² at any number of levels, at the price of a variance 1/(1 - α_i/4v_i) too large at the noisiest
levels (v_i = data variance + σ_i²), which the low-noise levels and the final denoising step remove.

Predictor-corrector (Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations", Algorithms 2-4) for the variance-exploding SDE dx = sqrt(d[σ²]/dt)·dw, which is our σ scale. Each
step from σ_i to σ_{i+1} is

    predictor (reverse diffusion, App. E):  x ← x + (σ_i² - σ_{i+1}²)·s(x, σ_i) + sqrt(σ_i² - σ_{i+1}²)·z
    corrector (Langevin, Algorithm 4), M times at σ_{i+1}:
        ε = 2·(r·||z|| / ||s(x, σ_{i+1})||)²,   x ← x + ε·s(x, σ_{i+1}) + sqrt(2ε)·z

with r the "signal-to-noise ratio" (0.16 in the paper for CIFAR-10 with the VE SDE). The norms are taken per
sample (the paper's code averages them over the batch), so a sample does not depend on its batch. The rule is
made for high-dimensional data such as images, where ||z||² and ||s||² concentrate near their means (d and
d/(data variance + σ²)); in two or three dimensions their ratio is heavy-tailed, some steps are huge, and the
samples come out far too spread. The last predictor step, to σ = 0, adds no noise: it is
x + σ_i²·s(x, σ_i) = D(x, σ_i), the denoiser's output (the paper's code likewise returns the noise-free mean).

Neither sampler needs a special model: any denoiser D(x, σ, cond) works (classifier-free guidance included).
"""

from __future__ import annotations

import math

import torch

from ..errors import NoisecraftError
from ..schedule import per_sample
from .noise import randn_like
from .steps import report, sigma_steps

# ε/σ_L² of annealed Langevin dynamics when step_lr is not given: α_i = σ_i² (see the module docstring).
DEFAULT_STEP_RATIO = 1.0


def score_and_denoised(denoiser, x: torch.Tensor, sigma: float, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s(x, σ), D(x, σ)) with s = (D - x)/σ², the score by Tweedie's formula, from one network evaluation."""
    denoised = denoiser(x, sigma, cond)
    return (denoised - x) / sigma**2, denoised


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """||t_n|| for each sample n, shaped to broadcast over the sample."""
    return per_sample(t.reshape(t.shape[0], -1).norm(dim=1), t)


@torch.no_grad()
def sample_langevin(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, n_steps_each: int = 5,
                    step_lr: float | None = None, final_denoise: bool = True):
    """Annealed Langevin dynamics (NCSN, Algorithm 1) over the noise levels sigmas[:-1], then D(x, σ_L).

    n_steps_each: T, Langevin updates per noise level (n_steps_each·len(levels) network evaluations, plus one
        for the final denoising step).
    step_lr: ε of Algorithm 1, the step α_i = ε·σ_i²/σ_L² (σ_L = the last level), in the paper's form
        (NCSN's code's step_lr is ε/2). None: ε = σ_L², so α_i = σ_i².
    final_denoise: end with x ← D(x, σ_L) (NCSNv2's denoising step); False returns the sample at noise σ_L.

    callback: once per noise level, with x and D(x, σ_i) at the start of that level.
    """
    if not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise NoisecraftError(f"langevin n_steps_each must be an integer >= 1, got {n_steps_each!r}.")
    if step_lr is not None and not step_lr > 0:
        raise NoisecraftError(f"langevin step_lr must be > 0, got {step_lr}.")
    levels = [float(s) for s in sigmas[:-1]]
    if not levels or min(levels) <= 0:
        raise NoisecraftError("langevin needs at least one noise level > 0 before the final sigma.")
    sigma_last = levels[-1]
    eps = DEFAULT_STEP_RATIO * sigma_last**2 if step_lr is None else float(step_lr)
    denoised = x
    for i, sigma in enumerate(levels):
        alpha = eps * sigma**2 / sigma_last**2
        for t in range(n_steps_each):
            score, denoised = score_and_denoised(denoiser, x, sigma, cond)
            if t == 0:
                report(callback, i, x, sigma, float(sigmas[i + 1]), denoised)
            x = x + (alpha / 2) * score + math.sqrt(alpha) * randn_like(x, generator)
    if final_denoise:
        x = denoiser(x, sigma_last, cond)
    return x


@torch.no_grad()
def sample_pc(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, snr: float = 0.16,
              corrector_steps: int = 1):
    """Predictor-corrector sampling of the VE SDE (Song et al. 2021, Algorithm 2 with Algorithm 4's corrector).

    Each step: a reverse-diffusion predictor step from σ_i to σ_{i+1}, then `corrector_steps` Langevin steps at
    σ_{i+1} with step size ε = 2·(snr·||z||/||score||)² per sample (none at σ = 0, where the predictor returns
    the denoiser's output). corrector_steps = 0 leaves the predictor alone (reverse diffusion sampling).
    Network evaluations: len(sigmas) - 1 predictor steps plus corrector_steps for each level above 0.
    """
    if not snr > 0:
        raise NoisecraftError(f"pc snr must be > 0, got {snr}.")
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise NoisecraftError(f"pc corrector_steps must be an integer >= 0, got {corrector_steps!r}.")
    for i, sigma, sigma_next in sigma_steps(sigmas):
        score, denoised = score_and_denoised(denoiser, x, sigma, cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:                       # x + σ²·s(x, σ) = D(x, σ): the noise-free last step
            x = denoised
            continue
        variance = sigma**2 - sigma_next**2      # reverse diffusion predictor (eq. 47 on the σ scale)
        x = x + variance * score + math.sqrt(variance) * randn_like(x, generator)
        for _ in range(corrector_steps):          # Langevin corrector (Algorithm 4)
            score, _ = score_and_denoised(denoiser, x, sigma_next, cond)
            z = randn_like(x, generator)
            step = 2 * (snr * _per_sample_norm(z) / _per_sample_norm(score).clamp_min(1e-20)) ** 2
            x = x + step * score + (2 * step).sqrt() * z
    return x
