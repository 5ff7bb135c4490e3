"""The diffusion core's math: forward process, posterior, schedules, σ/log-SNR, conversions, Min-SNR.

Everything here runs in float64 and checks identities exactly (up to rounding), except the comparison
with diffusers, whose schedules are float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from noisecraft.denoiser import PARAMETERISATIONS
from noisecraft.errors import NoisecraftError
from noisecraft.losses import min_snr_weight, training_loss
from noisecraft.schedule import NoiseSchedule, alpha_bar_from_sigma

T = 1000
KINDS = ("linear", "scaled_linear", "cosine")
SCHEDULES = {kind: NoiseSchedule.create(kind, T) for kind in KINDS}


def normal_logpdf(x, mean, var):
    return -0.5 * math.log(2 * math.pi) - 0.5 * torch.log(torch.as_tensor(var, dtype=torch.float64)) \
        - (x - mean) ** 2 / (2 * var)


# --- construction ---------------------------------------------------------------------------


def test_unknown_schedule_name_raises():
    with pytest.raises(NoisecraftError, match="unknown beta schedule"):
        NoiseSchedule.create("quadratic", T)


def test_bad_settings_raise():
    with pytest.raises(NoisecraftError):
        NoiseSchedule.create("linear", 1)
    with pytest.raises(NoisecraftError):
        NoiseSchedule.create("cosine", T, beta_start=1e-4)
    with pytest.raises(NoisecraftError):
        NoiseSchedule(torch.tensor([0.1, 1.5]))


@pytest.mark.parametrize(
    "kind, diffusers_kwargs",
    [
        ("linear", dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
        ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        ("cosine", dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_schedules_match_diffusers(kind, diffusers_kwargs):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=T, **diffusers_kwargs)
    ours = SCHEDULES[kind]
    # diffusers works in float32, we in float64: β_t agree to float32 rounding, α_t = 1 - β_t to half
    # a float32 ulp near 1, and ᾱ_t (a float32 cumprod there) to 1e-6 relative over all 1000 factors.
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.alphas, ref.alphas.double(), rtol=0, atol=4e-8)
    torch.testing.assert_close(ours.alphas_cumprod[:-1], ref.alphas_cumprod[:-1].double(), rtol=1e-6, atol=0)
    # The last cosine factor is α = 1 - 0.999, which float32 cancellation gets wrong by 1.3e-5 relative
    # on diffusers' side; that error carries into its ᾱ_999.
    last_rtol = 2e-5 if kind == "cosine" else 1e-6
    torch.testing.assert_close(ours.alphas_cumprod[-1:], ref.alphas_cumprod[-1:].double(), rtol=last_rtol, atol=0)


def test_create_accepts_diffusers_name_and_round_trips_config():
    s = NoiseSchedule.create("squaredcos_cap_v2", T)
    assert s.kind == "cosine"
    torch.testing.assert_close(s.betas, SCHEDULES["cosine"].betas, rtol=0, atol=0)
    custom = NoiseSchedule.create("linear", 50, beta_start=2e-4, beta_end=0.03)
    rebuilt = NoiseSchedule.create(**custom.to_config())
    torch.testing.assert_close(rebuilt.betas, custom.betas, rtol=0, atol=0)


# --- forward process ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_q_sample_equals_iterated_q_step(kind):
    """q(x_t|x_0) in closed form equals t+1 applications of q(x_s|x_{s-1}), exactly.

    q_step is affine, x_s = a_s x_{s-1} + b_s ε_s with independent ε_s, so starting from a fixed x_0
    the mean goes m_s = a_s m_{s-1} and the variance v_s = a_s² v_{s-1} + b_s². We read a_s and b_s off
    q_step itself (inputs (1, 0) and (0, 1)), run the mean through q_step directly, and compare every
    t with the mean and variance q_sample implies (its coefficients, read off the same way).
    """
    s = SCHEDULES[kind]
    ts = torch.arange(T)
    one, zero = torch.ones(T, 1, dtype=torch.float64), torch.zeros(T, 1, dtype=torch.float64)
    a = s.q_step(one, ts, zero).squeeze(1)
    b = s.q_step(zero, ts, one).squeeze(1)

    x0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    mean, var = x0.clone(), 0.0
    means, variances = [], []
    for t in range(T):
        mean = s.q_step(mean, torch.tensor([t]), torch.zeros_like(mean))
        var = a[t] ** 2 * var + b[t] ** 2
        means.append(mean)
        variances.append(var)
    means, variances = torch.cat(means), torch.stack(variances)

    closed_mean = s.q_sample(x0.expand(T, 2), ts, torch.zeros(T, 2, dtype=torch.float64))
    closed_var = s.q_sample(zero, ts, one).squeeze(1) ** 2
    torch.testing.assert_close(means, closed_mean, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(variances, closed_var, rtol=1e-10, atol=1e-14)
    # ... and both are DDPM eq. 4: N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I).
    torch.testing.assert_close(closed_var, 1 - s.alphas_cumprod, rtol=1e-12, atol=0)
    torch.testing.assert_close(closed_mean, s.alphas_cumprod.sqrt()[:, None] * x0, rtol=1e-12, atol=0)


def test_q_step_monte_carlo():
    """A sampling check of the same fact: 10 noisy steps from x_0 = 1 give N(sqrt(ᾱ_9), 1 - ᾱ_9)."""
    s = NoiseSchedule.create("linear", 20, beta_start=0.01, beta_end=0.2)
    g = torch.Generator().manual_seed(0)
    n, t_last = 200_000, 9
    x = torch.ones(n, dtype=torch.float64)
    for t in range(t_last + 1):
        x = s.q_step(x, torch.tensor([t]), torch.randn(n, generator=g, dtype=torch.float64))
    a = float(s.alphas_cumprod[t_last])
    se = math.sqrt((1 - a) / n)
    assert abs(float(x.mean()) - math.sqrt(a)) < 5 * se
    assert abs(float(x.var()) - (1 - a)) < 5 * (1 - a) * math.sqrt(2 / n)


# --- posterior ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [1, 2, 10, 500, 998, 999])
def test_posterior_is_bayes_rule(kind, t):
    """q(x_{t-1}|x_t, x_0) = q(x_t|x_{t-1}) q(x_{t-1}|x_0) / q(x_t|x_0) on a grid of x_{t-1}.

    The log-difference between the posterior and the product of the forward densities must be the
    same for every x_{t-1}, and that constant is -log q(x_t|x_0).
    """
    s = SCHEDULES[kind]
    x0 = torch.tensor([0.7], dtype=torch.float64)
    a_t, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[t - 1]
    xt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * 0.4
    mean, var = s.posterior(x0, xt, torch.tensor([t]))

    grid = mean + var.sqrt() * torch.linspace(-6, 6, 101, dtype=torch.float64)
    log_post = normal_logpdf(grid, mean, var)
    log_joint = (normal_logpdf(xt, s.alphas[t].sqrt() * grid, s.betas[t])
                 + normal_logpdf(grid, a_prev.sqrt() * x0, 1 - a_prev))
    diff = log_post - log_joint
    expected = -normal_logpdf(xt, a_t.sqrt() * x0, 1 - a_t)
    torch.testing.assert_close(diff, expected.expand_as(diff), rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_at_t0_is_x0(kind):
    """ᾱ_{-1} = 1: the posterior of the first step is a point mass at x_0 (variance exactly 0)."""
    s = SCHEDULES[kind]
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    xt = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mean, var = s.posterior(x0, xt, torch.zeros(2, dtype=torch.long))
    assert float(s.alphas_cumprod_prev[0]) == 1.0
    assert bool((var == 0).all())
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)


def test_posterior_formulas_and_batching():
    """β̃_t and μ̃_t as in DDPM eq. 7, per batch item with different t, broadcasting over (C, H, W)."""
    s = SCHEDULES["linear"]
    ts = torch.tensor([0, 1, 400, 999])
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    xt = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    mean, var = s.posterior(x0, xt, ts)
    assert mean.shape == var.shape == x0.shape
    for i, t in enumerate(ts.tolist()):
        a_t = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[t - 1]) if t > 0 else 1.0
        beta = float(s.betas[t])
        mu = (math.sqrt(a_prev) * beta * x0[i] + math.sqrt(1 - beta) * (1 - a_prev) * xt[i]) / (1 - a_t)
        torch.testing.assert_close(mean[i], mu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var[i], torch.full_like(var[i], (1 - a_prev) / (1 - a_t) * beta))


# --- σ and log-SNR --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sigmas_and_log_snr(kind):
    s = SCHEDULES[kind]
    a = s.alphas_cumprod
    torch.testing.assert_close(s.sigmas**2, (1 - a) / a, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.log_snr, torch.log(a / (1 - a)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.log_snr, -2 * s.sigmas.log(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alpha_bar_from_sigma(s.sigmas), a, rtol=1e-12, atol=0)
    assert bool((s.sigmas.diff() > 0).all()) and bool((s.log_snr.diff() < 0).all())
    assert s.sigma_min == float(s.sigmas[0]) and s.sigma_max == float(s.sigmas[-1])
    assert float(alpha_bar_from_sigma(torch.tensor(0.0))) == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_sigma_to_t_exact_at_integer_timesteps(kind):
    s = SCHEDULES[kind]
    t = s.sigma_to_t(s.sigmas)
    assert t.dtype == torch.float32
    assert torch.equal(t, torch.arange(T, dtype=torch.float32))
    torch.testing.assert_close(s.t_to_sigma(torch.arange(T)), s.sigmas, rtol=1e-12, atol=0)
    # Below the smallest / above the largest level: clamp to the ends.
    assert float(s.sigma_to_t(torch.tensor([0.0]))) == 0.0
    assert float(s.sigma_to_t(torch.tensor([s.sigma_max * 10]))) == T - 1


@pytest.mark.parametrize("kind", KINDS)
def test_t_to_sigma_inverts_sigma_to_t(kind):
    s = SCHEDULES[kind]
    g = torch.Generator().manual_seed(1)
    log_sigma = torch.empty(500, dtype=torch.float64).uniform_(math.log(s.sigma_min), math.log(s.sigma_max), generator=g)
    sigma = log_sigma.exp()
    # sigma_to_t returns float32 timesteps (what a network takes): resolution 6e-5 near t = 999. So the
    # round trip is exact up to that much of t, times the local slope of log σ (steep at the cosine tail).
    t = s.sigma_to_t(sigma)
    slope = s.sigmas.log().diff()[t.long().clamp(max=T - 2)]
    err = (s.t_to_sigma(t).log() - log_sigma).abs()
    assert bool((err <= slope * 1e-4 + 1e-12).all()), float((err / slope).max())
    t = torch.empty(500, dtype=torch.float64).uniform_(0, T - 1, generator=g)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)).double(), t, rtol=0, atol=2e-4)


# --- prediction-type conversions ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), t=st.integers(0, T - 1), seed=st.integers(0, 2**31 - 1))
def test_prediction_conversions_round_trip(kind, t, seed):
    """Each row of the scalings table (denoiser.py) turns its own target back into x0 at x_t."""
    s = SCHEDULES[kind]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    ts = torch.full((3,), t)
    sigma = s.sigmas[ts]
    xt = s.q_sample(x0, ts, eps)

    for row in PARAMETERISATIONS.values():
        torch.testing.assert_close(row.denoise_input(xt, row.target(x0, eps, sigma), sigma), x0, rtol=1e-9,
                                   atol=1e-9)
    assert torch.equal(PARAMETERISATIONS["eps"].target(x0, eps, sigma), eps)
    assert torch.equal(PARAMETERISATIONS["x0"].target(x0, eps, sigma), x0)
    v = PARAMETERISATIONS["v"].target(x0, eps, sigma)
    # v is the rotation of (x0, ε) by the angle φ with (cos φ, sin φ) = (sqrt ᾱ, sqrt(1 - ᾱ)).
    torch.testing.assert_close(v.pow(2) + xt.pow(2), x0.pow(2) + eps.pow(2), rtol=1e-9, atol=1e-9)


def test_conversions_on_arbitrary_points():
    """On any (x, guess), not only on consistent triples, x̂0 from the σ-scale x equals x̂0 from the network's
    input c_in·x, and the ε- and v-rows agree when the guesses are the same rotation of (x0, ε)."""
    s = SCHEDULES["scaled_linear"]
    ts = torch.tensor([0, 10, 500, 999])
    sigma = s.sigmas[ts]
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) * (1 + sigma.reshape(-1, 1, 1, 1))
    guess = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    c_in = (1 + sigma.reshape(-1, 1, 1, 1) ** 2).rsqrt()
    for row in PARAMETERISATIONS.values():
        torch.testing.assert_close(row.denoise_input(x * c_in, guess, sigma), row.denoise(x, guess, sigma))
    x0_hat = PARAMETERISATIONS["eps"].denoise(x, guess, sigma)          # guess is ε̂; its v̂ gives the same x̂0
    v_hat = PARAMETERISATIONS["v"].target(x0_hat, guess, sigma)
    torch.testing.assert_close(PARAMETERISATIONS["v"].denoise(x, v_hat, sigma), x0_hat)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_conversions_keep_float32_accuracy(kind):
    """Run in float32, the conversions agree with float64 to float32 precision at every t, including
    t = 0 where 1 - ᾱ_0 = β_0 is tiny (forming it after casting ᾱ to float32 loses ~1e-4 relative)."""
    s = SCHEDULES[kind]
    ts = torch.arange(T)
    sigma = s.sigmas[ts]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(T, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(T, 4, generator=g, dtype=torch.float64)
    xt = s.q_sample(x0, ts, eps)
    eps_row, v_row = PARAMETERISATIONS["eps"], PARAMETERISATIONS["v"]
    v = v_row.target(x0, eps, sigma)
    # Each result is compared with float64 run on the same float32-rounded inputs. x̂0 from ε̂ multiplies x_t by
    # 1/sqrt(ᾱ), which amplifies the inputs' own rounding by that factor; the tolerance allows for it.
    amplify = {"x0_from_eps": 1 / s.sqrt_alphas_cumprod}
    for name, f, args in [("q_sample", s.q_sample, (x0, ts, eps)), ("eps_target", eps_row.target, (x0, eps, sigma)),
                          ("x0_from_eps", eps_row.denoise_input, (xt, eps, sigma)),
                          ("v_target", v_row.target, (x0, eps, sigma)),
                          ("x0_from_v", v_row.denoise_input, (xt, v, sigma))]:
        args32 = [a.float() if a.is_floating_point() and a is not sigma else a for a in args]
        want = f(*[a.double() if a.is_floating_point() else a for a in args32])
        got = f(*args32)
        assert got.dtype == torch.float32
        scale = amplify.get(name, torch.ones(T, dtype=torch.float64))[:, None]
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=5e-7, msg=name)


# --- Min-SNR weights ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_equal_their_formulas(kind, gamma):
    s = SCHEDULES[kind]
    t = torch.arange(T)
    a = s.alphas_cumprod
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    w_eps = min_snr_weight(s, t, gamma, "eps")
    w_x0 = min_snr_weight(s, t, gamma, "x0")
    w_v = min_snr_weight(s, t, gamma, "v")
    torch.testing.assert_close(w_eps, clipped / snr, rtol=1e-10, atol=0)
    torch.testing.assert_close(w_x0, clipped, rtol=1e-10, atol=0)
    torch.testing.assert_close(w_v, clipped / (snr + 1), rtol=1e-10, atol=0)
    # All three are the same weight min(SNR, γ) on the x0-scale error, since for a fixed x_t
    # ||ε - ε̂||² = SNR·||x0 - x̂0||² and ||v - v̂||² = (SNR + 1)·||x0 - x̂0||².
    torch.testing.assert_close(w_eps * snr, w_x0, rtol=1e-10, atol=0)
    torch.testing.assert_close(w_v * (snr + 1), w_x0, rtol=1e-10, atol=0)


def test_loss_scales_behind_min_snr():
    """The identities the Min-SNR weights rely on, checked with the scalings table: the output F̂ that gives
    x̂0 at x = x0 + σε is that row's target for (x̂0, ε̂) with ε̂ = (x - x̂0)/σ."""
    s = SCHEDULES["linear"]
    ts = torch.tensor([3, 200, 700])
    sigma = s.sigmas[ts]
    x0, eps = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(3, 8, dtype=torch.float64)
    eps_hat = (x0 + sigma[:, None] * eps - x0_hat) / sigma[:, None]
    snr = s.log_snr[ts].exp()
    err_x0 = (x0 - x0_hat).pow(2).sum(1)
    err = {name: (row.target(x0, eps, sigma) - row.target(x0_hat, eps_hat, sigma)).pow(2).sum(1)
           for name, row in PARAMETERISATIONS.items()}
    err_eps, err_v = err["eps"], err["v"]
    torch.testing.assert_close(err["x0"], err_x0)
    torch.testing.assert_close(err_eps, snr * err_x0)
    torch.testing.assert_close(err_v, (snr + 1) * err_x0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_diffusion_loss_applies_min_snr_weight(prediction):
    s = SCHEDULES["linear"]
    torch.manual_seed(0)
    net = lambda x, t, cond: 0.5 * x  # noqa: E731  (any deterministic stand-in network)
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 100, 500, 999])
    plain = training_loss(net, s, x0, t, noise, prediction=prediction)
    weighted = training_loss(net, s, x0, t, noise, prediction=prediction, min_snr_gamma=5.0)
    torch.testing.assert_close(weighted, plain * min_snr_weight(s, t, 5.0, prediction).float())
