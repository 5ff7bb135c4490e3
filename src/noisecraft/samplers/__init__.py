"""Samplers: plain functions `sample_NAME(denoiser, x, sigmas, *, cond, generator, callback, **options) -> x`.

`x` starts as pure noise on the σ scale (x = σ_max·z·sqrt(1 + 1/σ_max²), the DDPM prior x_T ~ N(0, I)),
`sigmas` is the descending list of noise levels to visit (ending in 0), and the result is the sample.
`generate()` does all of that from a name, a step count and a seed.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import NoisecraftError
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .noise import SeededNoise, randn_like
from .steps import SPACINGS, discrete_sigmas

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
}


def get_sampler(name: str) -> Callable:
    try:
        return SAMPLERS[name.lower()]
    except KeyError:
        raise NoisecraftError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}.") from None


def prior_noise(shape, sigma_max: float, generator=None, device="cpu") -> torch.Tensor:
    """x_T ~ N(0, I) in the DDPM scale, i.e. sqrt(1 + σ_max²)·z on the σ scale."""
    z = randn_like(torch.empty(shape, device=device), generator)
    return z * (1.0 + sigma_max**2) ** 0.5


@torch.no_grad()
def generate(denoiser, shape: tuple[int, ...], *, sampler: str = "ddim", steps: int = 50, spacing: str = "leading",
             cond: torch.Tensor | None = None, seed: int = 0, callback=None, device="cpu", **options) -> torch.Tensor:
    """Draw shape[0] samples. Sample i uses seed + i for all its noise, so a seed gives the same picture
    whatever the batch size. Returns images on the data scale (roughly [-1, 1])."""
    fn = get_sampler(sampler)
    sigmas = discrete_sigmas(denoiser.schedule, steps, spacing)
    noise = SeededNoise(range(seed, seed + shape[0]), device=device)
    x = prior_noise(shape, float(sigmas[0]), noise, device)
    return fn(denoiser, x, sigmas, cond=cond, generator=noise, callback=callback, **options)


__all__ = ["SAMPLERS", "SPACINGS", "SeededNoise", "generate", "get_sampler", "sample_ddim", "sample_ddpm"]
