"""Training losses for diffusion models.

L_simple (Ho et al. 2020, eq. 14): E_{t, x0, ε} || ε - ε_θ(sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, t) ||²,
with t uniform over 0..T-1 — DDPM Algorithm 1. For x0- or v-prediction the target is x0 or
v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 instead.

Min-SNR-γ weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
eq. 8-10): weighting every t by min(SNR_t, γ) on the x0 scale stops the easy low-noise steps from
dominating. Expressed for each prediction type's own loss:

    eps: min(SNR, γ) / SNR        x0: min(SNR, γ)        v: min(SNR, γ) / (SNR + 1)
"""

from __future__ import annotations

import torch

from .denoiser import check_prediction_type
from .schedule import NoiseSchedule


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
