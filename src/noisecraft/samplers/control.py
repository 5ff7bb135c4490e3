"""Sampling that starts from something other than fresh noise: img2img (SDEdit), inpainting, and a
path between two seeds. Like `generate`, these only talk to a denoiser D(x, σ, cond) -> x̂0, so they work
with every sampler and with any model (pixel or latent: pass latents as the images).
"""

from __future__ import annotations

import math

import torch

from ..errors import NoisecraftError
from ..guidance.inpainting import InpaintingDenoiser
from . import SAMPLERS, check_options, generate, resolve_sampler
from .noise import SeededNoise, prior_noise
from .steps import discrete_sigmas, karras_sigmas


def sampling_plan(denoiser, sampler: str, steps: int, spacing: str = "leading", karras: bool = False,
                  options: dict | None = None):
    """(sampler function, descending σ's ending in 0), chosen as `generate` chooses them."""
    name, alias_karras = resolve_sampler(sampler)
    fn = SAMPLERS[name]
    check_options(name, fn, options or {})
    if karras or alias_karras:
        return fn, karras_sigmas(denoiser.sigma_min, denoiser.sigma_max, steps)
    return fn, discrete_sigmas(denoiser.schedule, steps, spacing, getattr(denoiser, "sigma_max", None))


def strength_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The last round(strength·steps) steps (at least one) of a σ list: where SDEdit starts and goes."""
    if not 0.0 < strength <= 1.0:
        raise NoisecraftError(f"img2img strength must be in (0, 1] (0: keep the input, 1: all noise), got {strength}.")
    steps = len(sigmas) - 1
    k = min(steps, max(1, round(strength * steps)))
    return sigmas[steps - k:]


@torch.no_grad()
def img2img(denoiser, images: torch.Tensor, strength: float, *, sampler: str, steps: int,
            spacing: str = "leading", karras: bool = False, cond=None, seed: int = 0, callback=None, **options):
    """SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
    Equations", §3): noise the input to the level σ_s of step round(s·steps) from the end, x = x0 + σ_s·z
    (q(x_t | x0) on the σ scale), and run the sampler's remaining steps from there.

    strength s near 0 keeps the input (few, gentle steps); s = 1 starts from the noisiest step and keeps
    little more than the input's coarse layout. Image i uses seed + i for all its noise (the z above and
    the sampler's), so a seed gives the same picture whatever the batch size."""
    fn, sigmas = sampling_plan(denoiser, sampler, steps, spacing, karras, options)
    sigmas = strength_sigmas(sigmas, strength)
    noise = SeededNoise(range(seed, seed + images.shape[0]), device=images.device)
    x = images + float(sigmas[0]) * noise.randn(tuple(images.shape), images.dtype)
    return fn(denoiser, x, sigmas, cond=cond, generator=noise, callback=callback, **options)


@torch.no_grad()
def inpaint(denoiser, images: torch.Tensor, mask: torch.Tensor, *, sampler: str, steps: int,
            spacing: str = "leading", karras: bool = False, cond=None, seed: int = 0, callback=None, **options):
    """Fill the region where mask = 1 and keep the images where mask = 0, with any sampler (see
    `InpaintingDenoiser`). Image i uses seed + i, as in `generate`."""
    wrapped = InpaintingDenoiser(denoiser, images, mask)
    return generate(wrapped, tuple(images.shape), sampler=sampler, steps=steps, spacing=spacing, karras=karras,
                    cond=cond, seed=seed, callback=callback, device=images.device, **options)


def slerp_noise(shape: tuple[int, ...], seed_a: int, seed_b: int, n: int) -> torch.Tensor:
    """n standard normal draws on the great circle from seed a's draw (first) to seed b's (last)."""
    if n < 2:
        raise NoisecraftError(f"an interpolation needs at least 2 images (the two ends), got {n}.")
    z_a, z_b = (SeededNoise([s]).randn((1, *shape))[0] for s in (seed_a, seed_b))
    return slerp(z_a, z_b, torch.linspace(0, 1, n))


@torch.no_grad()
def interpolate(denoiser, shape: tuple[int, ...], seed_a: int, seed_b: int, n: int, *, sampler: str,
                steps: int, spacing: str = "leading", karras: bool = False, cond=None, callback=None,
                device="cpu", **options):
    """n images along the slerp between the starting noise of two seeds (shape: one image, C×H×W).

    Image 0 is what `generate(..., seed=seed_a)` draws and image n-1 what seed_b draws, for deterministic
    samplers (ddim with η = 0, euler, heun, lms, plms, dpmpp_2m), which map noise to images smoothly.
    Stochastic samplers draw their fresh noise from seed_a for every image, so the path is still a path,
    but its ends are not exactly the two seeds' pictures. cond: one condition per image (e.g. soft labels
    from `lerp` for a path between two classes), or None."""
    fn, sigmas = sampling_plan(denoiser, sampler, steps, spacing, karras, options)
    z = slerp_noise(tuple(shape), seed_a, seed_b, n).to(device)
    x = prior_noise(z.shape, float(sigmas[0]), z=z)
    noise = SeededNoise([seed_a] * n, device=device)
    return fn(denoiser, x, sigmas, cond=cond, generator=noise, callback=callback, **options)


__all__ = ["img2img", "inpaint", "interpolate", "sampling_plan", "slerp_noise", "strength_sigmas"]


def slerp(z0: torch.Tensor, z1: torch.Tensor, t) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985), treating each tensor as one vector:

        slerp(z0, z1; t) = sin((1 - t)θ)/sin θ · z0 + sin(tθ)/sin θ · z1,   cos θ = ⟨z0, z1⟩ / (|z0| |z1|)

    Gaussian noise in many dimensions lives near a sphere of radius sqrt(d); the straight line between
    two draws cuts inside it (|lerp(½)| ≈ |z|/√2, an atypical, blurry start), the great circle does not.
    t: a number (returns z0's shape) or a 1-D tensor/list of n numbers (returns n×shape). Nearly parallel
    inputs fall back to the straight line.
    """
    if z0.shape != z1.shape:
        raise NoisecraftError(f"slerp needs two tensors of one shape, got {tuple(z0.shape)} and {tuple(z1.shape)}.")
    ts = torch.as_tensor(t, dtype=torch.float64)
    a, b = z0.double().flatten(), z1.double().flatten()
    cos = (a @ b / (a.norm() * b.norm()).clamp_min(1e-30)).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    flat = ts.reshape(-1, 1)
    if math.sin(float(theta)) < 1e-6:
        out = (1 - flat) * a + flat * b
    else:
        out = (torch.sin((1 - flat) * theta) * a + torch.sin(flat * theta) * b) / torch.sin(theta)
    out = out.to(z0.dtype).reshape(-1, *z0.shape)
    return out[0] if ts.ndim == 0 else out


def lerp(c0: torch.Tensor, c1: torch.Tensor, t) -> torch.Tensor:
    """Straight-line interpolation (1 - t)·c0 + t·c1 of conditions (label mixtures, embeddings);
    t as in `slerp`."""
    ts = torch.as_tensor(t, dtype=c0.dtype, device=c0.device)
    out = torch.lerp(c0.unsqueeze(0), c1.unsqueeze(0), ts.reshape(-1, *(1,) * c0.ndim))
    return out[0] if ts.ndim == 0 else out
