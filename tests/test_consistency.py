"""Consistency distillation (training/consistency.py), the consistency function (denoiser.py) and multistep
consistency sampling (samplers/consistency.py): the boundary condition, the sampler against diffusers'
CMStochasticIterativeScheduler, the metrics, refusals, and that a student learns to jump along its teacher's ODE."""

from __future__ import annotations

import pytest
import torch

from noisecraft.cli import main
from noisecraft.config import load_run_config
from noisecraft.denoiser import ConsistencyFunction
from noisecraft.errors import NoisecraftError
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.samplers.consistency import sample_consistency
from noisecraft.samplers.steps import nested_sigmas
from noisecraft.training.consistency import ConsistencyDistiller, consistency_metric
from noisecraft.training.distill import ode_step
from noisecraft.training.trainer import Trainer

from test_edm import tiny_edm_config


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory, few_digits):
    out = tmp_path_factory.mktemp("cm-teacher") / "run"
    Trainer(tiny_edm_config(steps=30, conditional=True), few_digits, out, progress=False).fit()
    return out


def test_consistency_function_is_the_identity_at_sigma_min_and_the_denoiser_above(edm_run):
    d = DiffusionPipeline.from_run(edm_run).denoiser
    f = ConsistencyFunction(d)
    x, cond = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(f(x, d.sigma_min, cond), x, rtol=0, atol=0)   # c_skip(σ_min) = 1 exactly
    far = 100 * d.sigma_min
    assert not torch.allclose(d(x, d.sigma_min, cond), x, atol=1e-6)           # D alone is not the identity
    c = float(f.c_skip(torch.tensor(far, dtype=torch.float64)))
    assert 0 < c < 2e-4                                                       # 1/(99² + 1): f is D, nearly
    torch.testing.assert_close(f(x, far, cond), c * x + (1 - c) * d(x, far, cond), rtol=1e-5, atol=1e-5)
    assert (f.sigma_min, f.sigma_max, f.schedule) == (d.sigma_min, d.sigma_max, d.schedule)


def test_sampler_matches_diffusers_cm_stochastic_iterative_scheduler():
    """Algorithm 1 of Song et al. 2023 against diffusers' scheduler, on a made-up consistency model with the
    paper's own boundary scalings (EDM's c_in, c_skip and c_out shifted by σ_min) and the same noise draws."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.CMStochasticIterativeScheduler(clip_denoised=False)
    sigma_min, sigma_data = scheduler.config.sigma_min, scheduler.config.sigma_data
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    torch.manual_seed(0)

    def raw(x_scaled, t):          # any smooth function of the scaled input and the timestep
        return torch.tanh(net(x_scaled)) + 0.01 * t

    class PaperModel(torch.nn.Module):      # f(x, σ) written as the paper (and diffusers' step) computes it
        sigma_min = scheduler.config.sigma_min

        def forward(self, x, sigma, cond=None):
            s = float(sigma)
            c_skip = sigma_data**2 / ((s - sigma_min) ** 2 + sigma_data**2)
            c_out = (s - sigma_min) * sigma_data / (s**2 + sigma_data**2) ** 0.5
            t = 1000 * 0.25 * torch.log(torch.tensor(s + 1e-44, dtype=torch.float32))
            return c_skip * x + c_out * raw(x / (s**2 + sigma_data**2) ** 0.5, t)

    for steps in (1, 2, 4):
        scheduler.set_timesteps(steps)
        x_start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * scheduler.sigmas[0]
        with torch.no_grad():
            sample, g = x_start.clone(), torch.Generator().manual_seed(7)
            for t in scheduler.timesteps:
                out = raw(scheduler.scale_model_input(sample, t), t.to(torch.float32))
                sample = scheduler.step(out, t, sample, generator=g).prev_sample
            sigmas = torch.cat([scheduler.sigmas[:-1].double(), torch.zeros(1, dtype=torch.float64)])
            ours = sample_consistency(PaperModel(), x_start.clone(), sigmas, generator=torch.Generator().manual_seed(7))
        # float32 σ's in diffusers, float64 in ours: rounding only
        torch.testing.assert_close(ours, sample, rtol=1e-4, atol=1e-4)


def test_one_step_is_one_evaluation_at_sigma_max_and_more_steps_renoise(edm_run):
    f = ConsistencyFunction(DiffusionPipeline.from_run(edm_run).denoiser)
    z, cond = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([4, 5, 6])
    calls = []
    sigmas = nested_sigmas(f.sigma_min, f.sigma_max, 2)
    sample_consistency(f, z, sigmas, cond=cond, generator=torch.Generator().manual_seed(0),
                       callback=lambda s: calls.append(s["sigma"]))
    assert calls == [float(sigmas[0]), float(sigmas[1])]                 # one evaluation per step
    one = sample_consistency(f, z, sigmas[[0, -1]], cond=cond)
    torch.testing.assert_close(one, f(z, sigmas[0], cond))
    a, b = (sample_consistency(f, z, sigmas, cond=cond, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    assert not torch.allclose(a, b)                                       # the second step draws fresh noise


def test_metrics():
    a, b = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    b[0] += 1.0
    torch.testing.assert_close(consistency_metric(a, b, "l2"), torch.tensor([1.0, 0.0]))
    c = 0.00054 * 4.0                                                    # 0.00054·sqrt(16)
    huber = consistency_metric(a, b, "pseudo-huber")
    torch.testing.assert_close(huber, torch.tensor([(16 + c**2) ** 0.5 - c, 0.0]))


def test_refusals(edm_run, few_digits, tmp_path):
    with pytest.raises(NoisecraftError, match="metric"):
        ConsistencyDistiller(edm_run, few_digits, tmp_path / "a", metric="lpips")
    with pytest.raises(NoisecraftError, match="at least 2"):
        ConsistencyDistiller(edm_run, few_digits, tmp_path / "b", teacher_steps=1)
    with pytest.raises(NoisecraftError, match=r"decay μ"):
        ConsistencyDistiller(edm_run, few_digits, tmp_path / "c", target_decay=1.0)
    eps_run = tmp_path / "eps"
    assert main(["train", "--dataset", "digits", "--steps", "1", "--base-channels", "8", "--out", str(eps_run)]) == 0
    with pytest.raises(NoisecraftError, match="preconditioning edm"):
        ConsistencyDistiller(eps_run, few_digits, tmp_path / "d")


def test_a_student_learns_to_jump_along_its_teachers_ode(edm_run, few_digits, tmp_path):
    """After training, one student evaluation at σ lands nearer the teacher's ODE solution (16 Heun steps from σ)
    than the teacher's own one-evaluation guess D(x, σ), which is where the student started."""
    out = tmp_path / "cm"
    distiller = ConsistencyDistiller(edm_run, few_digits, out, steps=2, teacher_steps=6, iterations=150, lr=1e-3,
                                     batch_size=32, ema_decay=0.0, target_decay=0.0)
    assert distiller.distill() == [out / "consistency"] and (out / "distill.csv").exists()
    config = load_run_config(out / "consistency")
    assert (config.distillation.method, config.distillation.steps, config.distillation.teacher_steps) == \
        ("consistency", 2, 6)

    teacher, student = DiffusionPipeline.from_run(edm_run), DiffusionPipeline.from_run(out / "consistency")
    assert isinstance(student.denoiser, ConsistencyFunction)
    assert (student.defaults.sampler, student.defaults.steps, student.defaults.spacing) == ("consistency", 2, "nested")
    grid = distiller.grid(teacher.denoiser)
    x0, labels = few_digits.batch(torch.arange(32))
    sigma = grid[1].expand(32)                                   # a σ the student was trained at, below σ_max
    z = x0 + float(grid[1]) * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        solution, fine = z, nested_sigmas(teacher.denoiser.sigma_min, float(grid[1]), 16)
        for a, b in zip(fine[:-1], fine[1:]):
            solution = ode_step(teacher.denoiser, solution, a.expand(32), b.expand(32), labels, heun=True)
        before = (teacher.denoiser(z, sigma, labels) - solution).pow(2).mean()
        after = (student.denoiser(z, sigma, labels) - solution).pow(2).mean()
    assert after < 0.8 * before, (float(before), float(after))

    images = student.sample(4, steps=1, label=3, seed=0).images       # any step count, guidance as usual
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    guided = student.sample(4, steps=1, label=3, seed=0, guidance=3.0).images
    assert not torch.allclose(guided, images)
    # interpolation takes the one deterministic step, so its ends are the seeds' own 1-step pictures
    path = student.interpolate_seeds(0, 1, n=3, label=3).images
    ends = torch.cat([student.sample(1, steps=1, label=3, seed=s).images for s in (0, 1)])
    torch.testing.assert_close(path[[0, -1]], ends, rtol=0, atol=1e-4)   # slerp's ends round the noise slightly


def test_distill_command_writes_a_consistency_student_that_samples(edm_run, tmp_path):
    out = tmp_path / "cli"
    assert main(["distill", str(edm_run), "--out", str(out), "--method", "consistency", "--teacher-steps", "4",
                 "--iterations", "2", "--batch-size", "8", "--metric", "l2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["consistency", "distill.csv"]
    for steps in ("1", "3"):
        assert main(["sample", str(out / "consistency"), "--n", "2", "--steps", steps, "--label", "4",
                     "--out", str(tmp_path / f"s{steps}.npz")]) == 0
