"""One interface for every sampler: a denoiser D(x, σ, cond) -> x̂0.

This is the view of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", EDM) and k-diffusion: samplers work on x = x0 + σ·ε (the "variance exploding" scale), and a
denoiser answers the best guess of the clean image x0 at noise level σ. A network trained in discrete
time on the DDPM ("variance preserving") process x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε is wrapped by
scaling its input with c_in = sqrt(ᾱ) = 1/sqrt(1 + σ²) and mapping σ back to its timestep t.

Prediction types (what the network outputs) and how x̂0 follows from it:

    eps:  x̂0 = x - σ·ε̂                                (ε-prediction, DDPM)
    x0:   x̂0 = network output
    v:    x̂0 = sqrt(ᾱ)·x_t - sqrt(1 - ᾱ)·v̂            (v-prediction, Salimans & Ho 2022)
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import NoisecraftError
from .schedule import NoiseSchedule, alpha_bar_from_sigma

PREDICTION_TYPES = ("eps", "x0", "v")


def check_prediction_type(prediction: str) -> str:
    if prediction not in PREDICTION_TYPES:
        raise NoisecraftError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTION_TYPES)}.")
    return prediction


def _as_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ as a float tensor of shape (N,), broadcastable over a batch."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class Denoiser(nn.Module):
    """Wraps a network trained on a `NoiseSchedule` with a prediction type into D(x, σ, cond) -> x̂0.

    clip_x0: clamp x̂0 to [-1, 1], the data range (DDPM's sampler does this; it helps pixel models at
    few steps). Off by default so that every sampler sees the raw model, as the parity tests need.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str = "eps", clip_x0: bool = False):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction = check_prediction_type(prediction)
        self.clip_x0 = clip_x0

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = _as_batch(sigma, x)
        alpha_bar = alpha_bar_from_sigma(sigma)
        shape = (-1,) + (1,) * (x.ndim - 1)
        c_in = alpha_bar.sqrt().to(x.dtype).reshape(shape)            # x_t = sqrt(ᾱ)·x in the VP scale
        t = self.schedule.sigma_to_t(sigma)
        out = self.net(x * c_in, t, cond)
        if self.prediction == "eps":
            x0 = x - sigma.to(x.dtype).reshape(shape) * out
        elif self.prediction == "x0":
            x0 = out
        else:
            x0 = c_in * (x * c_in) - (1 - alpha_bar).sqrt().to(x.dtype).reshape(shape) * out
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    def eps(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """ε̂ = (x - D(x, σ)) / σ."""
        sigma_b = _as_batch(sigma, x).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return (x - self(x, sigma, cond)) / sigma_b

    def score(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """∇_x log p_σ(x) = (D(x, σ) - x) / σ²  (Tweedie's formula, EDM eq. 3)."""
        sigma_b = _as_batch(sigma, x).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return (self(x, sigma, cond) - x) / sigma_b**2


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ per sample, shaped to broadcast over x."""
    return _as_batch(sigma, x).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


class DenoiserWrapper(nn.Module):
    """A denoiser built on another: passes on the schedule and σ range samplers ask for."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.inner = denoiser

    @property
    def schedule(self):
        return self.inner.schedule

    @property
    def sigma_min(self):
        return self.inner.sigma_min

    @property
    def sigma_max(self):
        return self.inner.sigma_max

    def eps(self, x, sigma, cond=None):
        """ε̂ = (x - D(x, σ)) / σ of the wrapped (guided) denoiser."""
        return (x - self(x, sigma, cond)) / _sigma_like(sigma, x)

    def score(self, x, sigma, cond=None):
        """(D(x, σ) - x) / σ² of the wrapped (guided) denoiser."""
        return (self(x, sigma, cond) - x) / _sigma_like(sigma, x) ** 2


class ClassifierFreeGuidance(DenoiserWrapper):
    """D_w = D(x, σ, ∅) + w·(D(x, σ, c) - D(x, σ, ∅))  (Ho & Salimans 2022, eq. 6, written on x̂0).

    Guidance on x̂0 equals guidance on ε̂ because x̂0 = x - σ ε̂ is affine in ε̂. The conditional and
    unconditional passes run as one batched forward. w = 1 is the plain conditional model; w = 0 the
    unconditional one. `uncond` is the "no condition" input (the null label), or a negative condition.
    """

    def __init__(self, denoiser: nn.Module, scale: float, uncond: torch.Tensor):
        super().__init__(denoiser)
        self.scale = scale
        self.uncond = uncond

    def forward(self, x, sigma, cond=None):
        if cond is None or self.scale == 1.0:
            return self.inner(x, sigma, cond)
        sigma = _as_batch(sigma, x)
        uncond = self.uncond.to(cond.device).expand_as(cond)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)
