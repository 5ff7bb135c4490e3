"""Training losses for diffusion models.

L_simple (Ho et al. 2020, eq. 14): E_{t, x0, ε} || ε - ε_θ(sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, t) ||²,
with t uniform over 0..T-1 — DDPM Algorithm 1. For x0- or v-prediction the target is x0 or
v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 instead.

Min-SNR-γ weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
eq. 8-10): weighting every t by min(SNR_t, γ) on the x0 scale stops the easy low-noise steps from
dominating. Expressed for each prediction type's own loss:

    eps: min(SNR, γ) / SNR        x0: min(SNR, γ)        v: min(SNR, γ) / (SNR + 1)

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

from .denoiser import check_prediction_type, split_learned_variance
from .errors import NoisecraftError
from .likelihood import vlb_terms_from_output
from .schedule import NoiseSchedule

LOSSES = ("simple", "hybrid", "vlb")


def prediction_target(schedule: NoiseSchedule, x0, noise, t, prediction: str) -> torch.Tensor:
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return schedule.v_from(x0, noise, t)


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    snr = schedule.log_snr.to(t.device)[t].exp()
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)


def diffusion_loss(net, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   cond: torch.Tensor | None = None, prediction: str = "eps",
                   min_snr_gamma: float | None = None) -> torch.Tensor:
    """Per-example loss (shape N): mean squared error of the network's prediction, optionally Min-SNR weighted."""
    check_prediction_type(prediction)
    xt = schedule.q_sample(x0, t, noise)
    out = net(xt, t.float(), cond)
    target = prediction_target(schedule, x0, noise, t, prediction)
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
    outputs 2C channels, the last C its variance. continuous_decoder: L_0 as a Gaussian density (latents), not
    over 256 pixel levels."""
    check_prediction_type(prediction)
    if loss not in LOSSES:
        raise NoisecraftError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
    if not learn_sigma and loss == "simple":
        return diffusion_loss(net, schedule, x0, t, noise, cond, prediction, min_snr_gamma)
    xt = schedule.q_sample(x0, t, noise)
    out = net(xt, t.float(), cond)
    pred, v = split_learned_variance(out, x0.shape[1]) if learn_sigma else (out, None)
    if loss == "vlb":
        return vlb_terms_from_output(schedule, x0, xt, t, out, prediction=prediction, learned_variance=learn_sigma,
                                     continuous_decoder=continuous_decoder)
    target = prediction_target(schedule, x0, noise, t, prediction)
    simple = (pred - target).pow(2).flatten(1).mean(1)
    if min_snr_gamma:
        simple = simple * min_snr_weight(schedule, t, min_snr_gamma, prediction).to(simple.dtype)
    if loss == "simple":     # learn_sigma with L_simple alone: the variance channels get no gradient
        return simple
    # eq. 16: the mean is fixed (stop-gradient) inside L_vlb, so only the variance learns from it
    frozen = torch.cat([pred.detach(), v], dim=1) if learn_sigma else pred.detach()
    vlb = vlb_terms_from_output(schedule, x0, xt, t, frozen, prediction=prediction, learned_variance=learn_sigma,
                                continuous_decoder=continuous_decoder)
    return simple + vlb_weight * schedule.T * vlb
