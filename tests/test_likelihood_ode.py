"""Exact likelihood through the probability-flow ODE (noisecraft.likelihood_ode).

The reference is Gaussian data y ~ N(μ, Σ), whose exact denoiser is known in closed form,
D(x, σ) = μ + Σ(Σ + σ²I)⁻¹(x − μ), so the ODE's log-density can be compared with log N(y; μ, Σ). Σ is a full
(rotated) covariance: with a diagonal one, ∂D/∂x would be diagonal and Rademacher probes would be exact, which
would test nothing about the estimator.

Two small gaps separate the ODE from log N(y; μ, Σ), both tiny here: the solve starts at σ_min (it scores y under
N(μ, Σ + σ_min² I): of order ½σ_min²·tr Σ⁻¹ ≈ 10⁻³ nats for the linear schedule's σ_min = 0.01, eigenvalues of
Σ in [0.1, 1]) and the prior N(0, (1 + σ_max²) I) is not the true marginal N(μ, Σ + σ_max² I) (about |μ|/σ_max
nats: 5·10⁻³ for σ_max = 157 of the linear schedule, 5·10⁻⁵ for σ_max = 2·10⁴ of the cosine one). Measured with
the exact trace: linear |error| ≤ 1.2·10⁻³ nats/dim (≤ 8·10⁻³ per image, D = 4 and 16), cosine ≤ 5·10⁻⁵
nats/dim (D = 8), against the bound 0.02.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from noisecraft.denoiser import Denoiser, DenoiserWrapper
from noisecraft.errors import NoisecraftError
from noisecraft.likelihood_ode import bits_per_dim_from_log_likelihood, dequantize, ode_bits_per_dim, ode_log_likelihood
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.schedule import NoiseSchedule

F64 = torch.float64


class GaussianDenoiser:
    """The exact D(x, σ) = E[y | x = y + σε] for y ~ N(μ, Σ), with the sampler interface (schedule, σ range)."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor, schedule: NoiseSchedule):
        self.mu, self.cov, self.schedule = mu, cov, schedule
        self.evals, self.evecs = torch.linalg.eigh(cov)

    @property
    def sigma_min(self):
        return self.schedule.sigma_min

    @property
    def sigma_max(self):
        return self.schedule.sigma_max

    def __call__(self, x, sigma, cond=None):
        mu, evals, evecs = (t.to(x.dtype) for t in (self.mu, self.evals, self.evecs))
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).reshape(-1, 1)
        gain = evals / (evals + sigma**2)                           # Σ(Σ + σ²I)⁻¹ in Σ's eigenbasis
        return mu + (((x - mu) @ evecs) * gain) @ evecs.T


def gaussian_problem(dims: int, schedule: str = "linear", n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dims, dims, generator=g, dtype=F64))
    cov = q @ torch.diag(torch.linspace(0.1, 1.0, dims, dtype=F64)) @ q.T
    mu = 0.3 * torch.randn(dims, generator=g, dtype=F64)
    y = mu + torch.randn(n, dims, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    den = GaussianDenoiser(mu, cov, NoiseSchedule.create(schedule, 1000))
    return den, y, torch.distributions.MultivariateNormal(mu, cov)


@pytest.mark.parametrize("schedule,dims", [("linear", 4), ("linear", 16), ("cosine", 8)])
def test_exact_trace_matches_gaussian_log_density(schedule, dims):
    den, y, dist = gaussian_problem(dims, schedule)
    out = ode_log_likelihood(den, y, noise="exact")
    true = dist.log_prob(y)
    assert out["logp"].shape == (len(y),) and out["nfe"] > 10
    assert torch.allclose(out["logp"], out["prior_logp"] + out["delta_logp"])
    assert ((out["logp"] - true).abs() / dims).max() < 0.02
    # The gaps, per image: the prior's ~|μ|/σ_max (x(σ_max)ᵀμ/σ_max² with x(σ_max) ~ σ_max·N(0, I)) and σ_min's
    # ~½σ_min²·tr Σ⁻¹; what is left is the solver's error (≤ 1e-3 at rtol = atol = 1e-5).
    prior_gap = 3 * float(dist.loc.norm()) / out["sigma_max"]
    start_gap = out["sigma_min"] ** 2 * float(torch.linalg.inv(dist.covariance_matrix).trace())
    # measured: ≤ 8e-3 nats (linear), 4e-4 (cosine)
    assert (out["logp"] - true).abs().max() < prior_gap + start_gap + 1e-3
    # Against the density the ODE actually computes (σ_min smoothing included), only the prior gap is left.
    smoothed = torch.distributions.MultivariateNormal(dist.loc, dist.covariance_matrix
                                                      + out["sigma_min"] ** 2 * torch.eye(dims, dtype=F64))
    assert (out["logp"] - smoothed.log_prob(y)).abs().max() < prior_gap + 1e-3


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    # 200 copies of one point in one batch: 200 independent probe draws, one solve.
    den, y, dist = gaussian_problem(8)
    copies = y[:1].expand(200, -1).clone()
    out = ode_log_likelihood(den, copies, noise=noise, generator=torch.Generator().manual_seed(1))
    logp = out["logp"]
    stderr = float(logp.std() / math.sqrt(len(logp)))
    assert logp.std() > 0                                              # a full Σ: the estimate does vary
    assert abs(float(logp.mean() - dist.log_prob(y[0]))) < 3 * stderr


def test_more_probes_shrink_the_spread():
    den, y, _ = gaussian_problem(8)
    copies = y[:1].expand(64, -1).clone()
    spread = [float(ode_log_likelihood(den, copies, probes=k, generator=torch.Generator().manual_seed(2))["logp"].std())
              for k in (1, 16)]
    assert 2.0 < spread[0] / spread[1] < 8.0                            # ≈ sqrt(16) = 4


def test_generator_makes_it_reproducible():
    den, y, _ = gaussian_problem(4)
    a = ode_log_likelihood(den, y, generator=torch.Generator().manual_seed(3))["logp"]
    b = ode_log_likelihood(den, y, generator=torch.Generator().manual_seed(3))["logp"]
    c = ode_log_likelihood(den, y, generator=torch.Generator().manual_seed(4))["logp"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bits_per_dim_of_uniform_density_is_8():
    dims = 3 * 4 * 4
    uniform_y = torch.full((2,), -dims * math.log(2.0))                 # U[-1, 1)^D: density 2^-D
    assert torch.allclose(bits_per_dim_from_log_likelihood(uniform_y, dims), torch.full((2,), 8.0, dtype=F64))
    # One nat per dimension better than uniform is 1/ln 2 bits less.
    assert torch.allclose(bits_per_dim_from_log_likelihood(uniform_y + dims, dims),
                          torch.full((2,), 8 - 1 / math.log(2), dtype=F64))


def test_dequantize_stays_in_the_bin_of_its_level():
    levels = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    y = dequantize(levels, torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.shape == levels.shape
    assert y.min() >= -1 and y.max() < 1
    # level v lands in its bin [2v/256 - 1, 2(v+1)/256 - 1)
    assert torch.equal(((y.double() + 1) * 128).floor().long(), levels.long())
    assert ((y - (levels.float() / 127.5 - 1)).abs() <= 2 / 256 + 1e-6).all()           # within one bin of the level
    # Floats on the levels v/127.5 - 1 give the same draw as the uint8 images; the noise depends on the generator.
    floats = dequantize(levels.float() / 127.5 - 1, torch.Generator().manual_seed(0))
    assert torch.equal(floats, y)
    assert not torch.equal(dequantize(levels, torch.Generator().manual_seed(1)), y)
    assert torch.equal(dequantize(levels.numpy(), torch.Generator().manual_seed(0)), y)


def test_ode_bits_per_dim_units_on_gaussian_data():
    # 8-bit "images" of 8 pixels drawn from the Gaussian; with the exact trace, the ODE's bits/dim must be
    # bits_per_dim of the true log-density at the same dequantized points (same generator, same draws).
    den, _, dist = gaussian_problem(8)
    images = ((dist.sample((5,)).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    done = []
    out = ode_bits_per_dim(den, images, batch_size=8, generator=torch.Generator().manual_seed(5),
                           progress=done.append, noise="exact")
    y = dequantize(images, torch.Generator().manual_seed(5)).double()
    expected = bits_per_dim_from_log_likelihood(dist.log_prob(y), 8)
    assert (out["bpd"] - expected).abs().max() < 0.02 / math.log(2)
    assert done == [5] and out["nfe"] > 10
    assert out["stderr"] > 0 and out["ci95"][0] < out["mean"] < out["ci95"][1]
    assert out["mean"] == pytest.approx(float(out["bpd"].mean()))
    # repeats average fresh dequantization draws; batches split the images.
    done.clear()
    twice = ode_bits_per_dim(den, images, batch_size=2, repeats=2, generator=torch.Generator().manual_seed(5),
                             progress=done.append)
    assert done == [2, 2, 1, 2, 2, 1] and twice["bpd"].shape == (5,)
    assert (twice["bpd"] - expected).abs().max() < 1.0                 # Rademacher probes + other dequantization


class CondRecorder(DenoiserWrapper):
    """Passes through and remembers the conditions it was called with."""

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.seen = []

    def forward(self, x, sigma, cond=None):
        self.seen.append(cond)
        return self.inner(x, sigma, cond)


def test_tiny_class_conditional_unet_end_to_end():
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                          attention_levels=(1,), num_classes=3))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():                              # make the zero-initialised output random
                nn.init.normal_(p, std=0.05)
    den = CondRecorder(Denoiser(net, NoiseSchedule.create("linear", 1000)))
    den.train()                                                         # switched to eval for the solve, then back
    images = torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = ode_bits_per_dim(den, images, cond=torch.tensor([0, 2, 1]), batch_size=2,
                           generator=torch.Generator().manual_seed(0), rtol=1e-2, atol=1e-2)
    assert den.training
    assert out["bpd"].shape == (3,) and torch.isfinite(out["bpd"]).all()
    assert math.isfinite(out["mean"]) and math.isfinite(out["stderr"]) and out["nfe"] > 0
    assert len(den.seen) == 2 * out["nfe"]                              # one denoiser call per evaluation
    assert {tuple(c.tolist()) for c in den.seen} == {(0, 2), (1,)}    # each batch gets its own labels


def test_user_errors():
    den, y, _ = gaussian_problem(4)
    bad = [
        dict(y=y[0]),                                                   # no batch dimension
        dict(y=y.long()),                                               # not floating
        dict(y=y, rtol=0.0), dict(y=y, atol=-1e-5), dict(y=y, rtol=2.0), dict(y=y, atol=float("nan")),
        dict(y=y, probes=0), dict(y=y, noise="uniform"), dict(y=y, method="BDF"),
        dict(y=y, sigma_min=1.0, sigma_max=0.5), dict(y=y, sigma_min=0.0),
        dict(y=y, cond=torch.zeros(3)),                                 # one cond per image
        dict(y=y.clone().fill_(float("nan"))),
    ]
    for kwargs in bad:
        with pytest.raises(NoisecraftError):
            ode_log_likelihood(den, **kwargs)
    with pytest.raises(NoisecraftError):
        ode_log_likelihood(lambda x, s, c=None: x, y)                   # no σ range known
    with pytest.raises(NoisecraftError):
        ode_log_likelihood(lambda x, s, c=None: x * float("nan"), y, sigma_min=0.01, sigma_max=10.0)
    with pytest.raises(NoisecraftError):
        dequantize(torch.zeros(2, 1, 4, 4) + 0.001)                     # floats off the 256 levels
    with pytest.raises(NoisecraftError):
        dequantize(torch.zeros(8, dtype=torch.uint8)[0])                # a scalar
    with pytest.raises(NoisecraftError):
        bits_per_dim_from_log_likelihood(torch.zeros(2), 0)
    images = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    for kwargs in (dict(batch_size=0), dict(repeats=0), dict(cond=torch.zeros(3, dtype=torch.long))):
        with pytest.raises(NoisecraftError):
            ode_bits_per_dim(den, images, **kwargs)
