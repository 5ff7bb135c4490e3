"""The noise schedule of a discrete-time diffusion model: one object, one source of truth.

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM):
β_t is the variance added at step t, α_t = 1 - β_t and ᾱ_t = Π_{s≤t} α_s. Everything else is
derived from ᾱ_t:

    σ_t      = sqrt((1 - ᾱ_t) / ᾱ_t)        noise level in the "variance exploding" view (k-diffusion, EDM)
    log-SNR  = log(ᾱ_t / (1 - ᾱ_t)) = -2 log σ_t

Timesteps are 0-based: t = 0 is the first noising step, t = T-1 the last. How a network's output (ε, x0 or v)
becomes x̂0, and its training target, is the scalings table of denoiser.py, not this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import NoisecraftError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "edm")
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0   # Karras et al. 2022, Table 1 (the σ range they sample)
MAX_T = 100_000    # diffusion steps; far above any published schedule, far below an allocation that fails


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM (Ho et al. 2020, §4): β_t linear from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion / latent diffusion: sqrt(β_t) linear, i.e. β_t = (linspace of sqrt β)²."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2).

    β_t = 1 - ᾱ_t/ᾱ_{t-1}, clipped to max_beta = 0.999 to avoid a singularity at t = T.
    """
    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def edm_betas(T: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
              rho: float = EDM_RHO) -> torch.Tensor:
    """The discrete schedule of an EDM-preconditioned run: T noise levels σ_t from σ_min to σ_max spaced uniformly
    in σ^(1/ρ) (Karras et al. 2022, eq. 5, ρ = 7), written as betas through ᾱ_t = 1/(1 + σ_t²),
    β_t = 1 - ᾱ_t/ᾱ_{t-1}. An EDM network works at any σ; this grid is what the discrete samplers (DDPM, DDIM, PLMS)
    and the variational bound visit, and it spans exactly the σ range EDM samples."""
    ramp = torch.linspace(0, 1, T, dtype=torch.float64)
    sigmas = (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    alpha_bar = 1.0 / (1.0 + sigmas**2)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return 1.0 - alpha_bar / prev


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per batch item (shape N), cast to like's dtype and device and shaped N×1×…×1 to broadcast over
    `like` (N×C×H×W). Coefficients are computed in float64 and cast here, at use."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] for each batch item, shaped by `per_sample` to broadcast over `like`."""
    return per_sample(values.to(like.device)[t.to(like.device).long()], like)


@dataclass
class NoiseSchedule:
    """β_t for t = 0..T-1 and everything derived from ᾱ_t (kept in float64, cast at use).

    Build one with `NoiseSchedule.create("linear" | "scaled_linear" | "cosine", T)`.
    """

    betas: torch.Tensor
    kind: str = "custom"

    def __post_init__(self):
        betas = torch.as_tensor(self.betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise NoisecraftError("betas must be a 1-D sequence of at least 2 values in (0, 1); "
                                  "check the schedule settings.")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # ᾱ_{t-1}, with ᾱ_{-1} = 1 (no noise before the first step).
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_snr = torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)
        # sqrt(ᾱ) and sqrt(1 - ᾱ) kept in float64: forming 1 - ᾱ after a cast to float32 keeps only ~4
        # digits at small t (1 - ᾱ_0 = β_0 = 1e-4 for the linear schedule).
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7).
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    @classmethod
    def create(cls, kind: str = "linear", T: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> "NoiseSchedule":
        """A named beta schedule: `linear` (DDPM), `scaled_linear` (Stable Diffusion), `cosine` (improved DDPM) or
        `edm` (σ 0.002..80 in EDM's ρ = 7 spacing, for EDM-preconditioned runs)."""
        if not isinstance(T, int) or not 2 <= T <= MAX_T:
            raise NoisecraftError(f"the number of diffusion steps T must be an integer in [2, {MAX_T}], got {T!r}.")
        kw = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
        if kind == "linear":
            betas = linear_betas(T, **kw)
        elif kind == "scaled_linear":
            betas = scaled_linear_betas(T, **kw)
        elif kind == "edm":
            if kw:
                raise NoisecraftError("the edm schedule takes no beta_start/beta_end (it spans σ 0.002..80); "
                                      "remove them.")
            betas = edm_betas(T)
        elif kind in ("cosine", "squaredcos_cap_v2"):
            if kw:
                raise NoisecraftError("the cosine schedule takes no beta_start/beta_end; remove them or use 'linear'.")
            betas, kind = cosine_betas(T), "cosine"
        else:
            raise NoisecraftError(f"unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}.")
        schedule = cls(betas, kind=kind)
        schedule.beta_range = kw
        return schedule

    @property
    def T(self) -> int:
        return len(self.betas)

    # --- forward process ------------------------------------------------------------------

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One forward step q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I)  (DDPM eq. 2)."""
        beta = at(self.betas, t, x_prev)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Closed form q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)  (DDPM eq. 4)."""
        return at(self.sqrt_alphas_cumprod, t, x0) * x0 + at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    # --- posterior ------------------------------------------------------------------------

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)  (DDPM eq. 6-7). Returns (mean, variance).

        μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t) · x_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t
        β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t
        """
        mean = at(self.posterior_mean_coef_x0, t, x0) * x0 + at(self.posterior_mean_coef_xt, t, xt) * xt
        var = at(self.posterior_variance, t, x0).expand_as(mean)
        return mean, var

    # --- σ <-> t ------------------------------------------------------------------------

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for a noise level, by linear interpolation of log σ over the T levels.

        Exact at the schedule's own σ_t, so discrete samplers feed the network integer timesteps.
        """
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp(min=1e-20).log()
        idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, self.T - 1)
        low, high = log_sigmas[idx - 1], log_sigmas[idx]
        w = ((log_sigma - low) / (high - low)).clamp(0, 1)
        return (idx - 1 + w).to(torch.float32)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at a (possibly fractional) timestep, interpolating log σ."""
        t = t.to(torch.float64).clamp(0, self.T - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        log_sigmas = self.sigmas.log().to(t.device)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def to_config(self) -> dict:
        """What `NoiseSchedule.create(**config)` needs to rebuild this schedule."""
        if self.kind == "custom":
            raise NoisecraftError("a custom beta schedule cannot be stored in a config; use a named schedule.")
        return {"kind": self.kind, "T": self.T, **getattr(self, "beta_range", {})}


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1 / (1 + σ²); σ = 0 gives ᾱ = 1 (clean data)."""
    return 1.0 / (1.0 + sigma**2)
