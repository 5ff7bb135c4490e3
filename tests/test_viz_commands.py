"""The guide's `noisecraft viz` subcommands: forward of any image (and of its latent through a VAE or an SD model),
the σ a sampler visits per step (checked against diffusers' LMS scheduler), one denoising step, and latents from an
SD model. Tiny random models: the pictures prove the code runs, nothing more."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.cli import main


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("viz") / "colour.png"
    x = np.zeros((40, 56, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, 56)[None]
    x[8:30, 10:40, 2] = 230
    Image.fromarray(x).save(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from test_guidance import write_run

    return write_run(tmp_path_factory.mktemp("viz") / "run")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tiny_sd import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("viz") / "tiny-sd"
    save_tiny_pipeline(folder)
    return folder


def _size(path):
    with Image.open(path) as im:
        return im.size


def test_viz_sigmas_is_sds_lms_schedule(tmp_path, capsys):
    """`viz sigmas --sampler lms --steps 51`: SD's scaled_linear schedule at linspace spacing, the σ values of
    diffusers' LMSDiscreteScheduler.set_timesteps(51) (the tutorials' plot) within 0.2%: diffusers interpolates σ
    at fractional timesteps, noisecraft visits the nearest integer timestep (the ones the network was trained on)."""
    out = tmp_path / "sigmas.png"
    assert main(["viz", "sigmas", "--sampler", "lms", "--steps", "51", "--out", str(out)]) == 0
    assert out.is_file() and _size(out)[0] > 300
    values = np.array([float(v) for v in capsys.readouterr().out.splitlines()[1].split()])
    assert len(values) == 52 and values[-1] == 0
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="linspace")
    ref.set_timesteps(51)
    np.testing.assert_allclose(values, ref.sigmas.numpy(), rtol=2e-3, atol=1e-4)


def test_viz_sigmas_of_a_model_and_karras(run, tmp_path, capsys):
    assert main(["viz", "sigmas", "--model", str(run), "--steps", "8", "--out", str(tmp_path / "a.png")]) == 0
    assert len(capsys.readouterr().out.splitlines()[1].split()) == 9
    assert main(["viz", "sigmas", "--sampler", "DPM++ 2M Karras", "--steps", "10", "--out", str(tmp_path / "k.png")]) == 0
    assert (tmp_path / "k.png").is_file()


def test_viz_forward_of_any_image(image, tmp_path):
    out = tmp_path / "forward.png"
    assert main(["viz", "forward", "--input", str(image), "--t", "0", "500", "999", "--out", str(out)]) == 0
    w, h = _size(out)
    assert w > 4 * 56 and h >= 40


def test_viz_forward_of_a_latent_through_sd(image, sd, tmp_path, capsys):
    out = tmp_path / "forward_latent.png"
    assert main(["viz", "forward", "--input", str(image), "--latent", str(sd), "--t", "0", "400", "999",
                 "--out", str(out)]) == 0
    assert out.is_file()
    assert "z = 0.18215" in capsys.readouterr().out


def test_viz_denoise_step(run, image, tmp_path, capsys):
    out = tmp_path / "step.png"
    assert main(["viz", "denoise-step", str(run), "--input", str(image), "--t", "40", "--out", str(out)]) == 0
    assert out.is_file()
    assert "t=40" in capsys.readouterr().out


def test_denoise_step_identities(run):
    """x_t is q(x_t | x0) with the noise returned, and x̂0 = (x_t − sqrt(1−ᾱ) ε̂) / sqrt(ᾱ)."""
    from noisecraft.commands.viz_tutorial import denoise_step
    from noisecraft.pipelines.diffusion import DiffusionPipeline

    pipe = DiffusionPipeline.from_run(run)
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    r = denoise_step(pipe, x0, 40, seed=3)
    ab = r["alpha_bar"]
    torch.testing.assert_close(r["xt"], ab ** 0.5 * x0 + (1 - ab) ** 0.5 * r["noise"])
    torch.testing.assert_close(r["x0_hat"], (r["xt"] - (1 - ab) ** 0.5 * r["eps_hat"]) / ab ** 0.5, atol=1e-4, rtol=1e-4)
    again = denoise_step(pipe, x0, 40, seed=3)
    assert torch.equal(again["eps_hat"], r["eps_hat"])


def test_viz_denoise_step_and_latents_on_tiny_sd(sd, image, tmp_path):
    out = tmp_path / "sd_step.png"
    assert main(["viz", "denoise-step", str(sd), "--input", str(image), "--t", "40", "--prompt", "a photo",
                 "--out", str(out)]) == 0
    assert out.is_file()
    lat = tmp_path / "latents.png"
    assert main(["viz", "latents", str(image), "--vae", str(sd), "--out", str(lat)]) == 0
    assert lat.is_file()


@pytest.mark.parametrize("argv, words", [
    (["viz", "sigmas", "somewhere"], "--model"),
    (["viz", "denoise-step"], "needs a model"),
    (["viz", "forward", "--latent", "x"], "--input"),
    (["viz", "sigmas", "--sampler", "nope"], "unknown sampler"),
])
def test_viz_errors_are_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
