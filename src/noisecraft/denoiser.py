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

Learned variance (improved DDPM, Nichol & Dhariwal 2021, §3.1): a network with 2C output channels for C input
channels predicts as usual in its first C channels and, in the other C, a value v per pixel that sets the
reverse-step variance (`learned_log_variance`, eq. 15). The denoiser answers x̂0 from the first C channels, so
every sampler works unchanged, and keeps v of its latest call for the samplers that use it (DDPM): read it with
`denoise_with_variance`.
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


def learned_log_variance(v: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """log Σ_θ = frac·log β_t + (1 - frac)·log β̃_t with frac = (v + 1)/2  (improved DDPM eq. 15).

    v is the network's raw variance output, nominally in [-1, 1] (frac in [0, 1]) but not clamped, as in the
    paper's code: frac = 0 is DDPM's "small" variance β̃_t, frac = 1 its "large" one β_t.
    """
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def has_learned_variance(net: nn.Module) -> bool:
    """Whether a network's config says it has the 2C output channels of a learned-variance model."""
    config = getattr(net, "config", None)
    c_in, c_out = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
    return isinstance(c_in, int) and isinstance(c_out, int) and c_out == 2 * c_in


def split_learned_variance(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, v): the first `channels` output channels and the learned-variance ones after them."""
    if out.shape[1] != 2 * channels:
        raise NoisecraftError(f"a learned-variance network must output {2 * channels} channels for {channels} input "
                              f"channels, got {out.shape[1]}; set out_channels to twice in_channels.")
    return out[:, :channels], out[:, channels:]


def _as_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ as a float tensor of shape (N,), broadcastable over a batch."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class Denoiser(nn.Module):
    """Wraps a network trained on a `NoiseSchedule` with a prediction type into D(x, σ, cond) -> x̂0.

    clip_x0: clamp x̂0 to [-1, 1], the data range (DDPM's sampler does this; it helps pixel models at
    few steps). Off by default so that every sampler sees the raw model, as the parity tests need.
    learned_variance: the net outputs 2C channels, the last C being improved DDPM's variance v; None (default)
    reads it from the net's config (out_channels == 2·in_channels). `last_variance` holds v of the latest call.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str = "eps", clip_x0: bool = False,
                 learned_variance: bool | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction = check_prediction_type(prediction)
        self.clip_x0 = clip_x0
        self.learned_variance = has_learned_variance(net) if learned_variance is None else bool(learned_variance)
        self.last_variance: torch.Tensor | None = None

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
        if self.learned_variance:
            out, v = split_learned_variance(out, x.shape[1])
            self.last_variance = v.detach()
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


def base_denoiser(denoiser: nn.Module) -> nn.Module:
    """The innermost denoiser under any guidance wrappers."""
    while isinstance(getattr(denoiser, "inner", None), nn.Module):
        denoiser = denoiser.inner
    return denoiser


def denoise_with_variance(denoiser: nn.Module, x: torch.Tensor, sigma, cond=None):
    """(x̂0, v) of one call: v is the learned variance output (N×C×H×W) of the innermost Denoiser, or None when
    the model has a fixed variance. Under classifier-free guidance, which runs one batch of [conditional;
    unconditional] rows, v is the conditional rows' (as in GLIDE); wrappers only change x̂0."""
    base = base_denoiser(denoiser)
    if not getattr(base, "learned_variance", False):
        return denoiser(x, sigma, cond), None
    base.last_variance = None
    x0 = denoiser(x, sigma, cond)
    v = base.last_variance
    return x0, (None if v is None else v[: x.shape[0]])


class DenoiserWrapper(nn.Module):
    """A denoiser built on another: passes on the schedule, σ range and learned variance samplers ask for."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.inner = denoiser

    @property
    def learned_variance(self) -> bool:
        return bool(getattr(self.inner, "learned_variance", False))

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


