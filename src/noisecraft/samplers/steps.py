"""Which noise levels a sampler visits: timestep spacings and σ schedules.

A sampler gets a descending list of σ values ending in 0 (the clean image). For a discrete-time model
they are the schedule's own σ_t at the chosen timesteps, so the network sees the timesteps it was
trained on. Spacings as named by diffusers (Lin et al. 2023, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", table 2):

    leading   t = 0, r, 2r, ... (r = T // steps)           DDIM paper, diffusers' default
    trailing  t = T-1, T-1-r, ... counting down from T      reaches the noisiest step
    linspace  t = round(linspace(0, T-1, steps))
    karras    σ's of EDM eq. 5 between the schedule's σ_min and σ_max (the default of EDM-preconditioned runs)
    nested    the same ρ-spacing with steps that halve into each other (`nested_sigmas`: distilled students)

The two σ spacings start at the model's `sigma_max`. For our own runs that is min(σ(T), 80) (EDM's top σ,
`diffusion.sampling_sigma_max`): a cosine schedule's clipped last step has σ(T) ≈ 20,000, and a ρ = 7 grid from there
spends half of its steps above σ = 300, where an image in [-1, 1] is already pure noise.

Or, for any model, the σ spacing of Karras et al. 2022 (EDM, eq. 5), `karras_sigmas`: uniform in σ^(1/ρ),
which spends more steps at low noise. A discrete-time model then sees fractional timesteps, which the
Denoiser maps from σ by interpolating log σ (`NoiseSchedule.sigma_to_t`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NoisecraftError
from ..schedule import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")        # timestep spacings, as diffusers names them
SIGMA_SPACINGS = ("karras", "nested")                 # σ spacings between the schedule's σ_min and σ_max


def select_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "leading") -> torch.Tensor:
    """Descending integer timesteps (length `steps`) chosen from 0..T-1."""
    T = schedule.T
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise NoisecraftError(f"the number of sampling steps must be an integer in 1..{T}, got {steps!r}.")
    # trailing and linspace are computed in float64 with numpy, exactly as diffusers does: float32
    # arithmetic lands some timesteps on an exact .5 that then rounds the other way (T=1000, 48 steps).
    if spacing == "leading":
        ts = torch.arange(steps) * (T // steps)
    elif spacing == "trailing":
        ts = torch.from_numpy(np.round(np.arange(T, 0, -T / steps)) - 1).long().flip(0)
    elif spacing == "linspace":
        ts = torch.from_numpy(np.linspace(0, T - 1, steps).round()).long()
    else:
        raise NoisecraftError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS + SIGMA_SPACINGS)}.")
    return ts.long().flip(0)


def sigmas_from_timesteps(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """σ at each timestep, with a final 0 appended: the end of every sampling run is the clean image."""
    return torch.cat([schedule.sigmas[timesteps.long()], torch.zeros(1, dtype=torch.float64)])


def discrete_sigmas(schedule: NoiseSchedule, steps: int, spacing: str = "leading",
                    sigma_max: float | None = None) -> torch.Tensor:
    """The σ's of `steps` steps: the schedule's own at the spacing's timesteps, or for spacing "karras" EDM's
    eq. 5 between the schedule's σ_min and sigma_max (default the schedule's σ(T); fractional timesteps), or
    "nested" the same for distilled students."""
    top = schedule.sigma_max if sigma_max is None else sigma_max
    if spacing == "karras":
        return karras_sigmas(schedule.sigma_min, top, steps)
    if spacing == "nested":
        return nested_sigmas(schedule.sigma_min, top, steps)
    return sigmas_from_timesteps(schedule, select_timesteps(schedule, steps, spacing))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ for i = 0..n-1, then σ_n = 0.

    n noise levels from σ_max down to σ_min (ρ = 7 as in the paper), plus the trailing 0: n sampling steps.
    """
    if not isinstance(n, int) or n < 1:
        raise NoisecraftError(f"the number of sampling steps must be an integer >= 1, got {n!r}.")
    if not 0 < sigma_min < sigma_max:
        raise NoisecraftError(f"Karras sigmas need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[-1], sigmas[0] = sigma_min, sigma_max        # exact ends: x^(1/ρ)^ρ can miss by an ulp
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def nested_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """n steps whose σ's nest under halving, as progressive distillation needs (Salimans & Ho 2022, §3): EDM's
    ρ-spacing with the ramp j/n instead of j/(n-1), σ_j = (σ_max^(1/ρ) + j/n·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ for
    j = 0..n-1, then 0. The n-step list is every other σ of the 2n-step one; n = 1 is [σ_max, 0]."""
    if not isinstance(n, int) or n < 1:
        raise NoisecraftError(f"the number of sampling steps must be an integer >= 1, got {n!r}.")
    if not 0 < sigma_min < sigma_max:
        raise NoisecraftError(f"nested sigmas need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + torch.arange(n, dtype=torch.float64) / n * (lo - hi)) ** rho
    sigmas[0] = sigma_max
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def sigma_steps(sigmas) -> list[tuple[int, float, float]]:
    """(i, σ_i, σ_{i+1}) as floats for each of the len(sigmas) - 1 steps of a descending σ list."""
    values = [float(s) for s in sigmas]
    return [(i, values[i], values[i + 1]) for i in range(len(values) - 1)]


def report(callback, i: int, x, sigma: float, sigma_next: float, denoised) -> None:
    """Hand one step's state to a sampler's callback, if any: {"i", "x", "sigma", "sigma_next", "denoised"}."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
