"""The score-based family: annealed Langevin dynamics (`langevin`) and predictor-corrector (`pc`).

The toy problem has a known score: data x0 ~ N(μ, s² I), so at noise level σ the noised data is
N(μ, (s² + σ²) I) and the ideal denoiser is D(x, σ) = μ + s²/(s² + σ²)·(x - μ). Sampling from pure noise
must then give back mean μ and standard deviation s.
"""

from __future__ import annotations

import math

import pytest
import torch

from noisecraft.errors import NoisecraftError
from noisecraft.samplers import SAMPLERS, generate, sample_langevin, sample_pc
from noisecraft.samplers.steps import discrete_sigmas, karras_sigmas
from noisecraft.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.create("linear", 1000)


class GaussianDenoiser:
    """The exact denoiser for data x0 ~ N(μ, s² I) (μ broadcast over the trailing dims of x)."""

    def __init__(self, mu: torch.Tensor, s: float):
        self.mu, self.s = mu, s
        self.schedule = SCHEDULE
        self.sigma_min, self.sigma_max = SCHEDULE.sigma_min, SCHEDULE.sigma_max
        self.calls = 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    def score(self, x, sigma, cond=None):
        return (self(x, sigma, cond) - x) / sigma**2


def test_langevin_recovers_a_gaussian():
    """4000 points in 2-D; 300 Karras levels × 5 updates. Sampling error: ~1.6% of s on the mean, ~1.1% on std."""
    mu, s = torch.tensor([0.5, -0.3]), 0.5
    sigmas = karras_sigmas(SCHEDULE.sigma_min, SCHEDULE.sigma_max, 300)
    x = float(sigmas[0]) * torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    y = sample_langevin(GaussianDenoiser(mu, s), x, sigmas, generator=torch.Generator().manual_seed(1))
    assert float((y.mean(0) - mu).abs().max()) < 0.06 * s
    assert float((y.std(0) / s - 1).abs().max()) < 0.05, y.std(0) / s


def test_pc_recovers_a_gaussian():
    """PC's step rule ε = 2(r||z||/||score||)² is made for high dimensions, where the norms concentrate, so the
    toy is a 16×16 "image" (in 2-D the per-sample ratio is heavy-tailed and the samples spread far too wide)."""
    mu, s = torch.linspace(-0.5, 0.5, 256).reshape(1, 16, 16), 0.5
    sigmas = discrete_sigmas(SCHEDULE, 200, "leading")
    x = float(sigmas[0]) * torch.randn(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    den = GaussianDenoiser(mu, s)
    y = sample_pc(den, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert den.calls == 200 + 199                      # a predictor per step, a corrector at each level above 0
    mean_error = (y.mean(0) - mu) / s                  # ~N(0, 1/1000) per pixel
    assert float(mean_error.pow(2).mean().sqrt()) < 0.06 and float(mean_error.abs().max()) < 0.2
    assert abs(float((y.std(0) / s).mean()) - 1) < 0.04
    # without a corrector it is plain reverse-diffusion sampling: close, but not the same samples
    y0 = sample_pc(den, x, sigmas, generator=torch.Generator().manual_seed(1), corrector_steps=0)
    assert abs(float((y0.std(0) / s).mean()) - 1) < 0.04 and float((y0 - y).abs().max()) > 0.01


def test_langevin_is_algorithm_1():
    """One level, one update: x + (α/2)·score + sqrt(α)·z with α = ε (σ_1 = σ_L), then D(x, σ_L)."""
    mu, s = torch.tensor([0.2, 0.1, -0.4]), 0.7
    den = GaussianDenoiser(mu, s)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    sigma, eps = 0.3, 0.01
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    want = x + eps / 2 * den.score(x, sigma) + math.sqrt(eps) * z
    sigmas = torch.tensor([sigma, 0.0], dtype=torch.float64)
    got = sample_langevin(den, x, sigmas, n_steps_each=1, step_lr=eps, final_denoise=False,
                          generator=torch.Generator().manual_seed(4))
    # float32, the sampler's update vs the formula: values ≤ ~1.5, a handful of ops → a few ulps; atol 1e-5. The
    # terms reach 1.4e-2 (α/2·score) and 0.22 (sqrt(α)·z) here, so a wrong factor on either still fails.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    den.calls = 0
    final = sample_langevin(den, x, sigmas, n_steps_each=1, step_lr=eps, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(final, den(want, sigma), rtol=1e-5, atol=1e-5)   # as above
    assert den.calls == 2 + 1
    # the default step is α_i = σ_i²: half way to D(x, σ_i), plus noise of size σ_i
    half = sample_langevin(den, x, sigmas, n_steps_each=1, final_denoise=False,
                           generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(half, (x + den(x, sigma)) / 2 + sigma * z, rtol=1e-5, atol=1e-5)   # as above


def test_pc_last_step_is_the_denoiser_output():
    den = GaussianDenoiser(torch.tensor([1.0, -1.0]), 0.3)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    out = sample_pc(den, x, torch.tensor([0.5, 0.0], dtype=torch.float64), generator=g)
    assert torch.equal(out, den(x, 0.5))
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # no noise drawn


@pytest.mark.parametrize("name", ["langevin", "pc"])
def test_registered_and_runnable_by_name(name):
    assert name in SAMPLERS
    den = GaussianDenoiser(torch.zeros(1, 4, 4), 0.5)
    seen = []
    x = generate(den, (3, 1, 4, 4), sampler=name, steps=6, seed=0, callback=seen.append)
    assert x.shape == (3, 1, 4, 4) and bool(torch.isfinite(x).all())
    assert [d["i"] for d in seen] == list(range(6)) and seen[-1]["sigma_next"] == 0
    assert all(d["denoised"].shape == x.shape for d in seen)
    assert torch.equal(x, generate(den, (3, 1, 4, 4), sampler=name, steps=6, seed=0))
    options = {"n_steps_each": 2, "step_lr": 1e-4} if name == "langevin" else {"snr": 0.1, "corrector_steps": 2}
    y = generate(den, (3, 1, 4, 4), sampler=name, steps=6, seed=0, **options)
    assert bool(torch.isfinite(y).all()) and float((x - y).abs().max()) > 1e-4
    with pytest.raises(NoisecraftError, match="takes no option 'eta'"):
        generate(den, (3, 1, 4, 4), sampler=name, steps=6, eta=1.0)


@pytest.mark.parametrize("name, options", [("langevin", {}), ("langevin", {"final_denoise": False}), ("pc", {}),
                                           ("pc", {"corrector_steps": 2})])
def test_seed_gives_same_sample_whatever_the_batch(name, options):
    den = GaussianDenoiser(torch.linspace(-0.5, 0.5, 16).reshape(1, 4, 4), 0.5)
    batch = generate(den, (3, 1, 4, 4), sampler=name, steps=8, seed=10, **options)
    alone = generate(den, (1, 1, 4, 4), sampler=name, steps=8, seed=11, **options)
    assert float((batch[1:2] - alone).abs().max()) < 1e-5
    other = generate(den, (1, 1, 4, 4), sampler=name, steps=8, seed=12, **options)
    assert float((alone - other).abs().max()) > 1e-2


@pytest.mark.parametrize("name, options", [("langevin", {"step_lr": -1e-5}), ("langevin", {"step_lr": 0.0}),
                                           ("langevin", {"n_steps_each": 0}), ("pc", {"snr": 0.0}),
                                           ("pc", {"snr": -0.16}), ("pc", {"corrector_steps": -1})])
def test_invalid_options(name, options):
    den = GaussianDenoiser(torch.zeros(2), 0.5)
    with pytest.raises(NoisecraftError, match=name):
        generate(den, (2, 2), sampler=name, steps=3, **options)
