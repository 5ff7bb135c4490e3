"""One interface for every sampler: a denoiser D(x, σ, cond) -> x̂0, and the one table of scalings that turns a
network's output into x̂0 (for sampling), its training target (for the loss) and x̂0 at x_t (for the bound).

This is the view of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", EDM) and k-diffusion: samplers work on x = x0 + σ·ε (the "variance exploding" scale), and a
denoiser answers the best guess of the clean image x0 at noise level σ. A network trained in discrete
time on the DDPM ("variance preserving") process x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε is wrapped by
scaling its input with c_in = sqrt(ᾱ) = 1/sqrt(1 + σ²) and mapping σ back to its timestep t.

The scalings table (EDM Table 1 and eq. 7-8; k-diffusion's `Denoiser.get_scalings` and `loss`): the network F
sees c_in(σ)·x and its timestep t(σ), and

    D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, t(σ)),      trained towards F* = (x0 - c_skip·x) / c_out,

so that F = F* gives D = x0. One row (`Parameterisation`) per prediction type:

    prediction  c_skip       c_out             c_in             target F*
    eps         1            -σ                1/sqrt(1 + σ²)   ε                           (DDPM eq. 14)
    x0          0            1                 1/sqrt(1 + σ²)   x0
    v           1/(1 + σ²)   -σ/sqrt(1 + σ²)   1/sqrt(1 + σ²)   sqrt(ᾱ)·ε - sqrt(1 - ᾱ)·x0  (Salimans & Ho 2022)

eps is Ho et al. 2020 (DDPM), eq. 14: x̂0 = x - σ·ε̂, i.e. x_t = sqrt(ᾱ)x0 + sqrt(1 - ᾱ)ε solved for x0 on the σ
scale; v is Salimans & Ho 2022 ("Progressive Distillation", §4), x̂0 = sqrt(ᾱ)·x_t - sqrt(1 - ᾱ)·v̂. With
c_in = 1/sqrt(1 + σ²) the network's input c_in·x is the DDPM x_t, and ᾱ = 1/(1 + σ²). The same row serves
sampling (`Denoiser.forward`), the training loss (losses.py: the target, and the Min-SNR weight through c_out²)
and the variational bound (likelihood.py: x̂0 from the output at x_t). EDM's preconditioning (Karras et al. 2022,
Table 1 and eq. 7) is one more row, for networks trained with it (`--preconditioning edm`):

    edm         σ_d²/(σ² + σ_d²)   σ·σ_d/sqrt(σ² + σ_d²)   1/sqrt(σ² + σ_d²)   (x0 - c_skip·x)/c_out

with σ_d the data's standard deviation (0.5 for images in [-1, 1]). Its network sees its own noise input c_noise(σ)
instead of the schedule's timestep: EDM's ¼·ln σ, times 1000 so that it spans what our sinusoidal time embedding
was built for (DDPM's t in 0..999); the factor is a fixed rescaling of the paper's input, not a new design.

Learned variance (improved DDPM, Nichol & Dhariwal 2021, §3.1): a network with 2C output channels for C input
channels predicts as usual in its first C channels and, in the other C, a value v per pixel that sets the
reverse-step variance (`learned_log_variance`, eq. 15). The denoiser answers x̂0 from the first C channels, so
every sampler works unchanged, and keeps v of its latest call for the samplers that use it (DDPM): read it with
`denoise_with_variance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import NoisecraftError
from .schedule import NoiseSchedule, alpha_bar_from_sigma, per_sample

EDM_SIGMA_DATA = 0.5      # σ_d of images in [-1, 1] (Karras et al. 2022, Table 1)
EDM_NOISE_SCALE = 1000.0  # c_noise = 1000·¼·ln σ: EDM's noise input on the span of our timestep embedding

# The reverse-step variances of DDPM's p_θ(x_{t-1} | x_t) (Ho et al. 2020, §3.2; improved DDPM eq. 15).
VARIANCES = {
    "small": "β̃_t, the variance of the posterior q(x_{t-1} | x_t, x0) (DDPM eq. 7)",
    "large": "β_t, the variance of the forward step (DDPM eq. 2)",
    "learned": "between log β_t and log β̃_t, set by the network (improved DDPM eq. 15; --learn-sigma)",
}


# --- the scalings table ------------------------------------------------------------------------------


def vp_c_in(sigma: torch.Tensor) -> torch.Tensor:
    """c_in = sqrt(ᾱ) = 1/sqrt(1 + σ²): the σ scale's x to the DDPM (VP) scale, x_t = c_in·x."""
    return alpha_bar_from_sigma(sigma).sqrt()


@dataclass(frozen=True)
class Parameterisation:
    """One row of the scalings table (see the module docstring): c_skip, c_out and c_in as functions of σ (a
    float64 tensor of shape N). Coefficients are formed in float64 and cast to the data's dtype at use."""

    name: str
    c_skip: Callable[[torch.Tensor], torch.Tensor]
    c_out: Callable[[torch.Tensor], torch.Tensor]
    c_in: Callable[[torch.Tensor], torch.Tensor] = vp_c_in
    c_noise: Callable[[torch.Tensor], torch.Tensor] | None = None   # None: the schedule's timestep t(σ)

    def noise_input(self, sigma: torch.Tensor, schedule: NoiseSchedule | None) -> torch.Tensor:
        """What the network gets as its time input at σ: c_noise(σ), or for the VP rows the timestep t(σ) of the
        schedule it was trained on."""
        if self.c_noise is not None:
            return self.c_noise(sigma.to(torch.float64)).to(torch.float32)
        return schedule.sigma_to_t(sigma)

    def output_at(self, net, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, cond=None) -> torch.Tensor:
        """The network's output at the DDPM x_t = sqrt(ᾱ_t)x0 + sqrt(1 - ᾱ_t)ε of integer timesteps t (the loss
        and the bound). The VP rows' input is x_t itself and their time input t; other rows see c_in·x with
        x = x_t/sqrt(ᾱ_t), and c_noise."""
        if self.c_noise is None:
            return net(x_t, t.float(), cond)
        sigma = schedule.sigmas.to(x_t.device)[t.long()]
        return net(x_t * per_sample(self.c_in(sigma) / vp_c_in(sigma), x_t), self.noise_input(sigma, schedule), cond)

    def scalings(self, sigma: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in) at σ (shape N), each N×1×…×1 in like's dtype."""
        sigma = sigma.to(torch.float64)
        return tuple(per_sample(c(sigma), like) for c in (self.c_skip, self.c_out, self.c_in))

    def denoise(self, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x̂0 = c_skip·x + c_out·out, for x on the σ scale and the network's output `out` at c_in·x (EDM eq. 7)."""
        c_skip, c_out, _ = self.scalings(sigma, x)
        return c_skip * x + c_out * out

    def denoise_input(self, x_t: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x̂0 = (c_skip/sqrt(ᾱ))·x_t + c_out·out from the DDPM x_t = sqrt(ᾱ)·x of the loss and the bound and the
        network's output there (`output_at`). For the VP rows x_t is the network's own input c_in·x."""
        sigma = sigma.to(torch.float64)
        skip = per_sample(self.c_skip(sigma) / vp_c_in(sigma), x_t)
        return skip * x_t + per_sample(self.c_out(sigma), x_t) * out

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The training target F* = (x0 - c_skip·x)/c_out for x = x0 + σ·ε (EDM eq. 8), written a·x0 + b·ε with
        a = (1 - c_skip)/c_out and b = -c_skip·σ/c_out formed in float64: exactly ε for eps and x0 for x0; v for v."""
        sigma = sigma.to(torch.float64)
        c_skip, c_out = self.c_skip(sigma), self.c_out(sigma)
        return per_sample((1 - c_skip) / c_out, x0) * x0 + per_sample(-c_skip * sigma / c_out, noise) * noise

    def x0_error_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_out(σ)² (float64, shape N): ||x̂0 - x0||² = c_out²·||F - F*||², the x0-scale weight of the F-loss."""
        return self.c_out(sigma.to(torch.float64)) ** 2


PARAMETERISATIONS = {
    "eps": Parameterisation("eps", c_skip=torch.ones_like, c_out=lambda sigma: -sigma),
    "x0": Parameterisation("x0", c_skip=torch.zeros_like, c_out=torch.ones_like),
    "v": Parameterisation("v", c_skip=alpha_bar_from_sigma,
                          c_out=lambda sigma: -(1 - alpha_bar_from_sigma(sigma)).sqrt()),
}
PREDICTION_TYPES = (*PARAMETERISATIONS, "edm")


def edm_parameterisation(sigma_data: float = EDM_SIGMA_DATA) -> Parameterisation:
    """EDM's preconditioning (Karras et al. 2022, Table 1, "Network and preconditioning") for data of standard
    deviation σ_d: unit-variance network input and target at every σ, and c_skip -> 1 as σ -> 0."""
    sd = float(sigma_data)
    if not sd > 0:
        raise NoisecraftError(f"sigma_data must be positive, got {sigma_data!r}.")
    return Parameterisation(
        "edm",
        c_skip=lambda sigma: sd**2 / (sigma**2 + sd**2),
        c_out=lambda sigma: sigma * sd / (sigma**2 + sd**2).sqrt(),
        c_in=lambda sigma: 1 / (sigma**2 + sd**2).sqrt(),
        c_noise=lambda sigma: EDM_NOISE_SCALE * sigma.clamp(min=1e-20).log() / 4)


def check_prediction_type(prediction: str) -> str:
    if prediction not in PREDICTION_TYPES:
        raise NoisecraftError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTION_TYPES)}.")
    return prediction


def parameterisation(prediction, sigma_data: float = EDM_SIGMA_DATA) -> Parameterisation:
    """The row of the scalings table for a prediction type ("eps", "x0", "v", or "edm" with its σ_d); a row passes
    through unchanged."""
    if isinstance(prediction, Parameterisation):
        return prediction
    if check_prediction_type(prediction) == "edm":
        return edm_parameterisation(sigma_data)
    return PARAMETERISATIONS[prediction]


# --- learned variance ---------------------------------------------------------------------------------


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


# --- σ per sample -------------------------------------------------------------------------------------


def batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ (a number, or one per sample) as a float64 tensor of shape (N,) on x's device."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def sigma_like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ per sample as an N×1×…×1 tensor of x's dtype, to scale a batch sample by sample."""
    return per_sample(batch_sigma(sigma, x), x)


class Denoiser(nn.Module):
    """Wraps a network trained on a `NoiseSchedule` with a prediction type into D(x, σ, cond) -> x̂0, by the
    prediction type's row of the scalings table (`parameterisation`), with t(σ) from `schedule.sigma_to_t` (or the
    row's own c_noise: EDM). sigma_data: σ_d of the EDM row.

    clip_x0: clamp x̂0 to [-1, 1], the data range (DDPM's sampler does this; it helps pixel models at
    few steps). Off by default so that every sampler sees the raw model, as the parity tests need.
    learned_variance: the net outputs 2C channels, the last C being improved DDPM's variance v; None (default)
    reads it from the net's config (out_channels == 2·in_channels). `last_variance` holds v of the latest call.
    sigma_max_cap: the highest σ that Karras and nested σ grids start from (`sigma_max`); None: the schedule's σ(T).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str = "eps", clip_x0: bool = False,
                 learned_variance: bool | None = None, sigma_data: float = EDM_SIGMA_DATA,
                 sigma_max_cap: float | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parameterisation = parameterisation(prediction, sigma_data)
        self.prediction = self.parameterisation.name
        self.clip_x0 = clip_x0
        self.learned_variance = has_learned_variance(net) if learned_variance is None else bool(learned_variance)
        self.last_variance: torch.Tensor | None = None
        self.sigma_max_cap = sigma_max_cap

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        """Where σ grids start: σ(T), or the cap where that is lower."""
        top = self.schedule.sigma_max
        return top if self.sigma_max_cap is None else min(top, float(self.sigma_max_cap))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        c_skip, c_out, c_in = self.parameterisation.scalings(sigma, x)
        out = self.net(x * c_in, self.parameterisation.noise_input(sigma, self.schedule), cond)
        if self.learned_variance:
            out, v = split_learned_variance(out, x.shape[1])
            self.last_variance = v.detach()
        x0 = c_skip * x + c_out * out
        return x0.clamp(-1, 1) if self.clip_x0 else x0


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


class ConsistencyFunction(DenoiserWrapper):
    """A consistency model f(x, σ) (Song et al. 2023, "Consistency Models", §3, eq. 5) built on a denoiser D:

        f(x, σ) = c_skip(σ)·x + (1 - c_skip(σ))·D(x, σ),      c_skip(σ) = s² / ((σ - σ_min)² + s²),

    so f(x, σ_min) = x exactly (the boundary condition that makes f a consistency function) and f = D wherever σ is
    a few s above σ_min. The paper puts the same c_skip on a raw network output; putting it on D instead keeps a
    student that starts as a copy of its teacher equal to the teacher's x̂0 at every σ that matters, whatever the
    teacher's prediction type. s = σ_min: the boundary layer is as thin as the model's own noise range allows."""

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        s = self.sigma_min
        return s**2 / ((sigma - s) ** 2 + s**2)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        c_skip = sigma_like(self.c_skip(sigma), x)
        return c_skip * x + (1 - c_skip) * self.inner(x, sigma, cond)
