"""The variational bound in bits/dim (likelihood.py) and the learned variance of improved DDPM (losses.py,
timestep_sampler.py, the Denoiser and the DDPM sampler, training and the CLI).

Closed forms where they exist: KL against torch.distributions, the decoder's 256 probabilities summing to 1,
an oracle network whose KL terms vanish, and Gaussian toy data whose exact reverse process and true NLL are known.
Tiny U-Nets on scikit-learn's bundled digits for the training checks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from noisecraft.cli import main
from noisecraft.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig, make_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.denoiser import Denoiser, denoise_with_variance
from noisecraft.errors import NoisecraftError
from noisecraft.guidance.classifier_free import ClassifierFreeGuidance
from noisecraft.io.checkpoint import load_json, load_weights
from noisecraft.likelihood import (
    discretized_gaussian_log_likelihood,
    gaussian_log_density,
    model_posterior,
    normal_kl,
    posterior_log_variance_clipped,
    prior_bpd,
    vlb_bits_per_dim,
    vlb_terms,
)
from noisecraft.losses import training_loss
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.samplers import sample_ddpm
from noisecraft.samplers.steps import discrete_sigmas
from noisecraft.schedule import NoiseSchedule
from noisecraft.training.timestep_sampler import TimestepSampler
from noisecraft.training.trainer import Trainer, resume_trainer

LN2 = math.log(2)


# ---------------------------------------------------------------- Gaussian building blocks


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(500, generator=g, dtype=torch.float64) * 2 for _ in range(4))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-10, atol=1e-12)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) < 1e-12


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-6)])
def test_discretized_decoder_sums_to_one_over_256_levels(dtype, tol):
    levels = (torch.arange(256, dtype=torch.float64) * 2 / 255 - 1).to(dtype)
    for mean, log_scale in [(0.0, -3.0), (0.31, -6.0), (-0.9, -1.0), (1.0, -4.0), (2.5, -1.0), (-5.0, -4.0),
                            (40.0, -8.0), (0.1, 3.0)]:
        logp = discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=dtype),
                                                   torch.tensor(log_scale, dtype=dtype))
        assert torch.isfinite(logp).all() and bool((logp <= 0).all())
        assert abs(float(logp.double().exp().sum()) - 1) < tol, (mean, log_scale)


def test_discretized_decoder_bins_and_edges():
    # A wide Gaussian: an interior bin's mass is its density times the bin width 2/255.
    x, mean, log_scale = torch.tensor([0.2 - 0.2 % (2 / 255)], dtype=torch.float64), 0.1, math.log(0.5)
    mass = discretized_gaussian_log_likelihood(x, torch.tensor(mean), torch.tensor(log_scale)).exp()
    density = gaussian_log_density(x, torch.tensor(mean), torch.tensor(2 * log_scale)).exp()
    assert float(mass) == pytest.approx(float(density) * 2 / 255, rel=1e-4)
    # The edge bins are open: x = -1 holds all the mass left of -1 + 1/255.
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), 0.5)
    left = discretized_gaussian_log_likelihood(torch.tensor([-1.0]), torch.tensor(mean), torch.tensor(log_scale))
    assert float(left.exp()) == pytest.approx(float(normal.cdf(torch.tensor(-1 + 1 / 255))), rel=1e-5)
    # Far-tail bins keep finite log-probabilities and finite gradients.
    means = torch.tensor([0.0, 5.0, -40.0], requires_grad=True)
    scales = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    logp = discretized_gaussian_log_likelihood(torch.tensor([0.2, -1.0, 1.0]), means, scales)
    logp.sum().backward()
    assert torch.isfinite(logp).all() and torch.isfinite(means.grad).all() and torch.isfinite(scales.grad).all()


# ---------------------------------------------------------------- the terms of the bound

SCHEDULE = NoiseSchedule.create("cosine", 1000)


class Oracle(nn.Module):
    """Returns the very noise that made x_t, so x̂0 = x0: every KL term with the posterior variance is 0."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise

    def forward(self, x, t, cond=None):
        return self.noise


def test_vlb_terms_of_an_oracle_and_the_decoder_by_hand():
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(1, 255, (3, 2, 4, 4), generator=g) * 2 / 255 - 1).double()   # interior levels
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    net = Oracle(noise)
    t = torch.tensor([999, 500, 1])
    assert float(vlb_terms(net, SCHEDULE, x0, t, noise).abs().max()) < 1e-9
    # "large" variance: KL(N(μ, β̃) || N(μ, β)) per dimension, in bits, by hand.
    beta, tilde = SCHEDULE.betas[t], SCHEDULE.posterior_variance[t]
    by_hand = normal_kl(torch.zeros(3), tilde.log(), torch.zeros(3), beta.log()) / LN2
    assert torch.allclose(vlb_terms(net, SCHEDULE, x0, t, noise, variance="large"), by_hand.double(), rtol=1e-6)
    # t = 0: -log of the bin mass of N(x0, β̃_1) (the clipped variance), the same for every interior pixel.
    std = math.sqrt(float(SCHEDULE.posterior_variance[1]))
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), std)
    want = -float((normal.cdf(torch.tensor(1 / 255)) - normal.cdf(torch.tensor(-1 / 255))).log()) / LN2
    got = vlb_terms(net, SCHEDULE, x0, 0, noise)
    assert torch.allclose(got, torch.full((3,), want, dtype=torch.float64), rtol=1e-6)
    # The prior term L_T by hand.
    a = SCHEDULE.alphas_cumprod[-1]
    kl = normal_kl(a.sqrt() * x0, (1 - a).log(), torch.zeros(()), torch.zeros(()))
    assert torch.allclose(prior_bpd(SCHEDULE, x0), kl.flatten(1).mean(1) / LN2)
    with pytest.raises(NoisecraftError, match="timesteps must be integers"):
        vlb_terms(net, SCHEDULE, x0, 1000, noise)


# ---------------------------------------------------------------- Gaussian toy data: the bound vs the true NLL

MU, S = 0.3, 0.5
TOY = NoiseSchedule.create("cosine", 200)


class ExactGaussianNet(nn.Module):
    """ε̂ = E[ε | x_t] for data x0 ~ N(μ, s² I), with E[x0|x_t] = μ + √ᾱ s²/(ᾱ s² + 1 - ᾱ)·(x_t - √ᾱ μ).

    learned=True also outputs the v that makes p_θ(x_{t-1}|x_t) the exact reverse conditional:
    Var(x_{t-1}|x_t) = β̃_t + c_0²·Var(x0|x_t), Var(x0|x_t) = s²(1 - ᾱ)/(ᾱ s² + 1 - ᾱ), c_0 the posterior's x0 weight."""

    def __init__(self, learned: bool = False):
        super().__init__()
        self.learned = learned

    def forward(self, x, t, cond=None):
        def at(values):
            return values[t.long()].to(x.dtype).reshape(-1, 1, 1, 1)
        a = at(TOY.alphas_cumprod)
        x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if not self.learned:
            return eps
        var = at(TOY.posterior_variance) + at(TOY.posterior_mean_coef_x0) ** 2 * S**2 * (1 - a) / (a * S**2 + 1 - a)
        lo, hi = at(posterior_log_variance_clipped(TOY)), at(TOY.betas.log())
        v = 2 * (var.log() - lo) / (hi - lo) - 1
        return torch.cat([eps, v.expand_as(eps)], dim=1)


def test_bound_is_above_the_true_nll_of_gaussian_data():
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(1000, 4, 1, 1, generator=g, dtype=torch.float64)   # D = 4
    nll = -gaussian_log_density(x0, torch.tensor(MU), torch.tensor(2 * math.log(S))).flatten(1).mean(1) / LN2
    gaps = {}
    for learned in (False, True):
        result = vlb_bits_per_dim(ExactGaussianNet(learned), TOY, x0, learned_variance=learned,
                                  continuous_decoder=True, batch_size=1000, generator=torch.Generator().manual_seed(1))
        diff = result["total"] - nll
        gap, se = float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))
        assert gap > -3 * se, (learned, gap, se)      # bound ≥ true NLL on average
        gaps[learned] = (gap, se)
    # with the exact reverse variance the bound is tight (only L_T's tiny prior mismatch is left); with β̃ it is not
    assert abs(gaps[True][0]) < 3 * gaps[True][1] + 0.01, gaps
    assert gaps[False][0] > gaps[True][0] + 0.1, gaps   # measured: 0.96 vs -0.02 ± 0.02 bits/dim (T = 200)


def test_a_denoiser_brings_its_own_settings():
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(64, 4, 1, 1, generator=g)
    net = ExactGaussianNet(learned=True)
    raw = vlb_bits_per_dim(net, TOY, x0, learned_variance=True, continuous_decoder=True, timesteps=7)
    wrapped = vlb_bits_per_dim(Denoiser(net, TOY, "eps", learned_variance=True), TOY, x0, continuous_decoder=True,
                               timesteps=7)
    assert torch.equal(raw["total"], wrapped["total"]) and raw["estimator"] == "sampled" and raw["timesteps"] == 8
    t = torch.full((64,), 30)
    mean, log_var, x0_hat = model_posterior(net, TOY, x0, t, learned_variance=True)
    assert mean.shape == log_var.shape == x0_hat.shape == x0.shape
    fixed = model_posterior(ExactGaussianNet(), TOY, x0, t)
    assert torch.allclose(mean, fixed[0]) and torch.allclose(x0_hat, fixed[2])
    assert not torch.allclose(log_var, fixed[1])


# ---------------------------------------------------------------- bits/dim of a tiny U-Net on digits


def tiny_model(learn_sigma=False, attention=()):
    return UNetConfig(in_channels=1, out_channels=2 if learn_sigma else 1, base_channels=8, channel_mults=(1, 2),
                      num_res_blocks=1, attention_levels=attention, head_dim=8, groups=4, dropout=0.0)


def tiny_config(diffusion: DiffusionConfig, steps: int, batch_size=16, **train) -> RunConfig:
    train_kw = dict(batch_size=batch_size, lr=3e-3, warmup_steps=10, ema_decay=0.9, steps=steps, sample_every=0,
                    checkpoint_every=0, log_every=0, seed=3, **train)
    return RunConfig(model=tiny_model(diffusion.learn_sigma), diffusion=diffusion, train=TrainConfig(**train_kw),
                     data=DataConfig(dataset="digits", image_shape=(1, 16, 16)))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train")


def test_training_lowers_bits_per_dim_and_the_sampled_estimate_agrees(digits, tmp_path):
    test_images = load_dataset("digits", split="test").batch(torch.arange(64))[0]
    trainer = Trainer(tiny_config(DiffusionConfig(schedule="cosine", T=50), steps=120), digits, tmp_path,
                      progress=False)
    untrained = vlb_bits_per_dim(trainer.model, trainer.schedule, test_images)
    trainer.fit()
    calls = []
    exact = vlb_bits_per_dim(trainer.model, trainer.schedule, test_images, progress=calls.append, batch_size=40)
    sampled = vlb_bits_per_dim(trainer.model, trainer.schedule, test_images, timesteps=8,
                               generator=torch.Generator().manual_seed(5))
    assert untrained["mean"] > exact["mean"] + 10 * exact["stderr"], (untrained["mean"], exact["mean"])
    assert exact["estimator"] == "exact" and sampled["estimator"] == "sampled"
    assert sum(calls) == 64 * 50 and set(calls) == {40, 24}
    assert exact["total"].shape == (64,) and torch.isfinite(exact["terms"]).all()
    # every image has every term: the mean bound is the prior plus the per-term means, terms[0] the decoder's
    assert float(exact["terms"].sum() + exact["prior"].mean()) == pytest.approx(exact["mean"], rel=1e-9)
    assert float(exact["decoder"].mean()) == pytest.approx(float(exact["terms"][0]), rel=1e-9)
    combined_se = math.hypot(exact["stderr"], sampled["stderr"])
    assert abs(sampled["mean"] - exact["mean"]) < 3 * combined_se, (sampled["mean"], exact["mean"], combined_se)
    assert float(sampled["decoder"].mean()) == pytest.approx(float(sampled["terms"][0]), rel=1e-9)
    with pytest.raises(NoisecraftError, match="timesteps must be"):
        vlb_bits_per_dim(trainer.model, trainer.schedule, test_images, timesteps=0)


# ---------------------------------------------------------------- learned variance: loss, sampler, training


def test_hybrid_loss_trains_the_mean_only_through_l_simple():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (4, 1, 4, 4), generator=g) * 2 / 255 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 3, 250, 999])

    def grads(loss, learn_sigma=True):
        out = (torch.randn(4, 2 if learn_sigma else 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.5
               ).requires_grad_(True)
        value = training_loss(lambda x, tt, cond=None: out, SCHEDULE, x0, t, noise, learn_sigma=learn_sigma,
                              loss=loss, min_snr_gamma=5.0)
        value.sum().backward()
        return value.detach(), out.grad

    simple, g_simple = grads("simple")
    hybrid, g_hybrid = grads("hybrid")
    vlb, g_vlb = grads("vlb")
    assert torch.equal(g_hybrid[:, :1], g_simple[:, :1])          # stop-gradient: the mean sees only L_simple
    assert float(g_simple[:, 1:].abs().max()) == 0 and float(g_hybrid[:, 1:].abs().max()) > 0
    assert float(g_vlb[:, :1].abs().max()) > 0                     # "vlb" trains the mean too
    assert bool((hybrid > simple).all())                           # + λ·T·L_t, which is positive here
    assert torch.isfinite(vlb).all()
    with pytest.raises(NoisecraftError, match="output 2 channels"):
        training_loss(lambda x, tt, cond=None: torch.zeros(4, 1, 4, 4), SCHEDULE, x0, t, noise, learn_sigma=True,
                      loss="hybrid")


def test_importance_sampler_is_uniform_until_warm_then_follows_the_loss_rms():
    sampler = TimestepSampler(4, "importance", history=10, uniform_prob=0.001)
    g = torch.Generator().manual_seed(0)
    for t in range(3):
        sampler.update(torch.full((12,), t), torch.arange(12.0) + 1 + t)     # 12 > 10: the oldest two drop out
    sampler.update(torch.full((9,), 3), torch.full((9,), 2.0))
    assert not sampler.warmed_up
    assert torch.equal(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    t, w = sampler.sample(1000, g)
    assert torch.equal(w, torch.ones(1000)) and set(t.tolist()) == {0, 1, 2, 3}
    sampler.update(torch.tensor([3]), torch.tensor([2.0]))
    assert sampler.warmed_up
    assert torch.equal(sampler.history[0], torch.arange(3.0, 13.0, dtype=torch.float64))
    rms = torch.stack([(torch.arange(3.0, 13.0, dtype=torch.float64) + t).pow(2).mean().sqrt() for t in range(3)]
                      + [torch.tensor(2.0, dtype=torch.float64)])
    want = rms / rms.sum() * 0.999 + 0.001 / 4
    assert torch.allclose(sampler.probabilities(), want, rtol=1e-12)
    t, w = sampler.sample(20000, g)
    freq = torch.bincount(t, minlength=4).double() / 20000
    assert torch.allclose(freq, want, atol=0.015)
    assert torch.allclose(w.double(), 1 / (4 * want[t]), rtol=1e-6)
    restored = TimestepSampler(4, "importance")
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.probabilities(), sampler.probabilities())
    with pytest.raises(NoisecraftError, match="does not fit"):
        TimestepSampler(5, "importance").load_state_dict(sampler.state_dict())
    uniform = TimestepSampler(4)
    uniform.update(torch.tensor([0]), torch.tensor([1.0]))
    assert int(uniform.count.sum()) == 0


class LearnedEpsNet(nn.Module):
    """A fixed random conv net on 3 channels with 6 outputs: a tame ε (Gaussian-data ε plus a wiggle) and v."""

    def __init__(self, schedule, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.float())

    def forward(self, x, t, cond=None):
        a = self.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        h = torch.tanh(self.conv(x) + torch.sin(t.float() / 150.0).reshape(-1, 1, 1, 1))
        eps = (1 - a).sqrt() / (0.25 * a + 1 - a) * x + 0.1 * h[:, :3]
        return torch.cat([eps, h[:, 3:]], dim=1)


def test_ddpm_with_learned_variance_matches_diffusers_learned_range():
    schedule = NoiseSchedule.create("linear", 1000)
    net = LearnedEpsNet(schedule)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                        variance_type="learned_range")
    ref.set_timesteps(20)
    sigmas = discrete_sigmas(schedule, 20, "leading")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, g = x_T, torch.Generator().manual_seed(5)
        for t in ref.timesteps:
            want = ref.step(net(want, t.float().expand(2)), t, want, generator=g).prev_sample
    denoiser = Denoiser(net, schedule, "eps", learned_variance=True)
    got = sample_ddpm(denoiser, x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas,
                      generator=torch.Generator().manual_seed(5))             # variance "learned" by default
    assert float((got - want).abs().max()) < 1e-4
    small = sample_ddpm(denoiser, x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, variance="small",
                        generator=torch.Generator().manual_seed(5))
    assert float((got - small).abs().max()) > 1e-3


def test_denoiser_uses_the_first_channels_and_exposes_the_variance():
    schedule = NoiseSchedule.create("linear", 1000)
    net = LearnedEpsNet(schedule)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    sigma = schedule.sigmas[[400, 400]].float()
    learned = Denoiser(net, schedule, "eps", learned_variance=True)
    fixed = Denoiser(lambda x_vp, t, cond=None: net(x_vp, t)[:, :3], schedule, "eps")
    x0, v = denoise_with_variance(learned, x, sigma)
    assert torch.allclose(x0, fixed(x, sigma)) and v.shape == x.shape
    # float32, two paths: the Denoiser forms c_in = sqrt(ᾱ) in float64, this line in float32, so the net's inputs
    # differ in the last bit and v = tanh(·) ∈ [-1, 1] by ~1 ulp of the conv sums (2.4e-7 seen) → atol 1e-6; the
    # ε channels, an unscaled input or t = 399 instead are off by 5, 0.7 and 6e-3.
    want_v = net(x * (1 / (1 + sigma**2)).sqrt().reshape(-1, 1, 1, 1), torch.tensor([400.0] * 2))[:, 3:]
    torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-6)
    assert denoise_with_variance(fixed, x, sigma)[1] is None
    # classifier-free guidance: one doubled batch; the variance of the conditional rows comes back
    guided = ClassifierFreeGuidance(learned, 3.0, torch.tensor([9]))
    gx0, gv = denoise_with_variance(guided, x, sigma, torch.tensor([1, 2]))
    assert gv.shape == x.shape and guided.learned_variance
    torch.testing.assert_close(gv, v, rtol=1e-5, atol=1e-6)   # float32: a batch of 4, not 2, through the conv
    # a U-Net with 2C outputs is recognised from its config
    assert Denoiser(UNet(tiny_model(learn_sigma=True)), schedule).learned_variance
    assert not Denoiser(UNet(tiny_model()), schedule).learned_variance
    with pytest.raises(NoisecraftError, match="--learn-sigma"):
        sample_ddpm(fixed, x, discrete_sigmas(schedule, 3, "leading"), variance="learned")


def test_config_fields_validate_and_old_configs_load(digits):
    old = tiny_config(DiffusionConfig(), steps=1).to_dict()
    for key in ("learn_sigma", "loss", "vlb_weight", "timestep_sampling"):
        del old["diffusion"][key]
    loaded = RunConfig.from_dict(old)
    assert (loaded.diffusion.learn_sigma, loaded.diffusion.loss, loaded.diffusion.timestep_sampling) == \
           (False, "simple", "uniform")
    for bad, match in [(dict(loss="kl"), "unknown loss"), (dict(timestep_sampling="fancy"), "timestep sampling"),
                       (dict(vlb_weight=-1.0), "vlb_weight"), (dict(learn_sigma="yes"), "learn_sigma must be"),
                       (dict(learn_sigma=True), "loss 'hybrid' or 'vlb'"), (dict(loss="hybrid"), "needs learn_sigma")]:
        with pytest.raises(NoisecraftError, match=match):
            DiffusionConfig(**bad)
    with pytest.raises(NoisecraftError, match="out_channels = 2"):
        RunConfig(model=tiny_model(), diffusion=DiffusionConfig(learn_sigma=True, loss="hybrid"), train=TrainConfig(),
                  data=DataConfig())
    config = make_run_config(digits, diffusion=dict(learn_sigma=True, loss="vlb"))
    assert config.model.out_channels == 2 * config.model.in_channels


def test_learned_variance_run_resumes_bit_exactly_with_importance_sampling(digits, tmp_path):
    few = digits.subset(40)
    diffusion = DiffusionConfig(schedule="cosine", T=5, learn_sigma=True, loss="hybrid", timestep_sampling="importance")
    n = 6
    config = tiny_config(diffusion, steps=2 * n)
    straight = Trainer(config, few, tmp_path / "straight", progress=False)
    straight.fit()
    assert straight.timestep_sampler.warmed_up    # 16 draws a step over 5 timesteps: warm after a few steps
    first = Trainer(replace(config, train=replace(config.train, steps=n)), few, tmp_path / "resumed", progress=False)
    first.fit()
    torch.manual_seed(999)
    second = resume_trainer(tmp_path / "resumed", few, progress=False, steps=2 * n)
    assert torch.equal(second.timestep_sampler.history, first.timestep_sampler.history)
    second.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert torch.equal(straight.generator.get_state(), second.generator.get_state())
    for key in ("history", "count"):
        assert torch.equal(straight.timestep_sampler.state_dict()[key], second.timestep_sampler.state_dict()[key])
    saved = load_weights(tmp_path / "resumed" / "state" / "timestep_sampler.safetensors")
    assert torch.equal(saved["history"], second.timestep_sampler.history)


def test_cli_trains_with_learn_sigma_and_samples_with_ddpm(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--out", str(run), "--steps", "4", "--batch-size", "16",
                 "--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-levels", "1",
                 "--sample-every", "0", "--learn-sigma", "--vlb-weight", "0.01", "--timestep-sampling", "importance",
                 "--no-download"]) == 0
    config = load_json(run / "config.json")
    assert config["model"]["out_channels"] == 2 and config["diffusion"]["learn_sigma"] is True
    assert (config["diffusion"]["loss"], config["diffusion"]["vlb_weight"],
            config["diffusion"]["timestep_sampling"]) == ("hybrid", 0.01, "importance")
    assert (run / "state" / "timestep_sampler.safetensors").is_file()
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "2", "--sampler", "ddpm", "--steps", "5", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["train", "--dataset", "digits", "--out", str(tmp_path / "bad"), "--steps", "1", "--loss", "hybrid",
                 "--no-download"]) == 2
    assert "needs learn_sigma" in capsys.readouterr().err


def test_eval_command_writes_a_report(tmp_path, monkeypatch):
    """`noisecraft eval RUN --nll --ode --fid` on a tiny digits run: eval.json and eval.md with every section."""
    import json

    from noisecraft.cli import main
    monkeypatch.setenv("NOISECRAFT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--out", str(run), "--steps", "2", "--base-channels", "8",
                 "--sample-every", "0"]) == 0
    assert main(["eval", str(run), "--nll", "--n", "8", "--nll-steps", "0", "--ode", "--rtol", "1e-2",
                 "--fid", "--samples", "16", "--batch-size", "8"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["nll_bound"]["estimator"] == "exact" and report["nll_bound"]["mean"] > 0
    assert len(report["nll_bound"]["terms"]) == 1000
    assert report["nll_ode"]["mean"] > 0 and report["nll_ode"]["n"] == 8
    assert 0 <= report["sample_quality"]["precision"] <= 1
    text = (run / "eval.md").read_text()
    assert "Variational bound" in text and "Probability-flow ODE" in text and "Sample quality" in text
    assert (run / "eval_terms.png").is_file() and (run / "eval_samples.png").is_file()

    # a train-vdm run through the same command (the classifier trained above is cached)
    vdm = tmp_path / "vdm"
    assert main(["train-vdm", "--dataset", "digits", "--out", str(vdm), "--steps", "2", "--batch-size", "8",
                 "--base-channels", "8", "--channel-mults", "1,2", "--attention-levels", "none", "--quiet"]) == 0
    assert main(["eval", str(vdm), "--nll", "--n", "8", "--fid", "--samples", "8", "--batch-size", "8"]) == 0
    report = json.loads((vdm / "eval.json").read_text())
    bound = report["nll_bound"]
    assert report["kind"] == "vdm" and bound["n"] == 8 and bound["mean"] > 0
    assert abs(bound["diffusion"] + bound["prior"] + bound["reconstruction"] - bound["mean"]) < 1e-3 * bound["mean"]
    assert 0 <= report["sample_quality"]["precision"] <= 1
    assert "VDM, continuous time" in (vdm / "eval.md").read_text() and (vdm / "eval_samples.png").is_file()
    assert main(["eval", str(vdm), "--ode"]) == 2          # one clear line: the ODE is for DDPM-family runs
