"""The variational bound on the negative log-likelihood, in bits per dimension.

DDPM (Ho et al. 2020, eq. 5) bounds -log p_θ(x0) by

    L_vlb = L_T + Σ_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x0) || N(0, I))                       the prior term (no parameters)
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p_θ(x_{t-1} | x_t))    Gaussians on both sides: closed form
    L_0     = -log p_θ(x0 | x_1)                                a discretized Gaussian over the 256 pixel levels

In our 0-based timesteps t = 0..T-1: L_T is taken at t = T-1, the KL terms at t = 1..T-1, and the decoder L_0
at t = 0. Improved DDPM (Nichol & Dhariwal 2021, §2-3) gives the decoder and the learned variance used here.

Units: every term is reported in bits per dimension, nats / (D·ln 2) with D = C·H·W, so the terms add up to
the bound in bits/dim. Images are in [-1, 1] on the 256-level grid x = 2k/255 - 1 (the dataset's uint8 / 127.5
- 1); the discretized decoder makes the bound a bound on the *discrete* likelihood, so no dequantisation noise is
needed and numbers compare with published bits/dim. `continuous_decoder=True` uses a Gaussian density instead
(for continuous data, e.g. latents or toy tests; densities can give negative bits).

The network is the raw f(x_t, t, cond) on the DDPM (VP) scale that the Trainer trains, predicting eps, x0 or v
(and, with a learned variance, 2C channels: see denoiser.py), or an EDM-preconditioned network, which sees
c_in·x and c_noise(σ_t) instead (`Parameterisation.output_at`): the bound is then taken on the run's discrete
"edm" schedule, the T levels of σ it was sampled on.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.special import log_ndtr

from .denoiser import (
    Denoiser,
    learned_log_variance,
    parameterisation,
    split_learned_variance,
)
from .errors import NoisecraftError
from .schedule import NoiseSchedule, at

LN2 = math.log(2.0)
BIN_HALF_WIDTH = 1.0 / 255.0   # half of the 2/255 spacing of the 256 levels in [-1, 1]


# --- Gaussian building blocks -------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats:
    ½ (log σ2² - log σ1² + (σ1² + (μ1 - μ2)²)/σ2² - 1)."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(a) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_log_density(x, mean, logvar) -> torch.Tensor:
    """log N(x; mean, e^logvar) per element, in nats (the continuous decoder)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a < 0, accurate for a near 0 and very negative (Mächler 2012); each branch gets inputs
    on which it is finite, so gradients through torch.where stay finite too."""
    near = a.clamp(min=-LN2, max=-1e-30)
    far = a.clamp(max=-LN2)
    return torch.where(a > -LN2, torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))


def _log_normal_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Φ(hi) - Φ(lo)) for lo < hi. Intervals right of 0 are mirrored to the left tail, where log Φ is
    accurate, so bins many standard deviations from the mean keep their (tiny) mass instead of rounding to 0."""
    flip = (lo + hi) > 0
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi = log_ndtr(hi)
    return log_hi + _log1mexp(log_ndtr(lo) - log_hi)


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """log P(bin of x) per element, in nats, for x on the 256-level grid of [-1, 1] (improved DDPM §2, the
    decoder of DDPM eq. 13): the mass of N(mean, e^{2·log_scale}) over [x - 1/255, x + 1/255], with the edge
    bins open, (-∞, -1 + 1/255] and [1 - 1/255, ∞), so the 256 probabilities sum to 1 for any mean and scale.
    log_scale is the log standard deviation."""
    x, mean, log_scale = torch.as_tensor(x), torch.as_tensor(mean), torch.as_tensor(log_scale)
    inv_std = torch.exp(-log_scale)
    lo = (x - mean - BIN_HALF_WIDTH) * inv_std
    hi = (x - mean + BIN_HALF_WIDTH) * inv_std
    left_edge = log_ndtr(hi)              # log Φ(hi)
    right_edge = log_ndtr(-lo)            # log (1 - Φ(lo))
    middle = _log_normal_mass(lo, hi)
    return torch.where(x < -0.999, left_edge, torch.where(x > 0.999, right_edge, middle))


# --- p_θ(x_{t-1} | x_t) -------------------------------------------------------------------------------


def _timesteps(t, x: torch.Tensor, T: int) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    bad_shape = t.shape != (x.shape[0],)
    if bad_shape or bool(((t < 0) | (t >= T) | (t != t.round())).any()):
        raise NoisecraftError(f"timesteps must be integers in 0..{T - 1}, one per image or one for all.")
    return t.long()


def posterior_log_variance_clipped(schedule: NoiseSchedule) -> torch.Tensor:
    """log β̃_t for t = 0..T-1, with log β̃_1 in place of log β̃_0 = log 0 (improved DDPM: the "clipped" log)."""
    var = schedule.posterior_variance
    return torch.cat([var[1:2], var[1:]]).log()


def fixed_log_variance(schedule: NoiseSchedule, variance: str) -> torch.Tensor:
    """log of DDPM's fixed reverse variances for t = 0..T-1: "small" β̃_t (clipped at t = 0) or "large" β_t,
    which at t = 0 is β̃_1 as well, as improved DDPM does for a better decoder likelihood."""
    if variance == "small":
        return posterior_log_variance_clipped(schedule)
    if variance == "large":
        return torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]).log()
    raise NoisecraftError(f"unknown variance {variance!r}; choose 'small' (posterior β̃), 'large' (β) or a "
                          f"learned variance (learned_variance=True).")


def _unwrap(denoiser_or_net, prediction, learned_variance, clip_x0):
    """A Denoiser brings its own net, prediction type, learned variance and x̂0 clipping; a raw net takes the
    arguments."""
    if isinstance(denoiser_or_net, Denoiser):
        d = denoiser_or_net
        return d.net, d.parameterisation, d.learned_variance, d.clip_x0
    return denoiser_or_net, parameterisation(prediction), bool(learned_variance), bool(clip_x0)


def posterior_from_output(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, *,
                          prediction: str = "eps", learned_variance: bool = False, variance: str = "small",
                          clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, log_variance, x0_hat) of p_θ(x_{t-1} | x_t) from the network's output `out` at (x_t, t).

    x̂0 comes from the prediction type's row of the scalings table (denoiser.py) at σ_t (`prediction`: a name or
    a row), from x_t and the output there; the mean is the posterior mean μ̃_t(x_t, x̂0) (DDPM eq. 7, 11); the variance is fixed
    (`variance`) or learned: log Σ = frac·log β_t + (1 - frac)·log β̃_t (improved DDPM eq. 15), with the
    clipped log β̃."""
    if learned_variance:
        out, v = split_learned_variance(out, x_t.shape[1])
    sigma = schedule.sigmas.to(x_t.device)[t.to(x_t.device).long()]
    x0_hat = parameterisation(prediction).denoise_input(x_t, out, sigma)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    mean, _ = schedule.posterior(x0_hat, x_t, t)
    if learned_variance:
        log_var = learned_log_variance(v, at(schedule.betas.log(), t, x_t),
                                       at(posterior_log_variance_clipped(schedule), t, x_t))
    else:
        log_var = at(fixed_log_variance(schedule, variance), t, x_t).expand_as(mean)
    return mean, log_var, x0_hat


def model_posterior(denoiser_or_net, schedule: NoiseSchedule, x_t: torch.Tensor, t, cond=None, prediction="eps",
                    learned_variance=False, variance="small", clip_x0: bool = False):
    """p_θ(x_{t-1} | x_t) on the DDPM (VP) scale: (mean, log_variance, x0_hat).

    `denoiser_or_net`: the raw network f(x_t, t, cond) with the given prediction type, or a Denoiser, whose
    net, prediction type, learned variance and clip_x0 are used instead of the arguments. t: an int or one
    integer timestep per image."""
    net, prediction, learned_variance, clip_x0 = _unwrap(denoiser_or_net, prediction, learned_variance, clip_x0)
    t = _timesteps(t, x_t, schedule.T)
    out = prediction.output_at(net, x_t, t, schedule, cond)
    return posterior_from_output(schedule, x_t, t, out, prediction=prediction, learned_variance=learned_variance,
                                 variance=variance, clip_x0=clip_x0)


# --- the terms of the bound ---------------------------------------------------------------------------


def _nats_to_bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """Per-element nats -> bits/dim per image: the mean over C·H·W divided by ln 2."""
    return nats.flatten(1).mean(1) / LN2


def vlb_terms_from_output(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                          out: torch.Tensor, *, prediction: str = "eps", learned_variance: bool = False,
                          variance: str = "small", continuous_decoder: bool = False,
                          clip_x0: bool = False) -> torch.Tensor:
    """Bits/dim per image of term t (L_{t-1} for t > 0, L_0 at t = 0) from the network's output at (x_t, t);
    differentiable, for training losses."""
    mean, log_var, _ = posterior_from_output(schedule, x_t, t, out, prediction=prediction,
                                             learned_variance=learned_variance, variance=variance, clip_x0=clip_x0)
    true_mean, _ = schedule.posterior(x0, x_t, t)
    true_log_var = at(posterior_log_variance_clipped(schedule), t, x_t)
    kl = _nats_to_bits_per_dim(normal_kl(true_mean, true_log_var, mean, log_var))
    if continuous_decoder:
        decoder = -_nats_to_bits_per_dim(gaussian_log_density(x0, mean, log_var))
    else:
        decoder = -_nats_to_bits_per_dim(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
    return torch.where(t.to(kl.device) == 0, decoder, kl)


def vlb_terms(net, schedule: NoiseSchedule, x0: torch.Tensor, t, noise: torch.Tensor, *, cond=None,
              prediction="eps", learned_variance=False, variance="small", continuous_decoder: bool = False,
              clip_x0: bool = False) -> torch.Tensor:
    """Bits/dim per image of term t of the bound for images x0 in [-1, 1], with x_t = q_sample(x0, t, noise):
    L_{t-1} = KL(q(x_{t-1}|x_t, x0) || p_θ(x_{t-1}|x_t)) for t > 0 and L_0 = -log p_θ(x0|x_t) at t = 0."""
    net, prediction, learned_variance, clip_x0 = _unwrap(net, prediction, learned_variance, clip_x0)
    t = _timesteps(t, x0, schedule.T)
    x_t = schedule.q_sample(x0, t, noise)
    out = prediction.output_at(net, x_t, t, schedule, cond)
    return vlb_terms_from_output(schedule, x0, x_t, t, out, prediction=prediction, learned_variance=learned_variance,
                                 variance=variance, continuous_decoder=continuous_decoder, clip_x0=clip_x0)


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim per image: q(x_T|x0) = N(sqrt(ᾱ_{T-1}) x0, (1 - ᾱ_{T-1}) I)."""
    last = torch.full((x0.shape[0],), schedule.T - 1, dtype=torch.long)
    mean = at(schedule.sqrt_alphas_cumprod, last, x0) * x0
    log_var = at((1 - schedule.alphas_cumprod).log(), last, x0)
    return _nats_to_bits_per_dim(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)))


# --- the whole bound on a set of images ---------------------------------------------------------------


def _strata(T: int, k: int) -> list[tuple[int, int]]:
    """k contiguous strata [lo, hi) that cover t = 1..T-1, as equal as integers allow."""
    edges = torch.linspace(1, T, k + 1).round().long().tolist()
    return list(zip(edges[:-1], edges[1:]))


def _device_of(net, fallback: torch.device) -> torch.device:
    try:
        return next(net.parameters()).device
    except (AttributeError, StopIteration):
        return fallback


@torch.no_grad()
def vlb_bits_per_dim(net, schedule: NoiseSchedule, x0: torch.Tensor, *, cond=None, prediction="eps",
                 learned_variance=False, variance="small", timesteps: str | int = "all",
                 generator: torch.Generator | None = None, batch_size: int = 256,
                 progress: Callable[[int], None] | None = None, continuous_decoder: bool = False,
                 clip_x0: bool = False) -> dict:
    """The variational bound L_vlb of each image in bits/dim, with its per-term breakdown.

    timesteps="all": every term, the exact bound (T network calls per image; each KL term is still a one-sample
    Monte Carlo estimate over x_t). An int k: L_0 exactly and Σ_{t=1}^{T-1} L_{t-1} estimated without bias by
    stratified sampling: t = 1..T-1 split into k contiguous strata S_j, one uniform t_j per stratum and image,
    and Σ_j |S_j|·L(t_j), which is (T-1)·mean when the strata are equal (k + 1 calls per image).

    Returns {"total", "prior", "decoder": per-image bits/dim (float64, CPU); "terms": the T-vector of the mean
    bits/dim of each term over the images where it was evaluated (NaN elsewhere; terms[0] is L_0, terms[t] is
    L_{t-1}); "mean" and "stderr": the dataset mean of total and its standard error (std/sqrt(N), which covers
    the noise, the sampled t and the choice of images); "estimator": "exact" | "sampled"; "timesteps": calls
    per image}. `generator` drives the noise and t (default: seed 0, so results repeat); progress(n) is called
    after each network call with the number of images it evaluated.
    """
    T = schedule.T
    if timesteps == "all":
        k = None
    elif isinstance(timesteps, int) and not isinstance(timesteps, bool) and timesteps >= 1:
        k = None if timesteps >= T - 1 else timesteps
    else:
        raise NoisecraftError(f"timesteps must be 'all' or a positive integer, got {timesteps!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise NoisecraftError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if x0.ndim < 2 or x0.shape[0] == 0:
        raise NoisecraftError("give at least one image (N×C×H×W) to compute bits/dim on.")
    if isinstance(net, Denoiser):
        net, prediction, learned_variance, clip_x0 = _unwrap(net, prediction, learned_variance, clip_x0)
    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(0)
    device = _device_of(net, x0.device)
    options = dict(prediction=prediction, learned_variance=learned_variance, variance=variance,
                   continuous_decoder=continuous_decoder, clip_x0=clip_x0)
    if isinstance(net, nn.Module):
        was_training = net.training
        net.eval()

    term_sum = torch.zeros(T, dtype=torch.float64)
    term_count = torch.zeros(T, dtype=torch.float64)
    totals, priors, decoders = [], [], []
    try:
        for start in range(0, x0.shape[0], batch_size):
            xb = x0[start:start + batch_size].to(device)
            cb = None if cond is None else cond[start:start + batch_size].to(device)
            n = xb.shape[0]
            prior = prior_bpd(schedule, xb).double().cpu()
            total = prior.clone()
            if k is None:
                plan = [(torch.full((n,), t, dtype=torch.long), 1.0) for t in range(T)]
            else:
                plan = [(torch.zeros(n, dtype=torch.long), 1.0)]
                plan += [(torch.randint(lo, hi, (n,), generator=generator), float(hi - lo)) for lo, hi in _strata(T, k)]
            for i, (t, weight) in enumerate(plan):    # plan[0] is t = 0, the decoder
                noise = torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(device)
                bits = vlb_terms(net, schedule, xb, t.to(device), noise, cond=cb, **options).double().cpu()
                total += weight * bits
                term_sum.index_add_(0, t, bits)
                term_count.index_add_(0, t, torch.ones_like(bits))
                if i == 0:
                    decoders.append(bits)
                if progress is not None:
                    progress(n)
            totals.append(total)
            priors.append(prior)
    finally:
        if isinstance(net, nn.Module):
            net.train(was_training)

    total = torch.cat(totals)
    n = total.numel()
    stderr = float(total.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"total": total, "prior": torch.cat(priors), "decoder": torch.cat(decoders),
            "terms": term_sum / term_count, "mean": float(total.mean()), "stderr": stderr,
            "estimator": "exact" if k is None else "sampled", "timesteps": T if k is None else k + 1}
