"""Training losses for diffusion models.

L_simple (Ho et al. 2020, eq. 14): E_{t, x0, ε} || ε - ε_θ(sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, t) ||²,
with t uniform over 0..T-1 — DDPM Algorithm 1. For other prediction types the target is that of the prediction
type's row of the scalings table (denoiser.py, `Parameterisation.target`): x0, or v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0.

Min-SNR-γ weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
eq. 8-10): weighting every t by min(SNR_t, γ) on the x0 scale stops the easy low-noise steps from
dominating. Since ||x̂0 - x0||² = c_out²·||F - F*||², on each prediction type's own loss that is
min(SNR, γ)·c_out²:

    eps: min(SNR, γ) / SNR        x0: min(SNR, γ)        v: min(SNR, γ) / (SNR + 1)

EDM (Karras et al. 2022, eq. 2, 8 and Table 1): ln σ ~ N(P_mean, P_std²) per example (`edm_sigmas`), x = x0 + σ·ε,
and the loss λ(σ)·||D(x, σ) - x0||² with λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out(σ)². Since D - x0 = c_out·(F - F*),
that is a unit weight on the network's own error ||F - F*||², whose target F* has unit variance at every σ
(`edm_loss`).

Learned variance (improved DDPM, Nichol & Dhariwal 2021, §3.1): the network has 2C output channels, the last C
setting the reverse variance (denoiser.learned_log_variance). L_simple does not depend on the variance, so it is
trained through the variational bound (likelihood.py):

    hybrid: L_simple + λ·L_vlb, with a stop-gradient on the mean inside L_vlb (eq. 16), so L_vlb trains only the
            variance and L_simple only the mean. L_vlb = Σ_t L_t is estimated at the sampled t by T·L_t (L_t in
            bits/dim), i.e. λ·T·L_t: with T = 1000 and λ = 0.001 this is improved DDPM's L_simple + L_t.
    vlb:    L_t alone (bits/dim, L_vlb / T), through both mean and variance: the bound itself, best trained with
            importance sampling of t (training/timestep_sampler.py).
"""

from __future__ import annotations

import torch

from .denoiser import EDM_SIGMA_DATA, check_prediction_type, parameterisation, sigma_like, split_learned_variance
from .errors import NoisecraftError
from .likelihood import vlb_terms_from_output
from .schedule import NoiseSchedule

LOSSES = ("simple", "hybrid", "vlb")
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2    # the log-normal of EDM's training σ's (Karras et al. 2022, Table 1)


def _sigma_at(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    return schedule.sigmas.to(t.device)[t.long()]


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """min(SNR_t, γ)·c_out(σ_t)²: Min-SNR-γ on the x0 scale, as a weight of the prediction type's own loss."""
    snr = schedule.log_snr.to(t.device)[t].exp()
    return snr.clamp(max=gamma) * parameterisation(prediction).x0_error_scale(_sigma_at(schedule, t))


def simple_loss(out: torch.Tensor, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                prediction: str = "eps", min_snr_gamma: float | None = None) -> torch.Tensor:
    """L_simple per example (shape N): the mean squared error of the network's output `out` at
    x_t = q_sample(x0, t, noise) against its prediction type's target, Min-SNR weighted if asked."""
    target = parameterisation(prediction).target(x0, noise, _sigma_at(schedule, t))
    per_example = (out - target).pow(2).flatten(1).mean(1)
    if min_snr_gamma:
        per_example = per_example * min_snr_weight(schedule, t, min_snr_gamma, prediction).to(per_example.dtype)
    return per_example


def training_loss(net, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  cond: torch.Tensor | None = None, *, prediction: str = "eps", min_snr_gamma: float | None = None,
                  learn_sigma: bool = False, loss: str = "simple", vlb_weight: float = 0.001,
                  continuous_decoder: bool = False) -> torch.Tensor:
    """Per-example training loss (shape N) of one network call: "simple" (L_simple, Min-SNR weighted if asked),
    "hybrid" (L_simple + λ·T·L_t with the mean frozen inside L_t) or "vlb" (L_t). learn_sigma: the network
    outputs 2C channels, the last C its variance (which L_simple alone leaves untrained). continuous_decoder: L_0
    as a Gaussian density (latents), not over 256 pixel levels."""
    if check_prediction_type(prediction) == "edm":
        raise NoisecraftError("an EDM-preconditioned network trains on continuous σ: use losses.edm_loss.")
    if loss not in LOSSES:
        raise NoisecraftError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
    if loss == "hybrid" and not learn_sigma:
        raise NoisecraftError("the hybrid loss trains a learned variance, so it needs learn_sigma; use 'simple'.")
    xt = schedule.q_sample(x0, t, noise)
    out = net(xt, t.float(), cond)
    if loss == "vlb":
        return vlb_terms_from_output(schedule, x0, xt, t, out, prediction=prediction, learned_variance=learn_sigma,
                                     continuous_decoder=continuous_decoder)
    pred, v = split_learned_variance(out, x0.shape[1]) if learn_sigma else (out, None)
    simple = simple_loss(pred, schedule, x0, t, noise, prediction, min_snr_gamma)
    if loss == "simple":
        return simple
    # eq. 16: the mean is fixed (stop-gradient) inside L_vlb, so only the variance learns from it
    vlb = vlb_terms_from_output(schedule, x0, xt, t, torch.cat([pred.detach(), v], dim=1), prediction=prediction,
                                learned_variance=True, continuous_decoder=continuous_decoder)
    return simple + vlb_weight * schedule.T * vlb


def edm_sigmas(n: int, generator: torch.Generator | None = None, p_mean: float = EDM_P_MEAN,
               p_std: float = EDM_P_STD) -> torch.Tensor:
    """n training noise levels with ln σ ~ N(P_mean, P_std²) (EDM Table 1, "noise distribution"), float64."""
    return (p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64)).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (EDM Table 1, "loss weighting"), float64."""
    sigma = sigma.to(torch.float64)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(net, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor | None = None, *,
             sigma_data: float = EDM_SIGMA_DATA) -> torch.Tensor:
    """EDM's training loss per example (shape N): λ(σ)·||D(x0 + σ·ε, σ) - x0||² (eq. 2 and 8), written as
    λ(σ)·c_out(σ)²·||F(c_in·x, c_noise) - F*||², the mean over pixels; λ·c_out² = 1, so F's error is weighted
    equally at every σ."""
    row = parameterisation("edm", sigma_data)
    sigma = sigma.to(device=x0.device, dtype=torch.float64)
    x = x0 + sigma_like(sigma, x0) * noise
    _, _, c_in = row.scalings(sigma, x0)
    out = net(x * c_in, row.noise_input(sigma, None), cond)
    target = row.target(x0, noise, sigma)
    weight = (edm_loss_weight(sigma, sigma_data) * row.x0_error_scale(sigma)).to(out.dtype)
    return weight * (out - target).pow(2).flatten(1).mean(1)
