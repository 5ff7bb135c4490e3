"""PLMS, LMS, Euler, Euler a, Heun, DPM++ 2M (and its SDE form) against diffusers' full loops.

Each test runs a diffusers scheduler's whole loop and our sampler on the same tiny deterministic model,
from the same initial noise, with the same injected noise (identically seeded generators, which must
then draw the same tensors in the same order), and asks the final samples to agree to 1e-4.

Scales. diffusers' Euler, Euler a, Heun and LMS schedulers work on our σ scale (x = x0 + σ ε): they
divide the model input by sqrt(σ² + 1), as our Denoiser does, and hand the network the timestep as a
float; with their default timestep_spacing="linspace" those timesteps are fractional and σ is
interpolated linearly in t. We hand our sampler the scheduler's own σ list (any descending list ending
in 0 works), and our Denoiser maps each σ back to t by interpolating log σ, so the network sees nearly
the same fractional t (< 0.01 apart here). The test network
is therefore smooth in t (ᾱ(t) interpolated), unlike the step-function TinyEpsNet of
test_samplers_parity.py. PNDM and DPM-Solver work on the DDPM scale (x_vp = x/sqrt(1 + σ²)); the
result (at σ = 0) is on the data scale for both.

Deliberate differences, each shown by a test below:
- DPMSolverMultistepScheduler with use_karras_sigmas=True rounds the Karras timesteps to integers for
  the network (its input is still scaled for the unrounded σ); our Denoiser passes the fractional t.
  The Karras test rounds t inside the test network on our side to compare the algorithms.
- DPMSolverMultistepScheduler's default linspace spacing is linspace(0, T-1, N+1) without its last
  point, unlike the DDIM/PNDM "linspace"; we pass its timesteps' σ's. With final_sigmas_type="sigma_min"
  it stops at σ_min instead of 0; our samplers take any σ list, so a list ending in σ_min reproduces it.
- PNDMScheduler's default set_alpha_to_one=False makes its last step end at ᾱ_0 (σ_min), not at the clean
  image; we always end at the last σ given. Stable Diffusion's configuration (steps_offset=1, that
  default) is reproduced with a σ list ending in σ_min.
- EulerDiscreteScheduler's churn (s_churn > 0) evaluates the model at the un-churned (x, σ) and then uses
  σ̂ in x̂0 = x̂ - σ̂ ε; we follow EDM's Algorithm 2 and evaluate D(x̂, σ̂). Parity is tested without churn.
- Ancestral and SDE schedulers draw one more noise tensor at the last step, where it is multiplied by
  0; we draw none there. The draw comes last, so the generators agree on every used tensor.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from torch import nn

from noisecraft.cli import build_parser
from noisecraft.denoiser import Denoiser
from noisecraft.errors import NoisecraftError
from noisecraft.samplers import (
    ALIASES,
    SAMPLERS,
    generate,
    get_sampler,
    resolve_sampler,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_plms,
)
from noisecraft.samplers.lms import lms_coefficients
from noisecraft.samplers.steps import discrete_sigmas, karras_sigmas, sigmas_from_timesteps
from noisecraft.schedule import NoiseSchedule

T = 1000
SCHEDULE = NoiseSchedule.create("linear", T)
SHAPE = (2, 3, 8, 8)
STEPS = 15
TOL = 1e-4
# diffusers forms σ from a float32 ᾱ: 1 - ᾱ_0 = β_0 = 1e-4 keeps ~4 digits, so its σ_0 is off by 8e-5
# (relative); by t = 100 the error is ~1e-6. Our σ table is float64.
SIGMA_RTOL = 2e-4
CONFIG = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")  # Heun's defaults differ


class SmoothEpsNet(nn.Module):
    """ε-model (x_vp, t) -> ε: the exact E[ε | x_t] for data x0 ~ N(0, s² I), with ᾱ(t) interpolated
    linearly between the integer timesteps so that the output is continuous in a fractional t, plus a
    small random conv term that depends on x and t. Samples stay O(1) and depend on every weight."""

    def __init__(self, seed=0, s=0.5, round_t=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.s2 = s * s
        self.round_t = round_t
        self.register_buffer("alphas_cumprod", SCHEDULE.alphas_cumprod.float())
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t, cond=None):
        t = t.float().round() if self.round_t else t.float()
        self.seen_t.append(t.clone())
        low = t.floor().clamp(0, T - 1).long()
        high = (low + 1).clamp(max=T - 1)
        w = (t - low).reshape(-1, 1, 1, 1)
        a = (1 - w) * self.alphas_cumprod[low].reshape(-1, 1, 1, 1) + w * self.alphas_cumprod[high].reshape(-1, 1, 1, 1)
        tt = t.reshape(-1, 1, 1, 1)
        h = torch.tanh(self.conv1(x) + torch.sin(tt / 150.0))
        wiggle = torch.tanh(self.conv2(h) + torch.cos(tt / 300.0))
        return (1 - a).sqrt() / (self.s2 * a + 1 - a) * x + 0.1 * wiggle


def max_diff(a, b):
    return float((a - b).abs().max())


def start_noise(sigma_max: float):
    """x_T ~ N(0, I) on the DDPM scale, and the same on the σ scale."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    return z, z * math.sqrt(1 + sigma_max**2)


def diffusers_loop(ref, net, x, **step_kwargs):
    for t in ref.timesteps:
        model_input = ref.scale_model_input(x, t)
        out = net(model_input, t.float().expand(x.shape[0]))
        x = ref.step(out, t, x, **step_kwargs).prev_sample
    return x


def compare(ref, sampler, sigmas, *, vp: bool, seed=None, round_t=False, final_scale=1.0, **options):
    """Run diffusers' loop and our sampler; return (ours, theirs, nets). vp: diffusers on the DDPM scale."""
    net_ref, net_ours = SmoothEpsNet(round_t=round_t), SmoothEpsNet(round_t=round_t)
    z, x = start_noise(float(sigmas[0]))
    gen = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    kwargs = {"generator": gen()} if seed is not None else {}
    with torch.no_grad():
        want = diffusers_loop(ref, net_ref, z if vp else x, **kwargs)
    got = sampler(Denoiser(net_ours, SCHEDULE, "eps"), x, sigmas, generator=gen(), **options) * final_scale
    # the same number of network evaluations, at nearly the same timesteps (fractional t: diffusers maps
    # σ -> t with float32 log tables or, for its linspace spacing, interpolates σ linearly in t; < 0.01 apart)
    assert len(net_ours.seen_t) == len(net_ref.seen_t)
    assert max_diff(torch.stack(net_ours.seen_t), torch.stack(net_ref.seen_t)) < 1e-2
    assert 0.1 < float(want.abs().max()) < 10  # a sample of sensible size, not trivially zero
    return got, want


def ref_sigmas(ref) -> torch.Tensor:
    """A σ-scale scheduler's σ list (float32) in float64: what we hand our sampler for its spacing."""
    return torch.unique_consecutive(ref.sigmas.double())  # Heun lists each inner σ twice


# --- Karras σ spacing ------------------------------------------------------------------------


def test_karras_sigmas_edm_eq5_and_diffusers():
    sigmas = karras_sigmas(0.002, 80.0, 18)  # EDM's defaults for CIFAR-10
    assert sigmas.shape == (19,) and float(sigmas[-1]) == 0.0 and bool((sigmas.diff() < 0).all())
    i = torch.arange(18, dtype=torch.float64)
    edm = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert torch.allclose(sigmas[:-1], edm, rtol=1e-12)
    assert math.isclose(float(sigmas[0]), 80.0) and math.isclose(float(sigmas[-2]), 0.002)
    ref = EulerDiscreteScheduler(**CONFIG, use_karras_sigmas=True)
    ref.set_timesteps(STEPS)
    ours = karras_sigmas(SCHEDULE.sigma_min, SCHEDULE.sigma_max, STEPS)
    assert torch.allclose(ours.float(), ref.sigmas, rtol=SIGMA_RTOL)
    assert karras_sigmas(0.1, 10.0, 1).tolist() == [10.0, 0.0]
    with pytest.raises(NoisecraftError):
        karras_sigmas(1.0, 0.5, 10)


# --- σ-scale schedulers: Euler, Euler a, Heun, LMS ----------------------------------------------

K_CASES = {  # name -> (scheduler class, our sampler, generator seed or None)
    "euler": (EulerDiscreteScheduler, sample_euler, None),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, sample_euler_ancestral, 11),
    "heun": (HeunDiscreteScheduler, sample_heun, None),
    "lms": (LMSDiscreteScheduler, sample_lms, None),
}


@pytest.mark.parametrize("name, spacing", [(name, spacing) for name in K_CASES
                                           for spacing in ("linspace", "leading", "trailing", "karras")
                                           if (name, spacing) != ("euler_ancestral", "karras")])  # no such option
def test_sigma_scale_schedulers_match_diffusers(name, spacing):
    cls, sampler, seed = K_CASES[name]
    if spacing == "karras":
        ref = cls(**CONFIG, use_karras_sigmas=True)
        ref.set_timesteps(STEPS)
        sigmas = karras_sigmas(SCHEDULE.sigma_min, SCHEDULE.sigma_max, STEPS)
    elif spacing == "linspace":  # diffusers' default: fractional timesteps, σ interpolated linearly in t
        ref = cls(**CONFIG)
        ref.set_timesteps(STEPS)
        sigmas = ref_sigmas(ref)
    else:  # integer timesteps: the schedule's own σ's, as generate() picks them
        ref = cls(**CONFIG, timestep_spacing=spacing)
        ref.set_timesteps(STEPS)
        sigmas = discrete_sigmas(SCHEDULE, STEPS, spacing)
    assert torch.allclose(sigmas.float(), ref_sigmas(ref).float(), rtol=SIGMA_RTOL)
    got, want = compare(ref, sampler, sigmas, vp=False, seed=seed)
    assert max_diff(got, want) < TOL, max_diff(got, want)


# --- DPM-Solver++ (2M) and its SDE form ----------------------------------------------------------


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "karras"])
@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_matches_diffusers(spacing, sde):
    algorithm = "sde-dpmsolver++" if sde else "dpmsolver++"
    config = dict(CONFIG, algorithm_type=algorithm, solver_order=2, lower_order_final=True)
    if spacing == "karras":
        ref = DPMSolverMultistepScheduler(**config, use_karras_sigmas=True)
        ref.set_timesteps(STEPS)
        sigmas = karras_sigmas(SCHEDULE.sigma_min, SCHEDULE.sigma_max, STEPS)
    else:
        ref = DPMSolverMultistepScheduler(**config, timestep_spacing=spacing)
        ref.set_timesteps(STEPS)
        sigmas = sigmas_from_timesteps(SCHEDULE, ref.timesteps)
        if spacing == "trailing":
            assert torch.equal(sigmas, discrete_sigmas(SCHEDULE, STEPS, "trailing"))
    assert torch.allclose(sigmas.float(), ref.sigmas, rtol=SIGMA_RTOL)
    sampler = sample_dpmpp_2m_sde if sde else sample_dpmpp_2m
    got, want = compare(ref, sampler, sigmas, vp=True, seed=13 if sde else None, round_t=spacing == "karras")
    assert max_diff(got, want) < TOL, max_diff(got, want)


def test_dpmpp_2m_final_sigma_min_matches_diffusers():
    """final_sigmas_type="sigma_min" stops at σ_min (with 15+ steps the last step stays second order):
    the same σ list ending in σ_min instead of 0 reproduces it; the result is then at noise level σ_min."""
    ref = DPMSolverMultistepScheduler(**CONFIG, final_sigmas_type="sigma_min")
    ref.set_timesteps(STEPS)
    sigmas = sigmas_from_timesteps(SCHEDULE, ref.timesteps)
    sigmas[-1] = SCHEDULE.sigma_min
    alpha_min = 1 / math.sqrt(1 + SCHEDULE.sigma_min**2)
    got, want = compare(ref, sample_dpmpp_2m, sigmas, vp=True, final_scale=alpha_min)
    assert max_diff(got, want) < TOL, max_diff(got, want)


# --- PLMS ---------------------------------------------------------------------------------------


def test_plms_matches_pndm_skip_prk():
    """PNDMScheduler(skip_prk_steps=True), leading spacing; set_alpha_to_one=True so that it ends at σ = 0.
    N steps cost N + 1 evaluations on both sides (the warm-up Heun step evaluates twice)."""
    ref = PNDMScheduler(**CONFIG, skip_prk_steps=True, set_alpha_to_one=True)
    ref.set_timesteps(STEPS)
    sigmas = discrete_sigmas(SCHEDULE, STEPS, "leading")
    assert len(ref.timesteps) == STEPS + 1
    got, want = compare(ref, sample_plms, sigmas, vp=True)
    assert max_diff(got, want) < TOL, max_diff(got, want)


def test_plms_matches_stable_diffusion_pndm_config():
    """Stable Diffusion's PNDM: steps_offset=1 and set_alpha_to_one=False, so the last step goes from t = 1
    to ᾱ_0. Our σ list: the σ's at those timesteps, ending in σ_min = σ_0 instead of 0."""
    ref = PNDMScheduler(**CONFIG, skip_prk_steps=True, steps_offset=1)
    ref.set_timesteps(STEPS)
    timesteps = torch.arange(STEPS - 1, -1, -1) * (T // STEPS) + 1
    sigmas = sigmas_from_timesteps(SCHEDULE, timesteps)
    sigmas[-1] = SCHEDULE.sigma_min
    alpha_min = 1 / math.sqrt(1 + SCHEDULE.sigma_min**2)
    got, want = compare(ref, sample_plms, sigmas, vp=True, final_scale=alpha_min)
    assert max_diff(got, want) < TOL, max_diff(got, want)


# --- pieces -------------------------------------------------------------------------------------


def test_lms_coefficients_match_quadrature():
    ref = LMSDiscreteScheduler(**CONFIG)
    ref.set_timesteps(STEPS)
    sigmas = ref.sigmas.double().tolist()
    for i in (0, 1, 2, 7, STEPS - 1):
        order = min(i + 1, 4)
        ours = lms_coefficients(sigmas, i, order)
        theirs = [ref.get_lms_coefficient(order, i, j) for j in range(order)]
        assert np.allclose(ours, theirs, rtol=1e-6, atol=1e-9), (i, ours, theirs)
    # the weights of a step integrate the constant 1 exactly: they sum to σ_{i+1} - σ_i
    assert math.isclose(sum(lms_coefficients(sigmas, 5, 4)), sigmas[6] - sigmas[5], rel_tol=1e-9)


def test_churn_is_seeded_and_off_by_default():
    sigmas = discrete_sigmas(SCHEDULE, 6, "leading")
    denoiser = Denoiser(SmoothEpsNet(), SCHEDULE, "eps")
    _, x = start_noise(float(sigmas[0]))
    for sampler in (sample_euler, sample_heun):
        plain = sampler(denoiser, x, sigmas)
        g = torch.Generator().manual_seed(0)
        assert torch.equal(sampler(denoiser, x, sigmas, s_churn=0.0, generator=g), plain)
        assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
        a = sampler(denoiser, x, sigmas, s_churn=5.0, s_noise=1.003, generator=torch.Generator().manual_seed(1))
        b = sampler(denoiser, x, sigmas, s_churn=5.0, s_noise=1.003, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and max_diff(a, plain) > 1e-3
        with pytest.raises(NoisecraftError):
            sampler(denoiser, x, sigmas, s_churn=-1.0)
    # eta = 0 turns Euler a into Euler
    assert max_diff(sample_euler_ancestral(denoiser, x, sigmas, eta=0.0), sample_euler(denoiser, x, sigmas)) < 1e-6


def test_euler_ancestral_is_ddpm_ancestral_step():
    """With η = 1 the step x̂0 + σ_down·ε̂ + σ_up·z is DDIM's η = 1 step, which is DDPM's posterior step
    (σ_up² = σ_next²(σ² - σ_next²)/σ² is β̃ on the σ scale): same generator, same samples."""
    sigmas = discrete_sigmas(SCHEDULE, 8, "leading")
    denoiser = Denoiser(SmoothEpsNet(), SCHEDULE, "eps")
    _, x = start_noise(float(sigmas[0]))
    a = sample_euler_ancestral(denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
    b = SAMPLERS["ddpm"](denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
    assert max_diff(a, b) < 1e-5, max_diff(a, b)


# --- every sampler, by name ---------------------------------------------------------------------


def tiny_denoiser():
    return Denoiser(SmoothEpsNet(), SCHEDULE, "eps")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("karras", [False, True])
def test_every_sampler_runs(name, karras):
    seen = []
    x = generate(tiny_denoiser(), SHAPE, sampler=name, steps=4, karras=karras, seed=3, callback=seen.append)
    assert x.shape == SHAPE and bool(torch.isfinite(x).all())
    assert 0.05 < float(x.abs().max()) < 100  # 4 steps from σ_max = 157: rough, but no blow-up
    assert [d["i"] for d in seen] == [0, 1, 2, 3] and seen[-1]["sigma_next"] == 0
    again = generate(tiny_denoiser(), SHAPE, sampler=name, steps=4, karras=karras, seed=3)
    assert torch.equal(x, again)  # same seed, same samples


@pytest.mark.parametrize("name, options", [("euler_ancestral", {}), ("dpmpp_2m_sde", {}), ("ddpm", {}),
                                           ("ddim", {"eta": 1.0}), ("euler", {"s_churn": 2.0})])
def test_seed_gives_same_sample_whatever_the_batch(name, options):
    batch = generate(tiny_denoiser(), (3, 3, 8, 8), sampler=name, steps=5, seed=10, **options)
    alone = generate(tiny_denoiser(), (1, 3, 8, 8), sampler=name, steps=5, seed=11, **options)
    assert max_diff(batch[1:2], alone) < 1e-5
    other = generate(tiny_denoiser(), (1, 3, 8, 8), sampler=name, steps=5, seed=12, **options)
    assert max_diff(alone, other) > 1e-2  # the seed matters


def test_aliases():
    assert resolve_sampler("Euler a") == ("euler_ancestral", False)
    assert resolve_sampler("DPM++ 2M") == ("dpmpp_2m", False)
    assert resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", True)
    assert resolve_sampler("  dpm++  2m   sde karras ") == ("dpmpp_2m_sde", True)
    assert resolve_sampler("LMS Karras") == ("lms", True)
    assert resolve_sampler("Heun") == ("heun", False)
    assert get_sampler("Euler a") is sample_euler_ancestral and get_sampler("DPM++ 2M Karras") is sample_dpmpp_2m
    assert all(target in SAMPLERS for target in ALIASES.values())
    den = tiny_denoiser()
    by_alias = generate(den, SHAPE, sampler="DPM++ 2M Karras", steps=4, seed=0)
    by_flag = generate(den, SHAPE, sampler="dpmpp_2m", steps=4, seed=0, karras=True)
    plain = generate(den, SHAPE, sampler="dpmpp_2m", steps=4, seed=0)
    assert torch.equal(by_alias, by_flag) and max_diff(by_alias, plain) > 1e-4


def test_unknown_sampler_and_option():
    with pytest.raises(NoisecraftError, match="unknown sampler 'nope'.*dpmpp_2m.*Euler a"):
        get_sampler("nope")
    with pytest.raises(NoisecraftError, match="unknown sampler 'Euler b'"):
        generate(tiny_denoiser(), SHAPE, sampler="Euler b", steps=2)
    with pytest.raises(NoisecraftError, match="takes no option 'variance'"):
        generate(tiny_denoiser(), SHAPE, sampler="euler", steps=2, variance="small")


def test_cli_parses_karras_and_lists_samplers(capsys):
    parser = build_parser()
    args = parser.parse_args(["sample", "run", "--sampler", "DPM++ 2M", "--karras", "--out", "x.npz"])
    assert args.karras and args.sampler == "DPM++ 2M"
    assert not parser.parse_args(["sample", "run"]).karras
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--help"])
    help_text = capsys.readouterr().out
    for name in list(SAMPLERS) + ["Euler a", "DPM++ 2M Karras"]:
        assert name in help_text, name
