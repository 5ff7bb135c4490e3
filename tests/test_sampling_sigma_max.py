"""Where Karras and nested σ grids start (diffusion.sampling_sigma_max): at min(σ(T), 80) for our own runs, at σ(T)
for imported diffusers models (as diffusers draws them), never changing the likelihood's prior or any timestep
spacing; and a distilled student is trained on the very grid it is sampled on."""

from __future__ import annotations

import pytest
import torch

from noisecraft.cli import main
from noisecraft.config import DiffusionConfig, RunConfig, load_run_config
from noisecraft.denoiser import Denoiser
from noisecraft.errors import NoisecraftError
from noisecraft.likelihood_ode import _sigma_range
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.pipelines.stable_diffusion import diffusion_config_from_scheduler
from noisecraft.samplers import generate
from noisecraft.samplers.steps import discrete_sigmas, karras_sigmas, nested_sigmas


def recording_sampler(record):
    """A sampler function that keeps the σ list it was handed and returns x unchanged."""
    def sampler(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
        record.append(sigmas)
        return x
    return sampler


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cosine") / "run"
    assert main(["train", "--dataset", "digits", "--steps", "1", "--base-channels", "8", "--out", str(out)]) == 0
    return out


def test_our_cosine_run_starts_karras_and_nested_grids_at_80(cosine_run, monkeypatch):
    pipe = DiffusionPipeline.from_run(cosine_run)
    schedule = pipe.schedule
    assert schedule.sigma_max > 1e4                       # the clipped cosine β: σ(T) ≈ 20,000 at T = 1000
    assert pipe.config.diffusion.sampling_sigma_max == 80.0 and pipe.denoiser.sigma_max == 80.0
    seen = []
    monkeypatch.setitem(__import__("noisecraft.samplers", fromlist=["SAMPLERS"]).SAMPLERS, "euler",
                        recording_sampler(seen))
    for spacing, make in (("karras", karras_sigmas), ("nested", nested_sigmas)):
        generate(pipe.denoiser, (1, 1, 8, 8), sampler="euler", steps=4, spacing=spacing)
        torch.testing.assert_close(seen[-1], make(schedule.sigma_min, 80.0, 4), rtol=0, atol=0)
    generate(pipe.denoiser, (1, 1, 8, 8), sampler="euler karras", steps=4)
    assert float(seen[-1][0]) == 80.0
    generate(pipe.denoiser, (1, 1, 8, 8), sampler="euler", steps=4, spacing="trailing")   # timesteps: unchanged
    torch.testing.assert_close(seen[-1], discrete_sigmas(schedule, 4, "trailing"), rtol=0, atol=0)
    assert float(seen[-1][0]) == pytest.approx(schedule.sigma_max)
    # the likelihood integrates the whole process, to the prior at σ(T)
    assert _sigma_range(pipe.denoiser, None, None) == (schedule.sigma_min, schedule.sigma_max)


def test_cap_is_off_where_it_does_not_apply():
    cosine = DiffusionConfig(schedule="cosine").make_schedule()
    net = torch.nn.Identity()
    assert Denoiser(net, cosine).sigma_max == cosine.sigma_max                       # no cap given: σ(T)
    assert Denoiser(net, cosine, sigma_max_cap=1e6).sigma_max == cosine.sigma_max    # a cap above σ(T): σ(T)
    assert Denoiser(net, cosine, sigma_max_cap=10.0).sigma_max == 10.0
    # a diffusers model keeps diffusers' Karras grid, which starts at σ(T)
    imported = diffusion_config_from_scheduler({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
                                               "scheduler_config.json")
    assert imported.sampling_sigma_max is None


def test_old_configs_get_the_cap_and_bad_values_are_refused(cosine_run):
    config = load_run_config(cosine_run).to_dict()
    del config["diffusion"]["sampling_sigma_max"]                    # a run written before the field existed
    assert RunConfig.from_dict(config).diffusion.sampling_sigma_max == 80.0
    config["diffusion"]["sampling_sigma_max"] = -1.0
    with pytest.raises(NoisecraftError, match="sampling_sigma_max"):
        RunConfig.from_dict(config)


def test_a_student_is_trained_on_the_grid_it_is_sampled_on(tmp_path, few_digits, monkeypatch):
    from noisecraft.training.distill import Distiller

    run = tmp_path / "v"
    assert main(["train", "--dataset", "digits", "--steps", "1", "--base-channels", "8", "--prediction", "v",
                 "--out", str(run)]) == 0
    grids, original = [], Distiller.stage_loss

    def recording(self, student, teacher, grid, heun):
        grids.append(grid)
        return original(self, student, teacher, grid, heun)

    monkeypatch.setattr(Distiller, "stage_loss", recording)
    (student_dir,) = Distiller(run, few_digits, tmp_path / "fast", steps=1, teacher_steps=2, iterations=1,
                               batch_size=4).distill()
    student = DiffusionPipeline.from_run(student_dir)
    sampled = discrete_sigmas(student.schedule, 2, "nested", student.denoiser.sigma_max)
    torch.testing.assert_close(grids[0], sampled, rtol=0, atol=0)
    assert float(grids[0][0]) == 80.0
