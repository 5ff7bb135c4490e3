"""Samplers: plain functions `sample_NAME(denoiser, x, sigmas, *, cond, generator, callback, **options) -> x`.

`x` starts as pure noise on the σ scale (x = σ_max·z·sqrt(1 + 1/σ_max²), the DDPM prior x_T ~ N(0, I)),
`sigmas` is the descending list of noise levels to visit (ending in 0), and the result is the sample.
`generate()` does all of that from a name, a step count and a seed.

Names: the registered names below, plus the names people know from Stable Diffusion front ends
(`ALIASES`, matched without regard to case): "Euler a" is euler_ancestral, "DPM++ 2M" is dpmpp_2m, and a
trailing " Karras" ("DPM++ 2M Karras", "LMS Karras", ...) picks the same sampler with Karras σ spacing.
`resolve_sampler(name)` answers (registered name, karras); `get_sampler(name)` the function.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..errors import NoisecraftError
from .consistency import sample_consistency
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from .euler import sample_euler, sample_euler_ancestral
from .heun import sample_heun
from .langevin import sample_langevin, sample_pc
from .lms import sample_lms
from .noise import SeededNoise, prior_noise
from .plms import sample_plms
from .steps import SPACINGS, discrete_sigmas, karras_sigmas

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "lms": sample_lms,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "langevin": sample_langevin,
    "pc": sample_pc,
    "consistency": sample_consistency,
}

# Front-end names (lower case) -> registered name. Each also works with " karras" appended.
ALIASES: dict[str, str] = {
    "euler a": "euler_ancestral",
    "euler_a": "euler_ancestral",
    "pndm": "plms",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m sde": "dpmpp_2m_sde",
}


def sampler_names() -> list[str]:
    """The registered names, then the best-known aliases (any name + " Karras" works too)."""
    return sorted(SAMPLERS) + ["Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras"]


def resolve_sampler(name: str) -> tuple[str, bool]:
    """(registered name, karras) for a sampler name or alias, e.g. "DPM++ 2M Karras" -> ("dpmpp_2m", True)."""
    key = " ".join(str(name).lower().split())
    karras = False
    if key.endswith(" karras"):
        key, karras = key[: -len(" karras")], True
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise NoisecraftError(f"unknown sampler {name!r}; choose one of {', '.join(sampler_names())} "
                              "(add ' Karras' to any name for Karras sigma spacing).")
    return key, karras


def get_sampler(name: str) -> Callable:
    """The sampler function for a name or alias (an alias's " Karras" is for `generate` to apply)."""
    return SAMPLERS[resolve_sampler(name)[0]]


def check_options(name: str, fn: Callable, options: dict) -> None:
    """A clear error for an option the sampler does not take (e.g. --variance with euler)."""
    params = inspect.signature(fn).parameters
    known = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p not in ("cond", "generator", "callback")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"its options are {', '.join(known)}" if known else "it takes no options"
        raise NoisecraftError(f"sampler {name!r} takes no option {', '.join(map(repr, unknown))}; {takes}.")


@torch.no_grad()
def generate(denoiser, shape: tuple[int, ...], *, sampler: str, steps: int, spacing: str = "leading",
             karras: bool = False, cond: torch.Tensor | None = None, seed: int = 0, callback=None, device="cpu",
             noise: torch.Tensor | None = None, **options) -> torch.Tensor:
    """Draw shape[0] samples. Sample i uses seed + i for all its noise, so a seed gives the same picture
    whatever the batch size. Returns images on the data scale (roughly [-1, 1]).

    The σ's visited are the schedule's own at `steps` timesteps chosen by `spacing`, or, with karras=True
    or a "... Karras" sampler name, EDM's spacing between the model's σ_min and σ_max (spacing unused).
    `noise` (shape `shape`, N(0, I)) replaces the seeded starting noise x_T, e.g. to reproduce another library's
    run from its initial latents; the seed still drives the noise of stochastic samplers."""
    name, alias_karras = resolve_sampler(sampler)
    fn = SAMPLERS[name]
    check_options(name, fn, options)
    if karras or alias_karras:
        sigmas = karras_sigmas(denoiser.sigma_min, denoiser.sigma_max, steps)
    else:
        sigmas = discrete_sigmas(denoiser.schedule, steps, spacing, getattr(denoiser, "sigma_max", None))
    seeded = SeededNoise(range(seed, seed + shape[0]), device=device)
    if noise is None:
        x = prior_noise(shape, float(sigmas[0]), seeded, device)
    else:
        if tuple(noise.shape) != tuple(shape):
            raise NoisecraftError(f"the starting noise must have shape {tuple(shape)}, got {tuple(noise.shape)}.")
        x = prior_noise(shape, float(sigmas[0]), z=noise.to(device=device, dtype=torch.float32))
    return fn(denoiser, x, sigmas, cond=cond, generator=seeded, callback=callback, **options)


__all__ = ["ALIASES", "SAMPLERS", "SPACINGS", "SeededNoise", "generate", "get_sampler", "karras_sigmas",
           "resolve_sampler", "sample_consistency", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_euler",
           "sample_euler_ancestral", "sample_heun", "sample_langevin", "sample_lms", "sample_pc", "sample_plms",
           "sampler_names"]
