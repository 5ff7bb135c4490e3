"""Variational Diffusion Models (Kingma, Salimans, Poole & Ho 2021): continuous time, a learned noise schedule,
and the variational bound in bits/dim.

Sign convention of the paper: γ(t) = −log SNR(t), increasing in t, so

    α_t² = sigmoid(−γ(t)),   σ_t² = sigmoid(γ(t)),   z_t = α_t x + σ_t ε.

Data: 8-bit pixels, level v ∈ {0..255} placed at x_v = v/127.5 − 1 (noisecraft's [-1, 1] convention; the VDM
code uses 2(v + ½)/256 − 1, which differs by less than half a level and changes nothing else).

The bound per image (eq. 11), reported in bits per dimension (nats / (C·H·W · ln 2)):

    −log p(x) ≤ KL(q(z_1|x) ‖ N(0, I))                     prior loss
              + E_{q(z_0|x)}[−log p(x|z_0)]                 reconstruction loss (discretised decoder, 256 levels)
              + ½ E_{t~U(0,1), ε}[γ'(t) ‖ε − ε̂(z_t; t)‖²]    diffusion loss L_∞ (eq. 17)

Because the data are discrete and p(x|z_0) is a categorical over the 256 levels, the number is a bound on the
discrete negative log-likelihood: no dequantisation term is needed and it compares directly with published
bits/dim.

The ε-network is our UNet; its input is [z_t, Fourier features of z_t] (§4, appendix: sin/cos(2^n·π·z_t) let it
see the last bits of a nearly clean image), and its time input is the noise level, not t:
c = 1000·(γ(t) − γ_min)/(γ_max − γ_min) with the schedule's initial endpoints, so the network sees how much noise
there is whatever the learned schedule does with t (as in the VDM code).

The schedule's endpoints γ_0, γ_1 follow the gradient of the bound; its inner shape does not change the bound
(L_∞ depends on the schedule only through its endpoints, eq. 20), so the network's parameters follow the gradient
of E[L_∞²] instead — minimising the variance of the estimator (appendix I.2); see `VDM.loss`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoisecraftError, short_repr as _short
from ..settings import settings_from_dict
from .unet import UNet, UNetConfig

LEVELS = 256
LOG2 = math.log(2.0)


def level_values(device=None, dtype=torch.float32) -> torch.Tensor:
    """x_v = v/127.5 − 1 for the 256 pixel levels v."""
    return torch.arange(LEVELS, device=device, dtype=dtype) / 127.5 - 1.0


def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) with α² = sigmoid(−γ), σ² = sigmoid(γ): a variance-preserving process, α² + σ² = 1."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


# --- the learned schedule -------------------------------------------------------------------------

class PositiveLinear(nn.Module):
    """y = x·softplus(W)ᵀ + b: every weight is positive, so y is increasing in every input."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.raw_weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return F.softplus(self.raw_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MonotonicLogSNR(nn.Module):
    """The learned γ(t) = −log SNR(t) of VDM (appendix, "learned noise schedule"):

        γ̃(t) = l1(t) + l3(φ(l2(l1(t)))) / F,      φ = sigmoid, l2 with F = 1024 outputs,
        γ(t) = γ_0 + (γ_1 − γ_0) · (γ̃(t) − γ̃(0)) / (γ̃(1) − γ̃(0)).

    All weights of l1, l2, l3 are positive (softplus of raw weights), so γ̃ is strictly increasing and γ goes from
    γ_0 at t = 0 to γ_1 at t = 1 whatever those weights are (as long as γ_1 > γ_0, which training keeps: the bound
    pushes γ_0 down and γ_1 up). The 1/F keeps the sum of F sigmoids at the scale of l1, so the schedule starts
    close to linear in γ, as in the paper. γ'(t) is computed in closed form (`with_derivative`), so the diffusion
    loss needs no nested autograd.
    """

    def __init__(self, gamma_0: float = -13.3, gamma_1: float = 5.0, features: int = 1024):
        super().__init__()
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_0)))
        self.gamma_1 = nn.Parameter(torch.tensor(float(gamma_1)))
        self.features = features
        self.l1 = PositiveLinear(1, 1)
        self.l2 = PositiveLinear(1, features)
        self.l3 = PositiveLinear(features, 1, bias=False)
        with torch.no_grad():
            self.l1.raw_weight.fill_(math.log(math.e - 1.0))   # softplus⁻¹(1): l1(t) = t at the start
            self.l1.bias.zero_()

    def endpoint_parameters(self) -> list[nn.Parameter]:
        """γ_0 and γ_1: trained on the bound."""
        return [self.gamma_0, self.gamma_1]

    def network_parameters(self) -> list[nn.Parameter]:
        """The weights of γ̃: trained to minimise the variance of the diffusion loss."""
        return [p for name, p in self.named_parameters() if name not in ("gamma_0", "gamma_1")]

    def _unnormalized(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ̃(t) and dγ̃/dt for t of shape N (chain rule written out)."""
        t = t.reshape(-1, 1).to(self.gamma_0.dtype)
        h1 = self.l1(t)                                     # N×1
        dh1 = self.l1.weight                                # 1×1
        s = torch.sigmoid(self.l2(h1))                      # N×F
        ds = s * (1 - s) * (self.l2.weight.T * dh1)         # N×F, dφ/dt
        w3 = self.l3.weight / self.features                 # 1×F
        out = h1 + s @ w3.T
        dout = dh1 + ds @ w3.T
        return out.squeeze(1), dout.squeeze(1)

    def normalized(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u(t) = (γ̃(t) − γ̃(0)) / (γ̃(1) − γ̃(0)) ∈ [0, 1] and du/dt: the shape of the schedule, free of γ_0, γ_1."""
        ends, _ = self._unnormalized(torch.tensor([0.0, 1.0], device=t.device))
        g, dg = self._unnormalized(t)
        span = ends[1] - ends[0]
        return (g - ends[0]) / span, dg / span

    def with_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ(t) and γ'(t) = dγ/dt, for t of shape N in [0, 1]."""
        u, du = self.normalized(t)
        return self.from_normalized(u, du)

    def from_normalized(self, u: torch.Tensor, du: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.gamma_1 - self.gamma_0
        return self.gamma_0 + span * u, span * du

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.with_derivative(t)[0]


# --- input features -------------------------------------------------------------------------------

class FourierFeatures(nn.Module):
    """sin(2^n·π·z) and cos(2^n·π·z) for each n in `exponents`, per channel (VDM §4 and appendix B).

    With levels 2/255 apart, n = 8 turns a shift of one level into almost a full period, so the network can read
    the fine detail of a nearly noise-free z_t. The VDM code writes the same frequencies as 2^m·2π, m = 6, 7.
    Output channels, for each input channel in turn: the sines for every n, then the cosines.
    """

    def __init__(self, exponents: tuple[int, ...] = (7, 8)):
        super().__init__()
        self.exponents = tuple(exponents)
        self.register_buffer("freqs", torch.tensor([2.0 ** n * math.pi for n in self.exponents]), persistent=False)

    def channels(self, in_channels: int) -> int:
        return 2 * len(self.exponents) * in_channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.exponents:
            return z.new_zeros((z.shape[0], 0, *z.shape[2:]))
        h = z.unsqueeze(2) * self.freqs.to(z.dtype)[None, None, :, None, None]    # N×C×K×H×W
        return torch.cat([h.sin(), h.cos()], dim=2).flatten(1, 2)                 # N×(2KC)×H×W


# --- the model ------------------------------------------------------------------------------------

# Bounds far above any real run, so that a corrupted or hostile config fails with a clear sentence instead of
# exhausting the memory (the same limits as a diffusion run's image shape).
MAX_CHANNELS, MAX_VALUES_PER_IMAGE, MAX_SCHEDULE_FEATURES = 1024, 2 ** 28, 2 ** 20


@dataclass
class VDMConfig:
    """Everything besides the U-Net that rebuilds a VDM; stored as the "vdm" section of a run's config.json."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    fourier_exponents: tuple[int, ...] = (7, 8)    # () switches the Fourier features off
    gamma_min: float = -13.3                       # initial γ_0 (σ_0 ≈ 0.0013, a third of a level)
    gamma_max: float = 5.0                         # initial γ_1 (α_1² ≈ 0.0067)
    schedule_features: int = 1024
    variance_minimisation: bool = True             # schedule network on ∇E[L_∞²] (appendix I.2) instead of ∇VLB

    def __post_init__(self):
        for name in ("image_shape", "fourier_exponents"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise NoisecraftError(f"vdm.{name} must be a list of integers, got {_short(getattr(self, name))}.")
        self.image_shape = tuple(self.image_shape)
        self.fourier_exponents = tuple(self.fourier_exponents)
        if len(self.image_shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                             for s in self.image_shape):
            raise NoisecraftError(f"vdm.image_shape must be three positive integers (C, H, W), "
                                  f"got {_short(self.image_shape)}.")
        c, h, w = self.image_shape
        if c > MAX_CHANNELS or c * h * w > MAX_VALUES_PER_IMAGE:
            raise NoisecraftError(f"vdm.image_shape {self.image_shape} is too large (at most {MAX_CHANNELS} channels "
                                  f"and {MAX_VALUES_PER_IMAGE} values per image); fix or delete the config.")
        if len(self.fourier_exponents) > 17 or any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 16
                                                   for n in self.fourier_exponents):
            raise NoisecraftError(f"Fourier exponents must be up to 17 integers in 0..16 such as 7,8, "
                                  f"got {_short(self.fourier_exponents)}.")
        for name in ("gamma_min", "gamma_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NoisecraftError(f"vdm.{name} must be a finite number, got {value!r}.")
        if not self.gamma_min < self.gamma_max:
            raise NoisecraftError(f"vdm.gamma_min ({self.gamma_min}) must be below vdm.gamma_max "
                                  f"({self.gamma_max}): γ = −log SNR grows with t.")
        if isinstance(self.schedule_features, bool) or not isinstance(self.schedule_features, int) \
                or not 1 <= self.schedule_features <= MAX_SCHEDULE_FEATURES:
            raise NoisecraftError(f"vdm.schedule_features must be an integer in 1..{MAX_SCHEDULE_FEATURES}, "
                                  f"got {_short(self.schedule_features)}.")
        if not isinstance(self.variance_minimisation, bool):
            raise NoisecraftError(f"vdm.variance_minimisation must be true or false, "
                                  f"got {self.variance_minimisation!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> "VDMConfig":
        return settings_from_dict(cls, data, "vdm")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_shape"], d["fourier_exponents"] = list(self.image_shape), list(self.fourier_exponents)
        return d


class VLBTerms(NamedTuple):
    """The bound per image in bits/dim (each a tensor of shape N): total = diffusion + prior + reconstruction."""

    total: torch.Tensor
    diffusion: torch.Tensor
    prior: torch.Tensor
    reconstruction: torch.Tensor


def low_discrepancy_times(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t_i = (u + i/n) mod 1 with one u ~ U(0, 1): each t_i is uniform, and together they cover [0, 1] evenly
    (VDM appendix, "low-discrepancy sampler"), which lowers the variance of the batch's diffusion loss."""
    u = torch.rand((), generator=generator)
    return ((u + torch.arange(n, dtype=torch.float32) / n) % 1.0).to(device)


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Pixel levels 0..255 (int64) from uint8 images, or from float images in [-1, 1] (rounded to the nearest)."""
    if x.dtype == torch.uint8:
        return x.long()
    if not x.is_floating_point():
        raise NoisecraftError(f"images must be uint8 or float in [-1, 1], got {x.dtype}.")
    return ((x.float() + 1.0) * 127.5).round().clamp(0, LEVELS - 1).long()


class VDM(nn.Module):
    """A variational diffusion model: the learned schedule γ(t), Fourier features and an ε-predicting UNet.

        model = VDM(UNetConfig(base_channels=32), VDMConfig(image_shape=(1, 28, 28)))
        terms = model.loss(images_uint8, generator)      # bits/dim per image, and its three parts
        terms.total.mean().backward()
        x = model.sample(16, steps=256, generator=g)     # images in [-1, 1]

    `unet` gives the network's shape; its in_channels/out_channels are set here (C plus the Fourier channels in,
    C out), so any UNetConfig, e.g. `default_model_config`, can be passed.
    """

    def __init__(self, unet: UNetConfig, config: VDMConfig):
        super().__init__()
        self.config = config
        c = config.image_shape[0]
        self.fourier = FourierFeatures(config.fourier_exponents)
        self.unet_config = replace(unet, in_channels=c + self.fourier.channels(c), out_channels=c)
        self.unet = UNet(self.unet_config)
        self.schedule = MonotonicLogSNR(config.gamma_min, config.gamma_max, config.schedule_features)
        self.unet.check_input(torch.empty((1, self.unet_config.in_channels, *config.image_shape[1:]), device="meta"))

    @property
    def dims(self) -> int:
        c, h, w = self.config.image_shape
        return c * h * w

    def check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.config.image_shape:
            raise NoisecraftError(f"this model takes images of shape N×{'×'.join(map(str, self.config.image_shape))}, "
                                  f"got {tuple(x.shape)}; use the dataset and image size it was trained on.")

    # --- the network --------------------------------------------------------------------------

    def noise_level(self, gamma: torch.Tensor) -> torch.Tensor:
        """The UNet's time input: γ mapped to [0, 1000] by the schedule's initial endpoints."""
        c = self.config
        return 1000.0 * (gamma - c.gamma_min) / (c.gamma_max - c.gamma_min)

    def eps(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """ε̂(z_t; γ_t): the noise predicted from z_t and its Fourier features."""
        inputs = torch.cat([z, self.fourier(z)], dim=1)
        return self.unet(inputs, self.noise_level(gamma.expand(z.shape[0])))

    # --- the bound ----------------------------------------------------------------------------

    def reconstruction_logprobs(self, z0_rescaled: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
        """log p(x = v | z_0) for each pixel and level v (shape ...×256): a categorical whose logit for v is the
        Gaussian log-density −½(z_0/α_0 − x_v)²/exp(γ_0) (z_0/α_0 = x + e^{γ_0/2}·ε, as in the VDM code)."""
        x_v = level_values(z0_rescaled.device, z0_rescaled.dtype)
        logits = -0.5 * (z0_rescaled.unsqueeze(-1) - x_v).square() * torch.exp(-gamma_0)
        return logits.log_softmax(dim=-1)

    def reconstruction_nll(self, z0_rescaled: torch.Tensor, levels: torch.Tensor, gamma_0: torch.Tensor,
                           tail: float = 8.0) -> torch.Tensor:
        """−log p(x = levels | z_0) per pixel: the categorical of `reconstruction_logprobs`, evaluated for the true
        level only, with its normaliser summed over the levels within `tail`·σ_0/α_0 of z_0/α_0 (each level further
        out weighs less than e^{−tail²/2} ≈ 1e-14 of the nearest one; all 256 levels when the window would
        cover them). Equal to the full sum to float precision, and over 10× cheaper while σ_0 is below a level."""
        k = torch.exp(-gamma_0)
        # x_v and the logits computed exactly as for the window below, so that the two cancel bit for bit
        logit_true = -0.5 * (z0_rescaled - (levels.to(z0_rescaled.dtype) / 127.5 - 1.0)).square() * k
        half = math.ceil(tail * math.exp(0.5 * gamma_0.item()) * 127.5) + 1      # window half-width in levels
        if 2 * half + 1 >= LEVELS:
            all_logits = -0.5 * (z0_rescaled.unsqueeze(-1) - level_values(z0_rescaled.device)).square() * k
            return all_logits.logsumexp(-1) - logit_true
        with torch.no_grad():
            centre = ((z0_rescaled + 1.0) * 127.5).round().clamp(0, LEVELS - 1)
            idx = centre.unsqueeze(-1) + torch.arange(-half, half + 1, device=z0_rescaled.device)
            outside = (idx < 0) | (idx > LEVELS - 1)
        logits = -0.5 * (z0_rescaled.unsqueeze(-1) - (idx / 127.5 - 1.0)).square() * k
        return logits.masked_fill(outside, -math.inf).logsumexp(-1) - logit_true

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> VLBTerms:
        """The continuous-time bound per image, in bits/dim, with its three parts (see the module docstring).

        `x`: uint8 images N×C×H×W, or float images in [-1, 1] (rounded to the 256 levels). Noise and t come from
        `generator` (CPU); t is drawn with the low-discrepancy sampler.

        Variance minimisation (appendix I.2), when config.variance_minimisation is set and gradients are on:
        a hook on the schedule's shape u(t_i), u'(t_i) (through which alone the network's parameters θ enter the
        loss of image i) multiplies the gradient arriving there by 2·L_i, with L_i the image's diffusion loss in
        bits/dim. Backpropagating mean_i(total_i) therefore gives θ the gradient of mean_i(L_i²) — an unbiased
        estimate of ∇_θ E[L_∞²] = ∇_θ Var[L_∞] (E[L_∞] does not depend on θ) — while the U-Net and the endpoints
        γ_0, γ_1 receive the ordinary gradient of the bound, all in one backward pass. (Backpropagating
        c·mean_i(total_i) gives θ c times the same.)
        """
        self.check_images(x)
        levels = to_levels(x)
        device = next(self.parameters()).device
        levels = levels.to(device)
        f = levels.to(torch.float32) / 127.5 - 1.0
        n = f.shape[0]
        eps_0 = torch.randn(f.shape, generator=generator).to(device)
        eps = torch.randn(f.shape, generator=generator).to(device)
        t = low_discrepancy_times(n, generator, device)
        sched = self.schedule
        g0, g1 = sched.gamma_0, sched.gamma_1
        nats = 1.0 / (self.dims * LOG2)      # nats per image -> bits per dimension

        # Reconstruction: −log p(x | z_0), z_0 ~ q(z_0 | x).
        z0_rescaled = f + torch.exp(0.5 * g0) * eps_0
        recon = self.reconstruction_nll(z0_rescaled, levels, g0).flatten(1).sum(1)

        # Prior: KL(N(α_1 x, σ_1²) ‖ N(0, 1)) summed over the pixels.
        a1_sq, s1_sq = torch.sigmoid(-g1), torch.sigmoid(g1)
        prior = 0.5 * (a1_sq * f.square() + s1_sq - F.logsigmoid(g1) - 1.0).flatten(1).sum(1)

        # Diffusion: L_∞ = ½ γ'(t) ‖ε − ε̂(z_t; t)‖² (eq. 17).
        u, du = sched.normalized(t)
        gamma_t, dgamma_t = sched.from_normalized(u, du)
        alpha_t, sigma_t = alpha_sigma(gamma_t.view(-1, 1, 1, 1))
        z_t = alpha_t * f + sigma_t * eps
        diffusion = 0.5 * dgamma_t * (eps - self.eps(z_t, gamma_t)).square().flatten(1).sum(1)

        diffusion_bpd = diffusion * nats
        if self.config.variance_minimisation and u.requires_grad and torch.is_grad_enabled():
            weight = 2.0 * diffusion_bpd.detach()
            u.register_hook(lambda grad: grad * weight)
            du.register_hook(lambda grad: grad * weight)
        recon_bpd, prior_bpd = recon * nats, prior * nats
        return VLBTerms(diffusion_bpd + prior_bpd + recon_bpd, diffusion_bpd, prior_bpd, recon_bpd)

    # --- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, z0: torch.Tensor, generator: torch.Generator | None = None, mode: str = "sample") -> torch.Tensor:
        """Images in [-1, 1] from z_0: each pixel drawn from p(x | z_0) over the 256 levels ("sample") or its most
        likely level ("argmax")."""
        g0 = self.schedule.gamma_0
        alpha_0 = torch.sigmoid(-g0).sqrt()
        logprobs = self.reconstruction_logprobs(z0 / alpha_0, g0)
        if mode == "argmax":
            idx = logprobs.argmax(-1)
        elif mode == "sample":
            flat = logprobs.reshape(-1, LEVELS).exp().cpu()
            idx = torch.multinomial(flat, 1, generator=generator).view(z0.shape).to(z0.device)
        else:
            raise NoisecraftError(f"unknown decode mode {mode!r}; use \"sample\" or \"argmax\".")
        return idx.to(z0.dtype) / 127.5 - 1.0

    @torch.no_grad()
    def sample(self, n: int, steps: int = 256, generator: torch.Generator | None = None,
               decode: str = "sample") -> torch.Tensor:
        """n images (N×C×H×W in [-1, 1]) by ancestral sampling over `steps` equal steps of t from 1 to 0.

        Each step draws z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x̂(z_t)) (VDM appendix, eq. 33): with c = 1 − e^{γ_s−γ_t},

            z_s = (α_s/α_t)·(z_t − σ_t·c·ε̂(z_t; t)) + σ_s·√c·ε,

        then z_0 is decoded by p(x | z_0).
        """
        if not isinstance(steps, int) or steps < 1:
            raise NoisecraftError(f"steps must be a positive integer, got {steps!r}.")
        if not isinstance(n, int) or n < 1:
            raise NoisecraftError(f"n must be a positive integer, got {n!r}.")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            z = torch.randn((n, *self.config.image_shape), generator=generator).to(device)
            times = torch.linspace(1.0, 0.0, steps + 1, device=device)
            gammas = self.schedule(times)
            for i in range(steps):
                g_t, g_s = gammas[i], gammas[i + 1]
                c = -torch.expm1(g_s - g_t)
                alpha_t, sigma_t = alpha_sigma(g_t)
                alpha_s, sigma_s = alpha_sigma(g_s)
                eps_hat = self.eps(z, g_t)
                noise = torch.randn(z.shape, generator=generator).to(device)
                z = alpha_s / alpha_t * (z - sigma_t * c * eps_hat) + sigma_s * c.sqrt() * noise
            return self.decode(z, generator, decode)
        finally:
            self.train(was_training)
