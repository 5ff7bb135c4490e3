"""DDPM and DDIM against diffusers' DDPMScheduler / DDIMScheduler, step by step and over whole loops.

Our samplers live on the σ scale (x_ve = x0 + σ ε) and take the denoiser's x̂0; diffusers works on the
DDPM scale (x_vp = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε) and takes the raw model output. Each comparison
therefore
  1. converts the sample in:  x_ve = x_vp / sqrt(ᾱ_t) = x_vp · sqrt(1 + σ_t²),
  2. turns the model output (ε, v or x0) into x̂0 by the papers' formulas on the VP scale,
  3. converts the result out: x_vp = x_ve · sqrt(ᾱ_s), with ᾱ_s = 1 after the last step (σ = 0).

Noise: DDIM's step takes `variance_noise`, so both sides get the same tensor. DDPMScheduler.step only
takes a generator and draws `torch.randn(shape, generator=g, dtype=float32)` once per step with t > 0;
we draw the same tensor from an identically seeded generator and hand it to `ddpm_step`. For whole
loops both sides get their own identically seeded `torch.Generator`: they must then draw the same
number of tensors of the same shape in the same order, which is itself part of what is tested.

Precision: diffusers keeps ᾱ_t in float32 and forms 1 - ᾱ_t and 1 - ᾱ_t/ᾱ_{t-1} from it, which cancels
badly near t = 0 (1 - ᾱ_1 ≈ 2e-4 from a float32 ᾱ_1 carries ~1e-4 relative error): one stock DDPM
step at t = 1, 2 or 10 differs from the exact value by up to ~3e-4. The single-step tests therefore run
diffusers twice: with our float64 ᾱ table put into the scheduler ("float64": then only the step
algorithms differ, and they agree to < 1e-5 at every t), and stock ("float32": its step "β" = 1 - ᾱ_t/ᾱ_s
carries an absolute error of a few 1e-7, so we allow max(1e-5, 4e-7/β); that is 1e-5 for all but the
last few fine steps). The whole-loop tests use stock diffusers.

One deliberate difference: DDPMScheduler adds noise whenever t > 0, also at the last step of a
schedule that does not end at t = 0 (trailing spacing ends at t = T/k - 1), where with "fixed_large" it
puts sqrt(1 - ᾱ_t)·z onto the final image. We follow DDPM's Algorithm 2 (z = 0 at the last step) and
compare that one step with diffusers' noise removed.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from noisecraft.denoiser import Denoiser
from noisecraft.errors import NoisecraftError
from noisecraft.samplers import sample_ddim, sample_ddpm
from noisecraft.samplers.ddim import ddim_step
from noisecraft.samplers.ddpm import ddpm_step
from noisecraft.samplers.steps import SPACINGS, discrete_sigmas, select_timesteps
from noisecraft.schedule import NoiseSchedule

T = 1000
SCHEDULE = NoiseSchedule.create("linear", T)
SHAPE = (2, 3, 8, 8)
TOL = 1e-5
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers name -> ours


def x0_from_output(x_vp, output, t, prediction):
    """x0 from x_vp = sqrt(ᾱ)x0 + sqrt(1 - ᾱ)ε and ε (DDPM eq. 14), or x0 = sqrt(ᾱ)x_vp - sqrt(1 - ᾱ)v (Salimans &
    Ho 2022), with the schedule's float64 square roots cast to the data's dtype."""
    sqrt_a = SCHEDULE.sqrt_alphas_cumprod[t].to(x_vp.dtype)
    sqrt_1ma = SCHEDULE.sqrt_one_minus_alphas_cumprod[t].to(x_vp.dtype)
    if prediction == "epsilon":
        return (x_vp - sqrt_1ma * output) / sqrt_a
    if prediction == "v_prediction":
        return sqrt_a * x_vp - sqrt_1ma * output
    return output


def prev_timestep(timesteps: torch.Tensor, t: int) -> int:
    """The next (smaller) timestep in the list, or -1 after the last one."""
    i = timesteps.tolist().index(t)
    return int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1


def our_step(step_fn, x_vp, output, t, s, prediction, noise, **options):
    """One step of `step_fn` (ddpm_step / ddim_step) on the σ scale, wrapped to the VP scale."""
    sigma = float(SCHEDULE.sigmas[t])
    sigma_next = float(SCHEDULE.sigmas[s]) if s >= 0 else 0.0
    a_s = float(SCHEDULE.alphas_cumprod[s]) if s >= 0 else 1.0
    x_ve = x_vp * math.sqrt(1 + sigma**2)
    x0 = x0_from_output(x_vp, output, t, prediction)
    return step_fn(x_ve, x0, sigma, sigma_next, noise, **options) * math.sqrt(a_s)


def reference(cls, tables: str, **config):
    """A diffusers scheduler on the linear schedule; tables="float64" puts our exact ᾱ_t into it."""
    ref = cls(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, **config)
    if tables == "float64":
        ref.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
        ref.one = ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return ref


def tolerance(tables: str, t: int, s: int) -> float:
    if tables == "float64":
        return TOL
    a_s = float(SCHEDULE.alphas_cumprod[s]) if s >= 0 else 1.0
    beta = 1 - float(SCHEDULE.alphas_cumprod[t]) / a_s
    return max(TOL, 4e-7 / beta)


def random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def max_diff(a, b):
    return float((a - b).abs().max())


# --- DDPM, one step -------------------------------------------------------------------------

DDPM_CASES = [  # (number of inference steps or None for all T, spacing, indices into the timestep list)
    (None, "leading", [0, 1, 500, 998, 999]),  # t = 999, 998, 499, 1, 0
    (50, "leading", [0, 1, 25, 48, 49]),       # t = 980, 960, 480, 20, 0
    (30, "trailing", [0, 1, 15, 28, 29]),      # T % 30 != 0: uneven gaps between timesteps
]


@pytest.mark.parametrize("variance, variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
@pytest.mark.parametrize("steps, spacing, indices", DDPM_CASES)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("tables", ["float64", "float32"])
def test_ddpm_step_matches_diffusers(variance, variance_type, steps, spacing, indices, prediction, tables):
    ref = reference(DDPMScheduler, tables, variance_type=variance_type, prediction_type=prediction,
                    timestep_spacing=spacing)
    if steps is not None:
        ref.set_timesteps(steps)
        timesteps = select_timesteps(SCHEDULE, steps, spacing)
        assert torch.equal(timesteps, ref.timesteps)
    else:
        timesteps = torch.arange(T - 1, -1, -1)  # training mode: diffusers steps t -> t - 1
    for i in indices:
        t = int(timesteps[i])
        s = prev_timestep(timesteps, t)
        x_vp, output = random_inputs(seed=t)
        if prediction == "sample":
            output = output.clamp(-1, 1)
        want = ref.step(output, t, x_vp, generator=torch.Generator().manual_seed(1000 + t)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + t))
        std = float(ref._get_variance(t)) ** 0.5 if t > 0 else 0.0  # diffusers' noise scale
        if s == -1:  # the last step: no noise on our side (see the module docstring)
            want = want - std * noise
        got = our_step(ddpm_step, x_vp, output, t, s, prediction, noise, variance=variance)
        assert max_diff(got, want) < tolerance(tables, t, s), (t, max_diff(got, want))

        # The noise enters with standard deviation sqrt(var), var as diffusers' _get_variance.
        mean = our_step(ddpm_step, x_vp, output, t, s, prediction, None, variance=variance)
        if s >= 0:
            assert max_diff(got - mean, std * noise) < tolerance(tables, t, s)
        else:  # the last step returns the posterior mean (= x̂0 here), no noise
            assert torch.equal(got, mean)


# --- DDIM, one step -------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps, indices", [(T, [0, 1, 500, 998, 999]), (50, [0, 1, 25, 48, 49])])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("tables", ["float64", "float32"])
def test_ddim_step_matches_diffusers(eta, steps, indices, prediction, tables):
    ref = reference(DDIMScheduler, tables, set_alpha_to_one=True, prediction_type=prediction)
    ref.set_timesteps(steps)
    timesteps = select_timesteps(SCHEDULE, steps, "leading")
    assert torch.equal(timesteps, ref.timesteps)
    for i in indices:
        t = int(timesteps[i])
        s = prev_timestep(timesteps, t)
        assert s == t - T // steps or s == -1  # what DDIMScheduler.step assumes
        x_vp, output = random_inputs(seed=t)
        if prediction == "sample":
            output = output.clamp(-1, 1)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2000 + t))
        want = ref.step(output, t, x_vp, eta=eta, variance_noise=noise).prev_sample
        got = our_step(ddim_step, x_vp, output, t, s, prediction, noise, eta=eta)
        assert max_diff(got, want) < tolerance(tables, t, s), (t, max_diff(got, want))


def test_ddim_eta1_has_ddpm_posterior_variance():
    """DDIM with η = 1 adds exactly the noise of DDPM's "small" (posterior) variance, and its mean is
    DDPM's posterior mean: the two steps coincide for the same noise (DDIM paper, §4.1)."""
    timesteps = select_timesteps(SCHEDULE, 50, "leading")
    for t in (980, 500, 20):
        s = prev_timestep(timesteps, t)
        x_vp, eps = random_inputs(seed=t)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        ddim = our_step(ddim_step, x_vp, eps, t, s, "epsilon", noise, eta=1.0)
        ddpm = our_step(ddpm_step, x_vp, eps, t, s, "epsilon", noise, variance="small")
        assert max_diff(ddim, ddpm) < TOL


# --- whole sampling loops -------------------------------------------------------------------


class TinyEpsNet(nn.Module):
    """A fixed random conv ε-model taking (x_vp, t, cond).

    Pure random weights make a sampler diverge to |x| ~ 100s, where float32 alone breaks a 1e-4
    comparison. So the output is the exact ε-prediction for data x0 ~ N(0, s² I),
    E[ε | x_t] = sqrt(1 - ᾱ_t)/(s² ᾱ_t + 1 - ᾱ_t) · x_t, plus a small random conv term that depends on
    x and t: samples stay O(1) and still depend on every weight and timestep.
    """

    def __init__(self, seed=0, s=0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.s2 = s * s
        self.register_buffer("alphas_cumprod", SCHEDULE.alphas_cumprod.float())
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t, cond=None):
        self.seen_t.append(t.clone())
        a = self.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        t = t.float().reshape(-1, 1, 1, 1)
        h = torch.tanh(self.conv1(x) + torch.sin(t / 150.0))
        wiggle = torch.tanh(self.conv2(h) + torch.cos(t / 300.0))
        return (1 - a).sqrt() / (self.s2 * a + 1 - a) * x + 0.1 * wiggle


def diffusers_loop(scheduler, net, x, **step_kwargs):
    for t in scheduler.timesteps:
        eps = net(x, t.float().expand(x.shape[0]))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def start_noise(sigmas):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))  # DDPM scale, N(0, I)
    return x_T, x_T * math.sqrt(1 + float(sigmas[0]) ** 2)                # ... and on the σ scale


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_full_loop_matches_diffusers(eta):
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(50)
    sigmas = discrete_sigmas(SCHEDULE, 50, "leading")
    x_T, x = start_noise(sigmas)

    net_ref, net_ours = TinyEpsNet(), TinyEpsNet()
    # η > 0: both draw their step noise from identically seeded generators (diffusers also draws one
    # tensor at the last step, where its standard deviation is 0; that draw comes last and is unused).
    with torch.no_grad():
        want = diffusers_loop(ref, net_ref, x_T, eta=eta, generator=torch.Generator().manual_seed(3))
    got = sample_ddim(Denoiser(net_ours, SCHEDULE, "eps"), x, sigmas, eta=eta,
                      generator=torch.Generator().manual_seed(3))
    # the network saw the same integer timesteps, in the same order
    assert torch.equal(torch.stack(net_ours.seen_t), torch.stack(net_ref.seen_t))
    assert max_diff(got, want) < 1e-4, max_diff(got, want)
    assert 0.1 < float(want.abs().max()) < 10  # a sample of sensible size, not trivially zero


@pytest.mark.parametrize("variance, variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
def test_ddpm_full_loop_matches_diffusers(variance, variance_type):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False,
                        variance_type=variance_type)
    ref.set_timesteps(20)
    sigmas = discrete_sigmas(SCHEDULE, 20, "leading")
    x_T, x = start_noise(sigmas)

    net_ref, net_ours = TinyEpsNet(), TinyEpsNet()
    with torch.no_grad():
        want = diffusers_loop(ref, net_ref, x_T, generator=torch.Generator().manual_seed(5))
    got = sample_ddpm(Denoiser(net_ours, SCHEDULE, "eps"), x, sigmas, variance=variance,
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.stack(net_ours.seen_t), torch.stack(net_ref.seen_t))
    assert max_diff(got, want) < 1e-4, max_diff(got, want)
    assert 0.1 < float(want.abs().max()) < 10


def test_sampler_callback_and_bad_options():
    sigmas = discrete_sigmas(SCHEDULE, 5, "leading")
    denoiser = Denoiser(TinyEpsNet(), SCHEDULE, "eps")
    _, x = start_noise(sigmas)
    seen = []
    sample_ddim(denoiser, x, sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5))
    assert [d["sigma"] for d in seen] == [float(s) for s in sigmas[:-1]]
    with pytest.raises(NoisecraftError):
        sample_ddim(denoiser, x, sigmas, eta=1.5)
    with pytest.raises(NoisecraftError):
        sample_ddpm(denoiser, x, sigmas, variance="learned")


# --- timestep selection ---------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
def test_select_timesteps_matches_diffusers_for_every_k(spacing):
    """All k = 1..T. (Deliberate difference, in stepping rather than in the list: diffusers'
    DDIMScheduler.step always goes from t to t - T // k, which for trailing/linspace spacing is not
    always the next timestep of its own list; our samplers, like DDPMScheduler, go to the next one.)"""
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for k in range(1, T + 1):
        ref.set_timesteps(k)
        ours = select_timesteps(SCHEDULE, k, spacing)
        assert ours.dtype == torch.long and torch.equal(ours, ref.timesteps), (spacing, k)
    ref_ddpm = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for k in (1, 7, 20, 48, 50, 333, 999):
        ref_ddpm.set_timesteps(k)
        assert torch.equal(select_timesteps(SCHEDULE, k, spacing), ref_ddpm.timesteps), (spacing, k)


def test_select_timesteps_other_T():
    schedule = NoiseSchedule.create("linear", 100)
    for spacing in SPACINGS:
        ref = DDIMScheduler(num_train_timesteps=100, timestep_spacing=spacing)
        for k in range(1, 101):
            ref.set_timesteps(k)
            assert torch.equal(select_timesteps(schedule, k, spacing), ref.timesteps), (spacing, k)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_discrete_sigmas(spacing):
    sigmas = discrete_sigmas(SCHEDULE, 25, spacing)
    ts = select_timesteps(SCHEDULE, 25, spacing)
    assert sigmas.shape == (26,) and float(sigmas[-1]) == 0.0
    assert torch.equal(sigmas[:-1], SCHEDULE.sigmas[ts])
    assert bool((sigmas.diff() < 0).all())


def test_select_timesteps_errors():
    with pytest.raises(NoisecraftError, match="spacing"):
        select_timesteps(SCHEDULE, 10, "uniform")
    for bad in (0, T + 1, 2.5):
        with pytest.raises(NoisecraftError, match="sampling steps"):
            select_timesteps(SCHEDULE, bad)
