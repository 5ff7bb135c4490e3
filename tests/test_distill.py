"""Progressive distillation (training/distill.py): the nested σ grids, the target, the per-sample ODE step against
the samplers, refusals, the students as runs, and that a student learns its teacher's two steps."""

from __future__ import annotations

import pytest
import torch

from noisecraft.cli import main
from noisecraft.config import load_run_config
from noisecraft.errors import NoisecraftError
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.samplers import generate
from noisecraft.samplers.euler import edm_sampler
from noisecraft.samplers.steps import nested_sigmas
from noisecraft.training.distill import Distiller, distillation_target, ode_step
from noisecraft.training.trainer import Trainer

from test_edm import tiny_edm_config


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory, few_digits):
    out = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(tiny_edm_config(steps=30, conditional=True), few_digits, out, progress=False).fit()
    return out


def test_nested_sigmas_halve_into_each_other():
    fine, coarse = nested_sigmas(0.002, 80.0, 16), nested_sigmas(0.002, 80.0, 8)
    assert len(fine) == 17 and float(fine[0]) == 80.0 and float(fine[-1]) == 0.0
    torch.testing.assert_close(fine[::2], coarse, rtol=1e-12, atol=0)
    assert nested_sigmas(0.002, 80.0, 1).tolist() == [80.0, 0.0]
    assert bool((fine[:-1][1:] < fine[:-1][:-1]).all())


def test_target_makes_one_euler_step_land_on_the_teacher():
    z, z_next = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    sigma, sigma_next = torch.tensor([5.0, 1.0, 0.3], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.1],
                                                                                       dtype=torch.float64)
    target = distillation_target(z, z_next, sigma, sigma_next)
    s, sn = sigma.float().reshape(-1, 1, 1, 1), sigma_next.float().reshape(-1, 1, 1, 1)
    euler = z + (sn - s) * (z - target) / s          # dx/dσ = (x - D)/σ with D = x̃
    torch.testing.assert_close(euler, z_next, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heun", [False, True])
def test_per_sample_ode_step_equals_the_sampler(edm_run, heun):
    pipe = DiffusionPipeline.from_run(edm_run)
    d, x = pipe.denoiser, torch.randn(3, 1, 16, 16)
    cond = torch.tensor([1, 2, 3])
    sigmas = torch.tensor([7.0, 0.8, 0.0], dtype=torch.float64)
    want = edm_sampler(d, x, sigmas, cond=cond, generator=None, callback=None, s_churn=0.0, s_tmin=0.0,
                       s_tmax=float("inf"), s_noise=1.0, heun=heun)
    got = x
    for a, b in ((0, 1), (1, 2)):
        got = ode_step(d, got, sigmas[a].expand(3), sigmas[b].expand(3), cond, heun=heun)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_refusals(edm_run, few_digits, tmp_path):
    with pytest.raises(NoisecraftError, match="powers of two"):
        Distiller(edm_run, few_digits, tmp_path / "a", steps=3, teacher_steps=16)
    eps_run = tmp_path / "eps"
    assert main(["train", "--dataset", "digits", "--steps", "1", "--base-channels", "8", "--out", str(eps_run)]) == 0
    with pytest.raises(NoisecraftError, match="preconditioning edm"):
        Distiller(eps_run, few_digits, tmp_path / "b")


def test_a_student_learns_two_teacher_steps_in_one(edm_run, few_digits, tmp_path):
    out = tmp_path / "fast"
    students = Distiller(edm_run, few_digits, out, steps=1, teacher_steps=2, iterations=80, lr=1e-3,
                         batch_size=32, ema_decay=0.0).distill()
    assert students == [out / "steps-1"] and (out / "distill.csv").exists()
    config = load_run_config(out / "steps-1")
    assert config.distillation.steps == 1 and config.distillation.teacher == str(edm_run)

    teacher, student = DiffusionPipeline.from_run(edm_run), DiffusionPipeline.from_run(out / "steps-1")
    assert (student.defaults.sampler, student.defaults.steps, student.defaults.spacing) == ("dpmpp_2m", 1, "nested")
    z = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(32) % 10
    kw = dict(cond=labels, noise=z, spacing="nested")
    two_heun = generate(teacher.denoiser, z.shape, sampler="heun", steps=2, **kw)
    one_euler = generate(teacher.denoiser, z.shape, sampler="euler", steps=1, **kw)   # the student before training
    one_student = generate(student.denoiser, z.shape, sampler="euler", steps=1, **kw)
    before = (one_euler - two_heun).pow(2).mean()
    after = (one_student - two_heun).pow(2).mean()
    assert after < 0.7 * before, (float(before), float(after))
    # the default DPM++ 2M takes the Euler steps the student was trained on at 1 and 2 steps (its first step and its
    # last, to σ = 0, are first order); float32: two algebraically equal updates round differently, and at 2 steps
    # the network sees the rounded x of step 1 (measured ≤ 2.3e-5 on pixels ≤ ~1): atol 1e-4
    for steps, model in ((1, student), (2, teacher)):
        euler = generate(model.denoiser, z.shape, sampler="euler", steps=steps, **kw)
        dpmpp = generate(model.denoiser, z.shape, sampler="dpmpp_2m", steps=steps, **kw)
        torch.testing.assert_close(dpmpp, euler, rtol=0, atol=1e-4)
    three = [generate(teacher.denoiser, z.shape, sampler=name, steps=3, **kw) for name in ("euler", "dpmpp_2m")]
    assert not torch.allclose(*three, atol=1e-3)          # from 3 steps on the multistep correction acts


def test_distill_command_writes_runs_that_sample(edm_run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["distill", str(edm_run), "--out", str(out), "--teacher-steps", "4", "--steps", "1",
                 "--iterations", "2", "--batch-size", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["distill.csv", "steps-1", "steps-2"]
    assert main(["sample", str(out / "steps-2"), "--n", "2", "--label", "4", "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["distill", str(edm_run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
