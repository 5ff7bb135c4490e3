"""Denoiser D(x, σ, cond) -> x̂0 on the σ scale against the DDPM (VP) view, and classifier-free guidance.

The reference for every check is computed "by hand" in the VP view: x_vp = x·sqrt(ᾱ_t) at the integer
timestep t with σ = σ_t, the network called on (x_vp, t, cond), and x̂0 by the papers' formulas (DDPM eq. 14 for
ε, Salimans & Ho 2022 for v), independently of the scalings table.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisecraft.denoiser import PARAMETERISATIONS, Denoiser
from noisecraft.errors import NoisecraftError
from noisecraft.guidance.classifier_free import ClassifierFreeGuidance
from noisecraft.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.create("linear", 1000)
NUM_CLASSES = 4  # label NUM_CLASSES is the "null" label used for the unconditional pass


class TinyNet(nn.Module):
    """A small fixed random conv net that depends on x, t and an optional class label."""

    def __init__(self, channels: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.label = nn.Embedding(NUM_CLASSES + 1, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x, t, cond=None):
        self.calls.append((x.detach().clone(), t.detach().clone(), None if cond is None else cond.clone()))
        out = torch.tanh(self.conv(x)) + torch.sin(t / 100.0).reshape(-1, 1, 1, 1)
        if cond is not None:
            out = out + self.label(cond)[:, :, None, None]
        return out


def x0_by_hand(net, x_ve, t, prediction, cond=None):
    """x̂0 computed in the VP view: x_vp = sqrt(ᾱ)x0 + sqrt(1 - ᾱ)ε solved for x0 (DDPM eq. 14), or
    x0 = sqrt(ᾱ)x_vp - sqrt(1 - ᾱ)v (Salimans & Ho 2022)."""
    a = SCHEDULE.alphas_cumprod[t].to(x_ve.dtype).reshape(-1, 1, 1, 1)
    x_vp = x_ve * a.sqrt()
    out = net(x_vp, t.float(), cond)
    sqrt_a = SCHEDULE.sqrt_alphas_cumprod[t].to(x_ve.dtype).reshape(-1, 1, 1, 1)
    sqrt_1ma = SCHEDULE.sqrt_one_minus_alphas_cumprod[t].to(x_ve.dtype).reshape(-1, 1, 1, 1)
    if prediction == "eps":
        return (x_vp - sqrt_1ma * out) / sqrt_a
    if prediction == "v":
        return sqrt_a * x_vp - sqrt_1ma * out
    return out


def noisy_batch(t, seed=0):
    """x on the σ scale at timesteps t: x = x0 + σ_t ε, with x0 in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    n = len(t)
    x0 = torch.rand(n, 3, 6, 6, generator=g) * 2 - 1
    eps = torch.randn(n, 3, 6, 6, generator=g)
    sigma = SCHEDULE.sigmas[t].float().reshape(-1, 1, 1, 1)
    return x0 + sigma * eps


TIMESTEPS = torch.tensor([0, 1, 37, 250, 640, 998, 999])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_denoiser_matches_vp_view(prediction):
    net = TinyNet()
    denoiser = Denoiser(net, SCHEDULE, prediction)
    x = noisy_batch(TIMESTEPS)
    cond = torch.arange(len(TIMESTEPS)) % NUM_CLASSES
    got = denoiser(x, SCHEDULE.sigmas[TIMESTEPS], cond)
    # The network was fed the exact integer timesteps and x_vp = x·sqrt(ᾱ_t).
    x_in, t_in, cond_in = net.calls[-1]
    assert t_in.dtype == torch.float32 and torch.equal(t_in, TIMESTEPS.float())
    assert torch.equal(cond_in, cond)
    a = SCHEDULE.alphas_cumprod[TIMESTEPS].float().reshape(-1, 1, 1, 1)
    # float32: c_in is sqrt(ᾱ) in float64 rounded once, here sqrt of a rounded ᾱ → ≤ ~2 ulps relative (1.4e-7 seen)
    torch.testing.assert_close(x_in, x * a.sqrt(), rtol=1e-6, atol=1e-6)

    want = x0_by_hand(net, x, TIMESTEPS, prediction, cond)
    # x on the σ scale is as large as σ_999 ≈ 157 and x̂0 = x - σ ε̂ cancels it: float32 rounding of x
    # sets the absolute tolerance per item.
    scale = (1 + SCHEDULE.sigmas[TIMESTEPS].float()).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_scalar_sigma_equals_batched_sigma(prediction):
    denoiser = Denoiser(TinyNet(), SCHEDULE, prediction)
    t = torch.tensor([400, 400])
    x = noisy_batch(t)
    sigma = SCHEDULE.sigmas[400]
    torch.testing.assert_close(denoiser(x, float(sigma)), denoiser(x, sigma.expand(2)), rtol=0, atol=0)
    torch.testing.assert_close(denoiser(x, sigma), denoiser(x, sigma.expand(2)), rtol=0, atol=0)


def test_eps_recovered_from_x0_is_the_network_output():
    """ε̂ = (x - D(x, σ))/σ, the slope every ODE sampler uses (samplers.euler.to_d), gives back an ε-network's
    output."""
    denoiser = Denoiser(TinyNet(), SCHEDULE, "eps")
    t = TIMESTEPS[1:]  # σ_0 > 0 too, but keep the tiny-σ division out of the float32 comparison
    x = noisy_batch(t, seed=1)
    sigma = SCHEDULE.sigmas[t]
    s = sigma.float().reshape(-1, 1, 1, 1)
    eps = (x - denoiser(x, sigma)) / s
    a = SCHEDULE.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    # float32: (x - x̂0)/σ cancels x and divides its rounding by σ: ulp(|x| ≈ 1)/σ_1 (0.0148) ≈ 1e-5 → atol 1e-4
    torch.testing.assert_close(eps, denoiser.net(x * a.sqrt(), t.float(), None), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_scalings_table_round_trips_the_target(prediction):
    """Fed its own training target F*, every row gives back x0 (D = x0 when F = F*, EDM eq. 8), from the σ-scale x
    and from the network's input c_in·x = the DDPM x_t, in float64 at every σ of the schedule."""
    row = PARAMETERISATIONS[prediction]
    t = torch.arange(SCHEDULE.T)
    sigma = SCHEDULE.sigmas[t]
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(SCHEDULE.T, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(SCHEDULE.T, 3, generator=g, dtype=torch.float64)
    target = row.target(x0, eps, sigma)
    x = x0 + sigma[:, None] * eps
    torch.testing.assert_close(row.denoise(x, target, sigma), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(row.denoise_input(SCHEDULE.q_sample(x0, t, eps), target, sigma), x0,
                               rtol=1e-9, atol=1e-9)
    want = {"eps": eps, "x0": x0, "v": SCHEDULE.sqrt_alphas_cumprod[:, None] * eps
            - SCHEDULE.sqrt_one_minus_alphas_cumprod[:, None] * x0}[prediction]
    torch.testing.assert_close(target, want, rtol=1e-12, atol=1e-12)


class GaussianOptimalX0(nn.Module):
    """The exact posterior mean E[x0 | x_t] for data x0 ~ N(0, s² I), written in the VP view."""

    def __init__(self, s: float):
        super().__init__()
        self.s2 = s * s

    def forward(self, x_vp, t, cond=None):
        a = SCHEDULE.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1).to(x_vp.dtype)
        return self.s2 * a.sqrt() / (self.s2 * a + 1 - a) * x_vp


def test_score_of_gaussian_data_is_tweedie():
    """With the optimal x0-network for N(0, s²) data, D(x, σ) = s²/(s² + σ²)·x and the score of
    p_σ = N(0, (s² + σ²) I) is -x/(s² + σ²): checks the σ/VP scalings end to end."""
    s = 0.5
    denoiser = Denoiser(GaussianOptimalX0(s), SCHEDULE, "x0")
    t = torch.tensor([0, 10, 300, 999])
    sigma = SCHEDULE.sigmas[t]
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64) * (s**2 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    var = (s**2 + sigma**2).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(x, sigma), s**2 / var * x, rtol=1e-6, atol=1e-9)
    score = (denoiser(x, sigma) - x) / sigma.reshape(-1, 1, 1, 1) ** 2       # Tweedie: (D - x)/σ²
    torch.testing.assert_close(score, -x / var, rtol=1e-6, atol=1e-9)


def test_clip_x0_and_bad_prediction():
    with pytest.raises(NoisecraftError, match="unknown prediction type"):
        Denoiser(TinyNet(), SCHEDULE, "epsilon")
    denoiser = Denoiser(TinyNet(), SCHEDULE, "eps", clip_x0=True)
    x = noisy_batch(torch.tensor([900, 900]))
    out = denoiser(x, SCHEDULE.sigmas[900])
    assert float(out.detach().abs().max()) <= 1.0
    torch.testing.assert_close(out, Denoiser(denoiser.net, SCHEDULE, "eps")(x, SCHEDULE.sigmas[900]).clamp(-1, 1))


# --- classifier-free guidance ---------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_scales(prediction):
    net = TinyNet(seed=3)
    inner = Denoiser(net, SCHEDULE, prediction)
    t = torch.tensor([20, 500, 999])
    x = noisy_batch(t, seed=2)
    sigma = SCHEDULE.sigmas[t]
    cond = torch.tensor([0, 2, 3])
    null = torch.tensor(NUM_CLASSES)
    conditional = inner(x, sigma, cond)
    unconditional = inner(x, sigma, null.expand(3))
    assert (conditional - unconditional).abs().max() > 1e-2  # the net really depends on the label

    scale = (1 + sigma.float()).reshape(-1, 1, 1, 1)  # absolute float32 rounding grows with σ

    def close(a, b):
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=2e-6)

    close(ClassifierFreeGuidance(inner, 1.0, null)(x, sigma, cond), conditional)
    close(ClassifierFreeGuidance(inner, 0.0, null)(x, sigma, cond), unconditional)
    for w in (2.5, 7.0):
        net.calls.clear()
        guided = ClassifierFreeGuidance(inner, w, null)(x, sigma, cond)
        close(guided, unconditional + w * (conditional - unconditional))
        # one batched forward for the conditional and the unconditional halves
        assert len(net.calls) == 1 and net.calls[0][0].shape[0] == 6
        assert torch.equal(net.calls[0][2], torch.cat([cond, null.expand(3)]))


def test_cfg_scalar_sigma_and_no_cond():
    inner = Denoiser(TinyNet(seed=4), SCHEDULE, "eps")
    x = noisy_batch(torch.tensor([100, 100]))
    null = torch.tensor(NUM_CLASSES)
    cfg = ClassifierFreeGuidance(inner, 3.0, null)
    cond = torch.tensor([1, 2])
    sigma = float(SCHEDULE.sigmas[100])
    want = inner(x, sigma, null.expand(2)) + 3.0 * (inner(x, sigma, cond) - inner(x, sigma, null.expand(2)))
    # float32: one doubled batch vs three calls, then w·(c - u) with w = 3 on x̂0 ≤ ~2 → a few ulps; atol 1e-5
    torch.testing.assert_close(cfg(x, sigma, cond), want, rtol=1e-5, atol=1e-5)
    # Without a condition there is nothing to guide: the plain (unconditional-input) denoiser.
    torch.testing.assert_close(cfg(x, sigma), inner(x, sigma), rtol=0, atol=0)
    assert cfg.schedule is SCHEDULE and cfg.sigma_max == inner.sigma_max and cfg.sigma_min == inner.sigma_min
