"""Inpainting by replacement (RePaint-style blending, Lugmayr et al. 2022) as a wrapper: denoiser -> denoiser."""

from __future__ import annotations

import torch
from torch import nn

from ..denoiser import DenoiserWrapper
from ..errors import NoisecraftError


class InpaintingDenoiser(DenoiserWrapper):
    """Generate only where `mask` is 1 and keep `known` where it is 0 ("replace" inpainting on x̂0):

        D'(x, σ) = (1 - m)·x_known + m·D(x, σ)

    Every sampler moves x towards its x̂0, so the known region of x is always the known image plus noise
    at the current level: deterministic samplers (DDIM, Euler, Heun, LMS, DPM++) keep x = x_known + σ·c
    there, with c fixed by the starting noise, and ancestral ones add fresh noise of the right variance.
    That is the "noise the known part to the current σ and paste it in" step of Lugmayr et al. 2022
    (RePaint, eq. 8, without resampling) and SDEdit, done once inside the denoiser instead of after each
    sampler step; at σ = 0 the known pixels come out exactly. The network sees the whole noisy image,
    so the generated region is drawn to match its surroundings.

    known: images on the data scale, N×C×H×W (or one C×H×W image for the whole batch); mask: 1 = to
    generate, 0 = keep (the convention of Stable Diffusion inpainting, where white is repainted),
    broadcastable to known (e.g. N×1×H×W or H×W), values in [0, 1] (soft edges blend).
    """

    def __init__(self, denoiser: nn.Module, known: torch.Tensor, mask: torch.Tensor):
        super().__init__(denoiser)
        mask = torch.as_tensor(mask, dtype=known.dtype, device=known.device)
        try:
            torch.broadcast_shapes(mask.shape, known.shape)
        except RuntimeError:
            raise NoisecraftError(f"the inpainting mask of shape {tuple(mask.shape)} does not fit images of shape "
                                  f"{tuple(known.shape)}; give one mask per image or one for all (H×W).") from None
        if mask.numel() and (mask.min() < 0 or mask.max() > 1):
            raise NoisecraftError("an inpainting mask must hold values in [0, 1] (1 = generate, 0 = keep).")
        self.known, self.mask = known, mask

    def forward(self, x, sigma, cond=None):
        x0 = self.inner(x, sigma, cond)
        known, mask = self.known.to(x0.device, x0.dtype), self.mask.to(x0.device, x0.dtype)
        return (1 - mask) * known + mask * x0
