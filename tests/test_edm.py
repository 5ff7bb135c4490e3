"""EDM preconditioning (Karras et al. 2022): the table row, the loss and its weight, the σ's, parity with diffusers'
EDM scheduler, training and exact resume, and every sampler, guidance, editing and likelihood tool on an EDM run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from noisecraft.cli import main
from noisecraft.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig, make_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.denoiser import EDM_NOISE_SCALE, Denoiser, parameterisation
from noisecraft.errors import NoisecraftError
from noisecraft.likelihood import model_posterior, vlb_bits_per_dim
from noisecraft.likelihood_ode import ode_bits_per_dim
from noisecraft.losses import edm_loss, edm_loss_weight, edm_sigmas
from noisecraft.models.unet import UNetConfig
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.samplers import SAMPLERS, generate
from noisecraft.samplers.steps import discrete_sigmas, karras_sigmas
from noisecraft.schedule import EDM_SIGMA_MAX, EDM_SIGMA_MIN, NoiseSchedule
from noisecraft.training.trainer import Trainer, resume_trainer

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.3, 80.0], dtype=torch.float64)


class ToyNet(nn.Module):
    """A smooth function of (x, time input): enough to compare code paths exactly."""

    def __init__(self, channels=1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.config = None
        torch.manual_seed(0)
        nn.init.normal_(self.conv.weight, std=0.3)

    def forward(self, x, t, cond=None):
        return torch.tanh(self.conv(x)) + 0.01 * t.float().reshape(-1, 1, 1, 1)


def tiny_edm_config(steps=6, conditional=False, **train):
    model = UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       head_dim=8, groups=4, num_classes=10 if conditional else 0)
    train_kw = dict(batch_size=16, lr=2e-3, warmup_steps=2, ema_decay=0.9, steps=steps, sample_every=0,
                    checkpoint_every=0, log_every=0, seed=3) | train
    return RunConfig(model=model, diffusion=DiffusionConfig(schedule="edm", prediction="edm", min_snr_gamma=None),
                     train=TrainConfig(**train_kw),
                     data=DataConfig(dataset="digits", image_shape=(1, 16, 16),
                                     class_names=[str(i) for i in range(10)], conditional=conditional))


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory, few_digits):
    out = tmp_path_factory.mktemp("edm") / "run"
    Trainer(tiny_edm_config(steps=8, conditional=True), few_digits, out, progress=False).fit()
    return out


# ------------------------------------------------------------------------------- the row and the loss


def test_edm_row_is_karras_table_1():
    row = parameterisation("edm", 0.5)
    s = SIGMAS
    assert torch.allclose(row.c_skip(s), 0.25 / (s**2 + 0.25), rtol=1e-15, atol=0)
    assert torch.allclose(row.c_out(s), s * 0.5 / (s**2 + 0.25).sqrt(), rtol=1e-15)
    assert torch.allclose(row.c_in(s), 1 / (s**2 + 0.25).sqrt(), rtol=1e-15)
    assert torch.allclose(row.c_noise(s), EDM_NOISE_SCALE * s.log() / 4, rtol=1e-15)
    # F = F* gives D = x0 at every σ (eq. 7-8), and the effective weight λ(σ)·c_out² is 1 (Table 1).
    x0, noise = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    x = x0 + s.reshape(-1, 1, 1, 1) * noise
    assert torch.allclose(row.denoise(x, row.target(x0, noise, s), s), x0, atol=1e-12)
    assert torch.allclose(edm_loss_weight(s, 0.5) * row.x0_error_scale(s), torch.ones_like(s), rtol=1e-12)


def test_edm_scalings_match_diffusers():
    from diffusers import EDMEulerScheduler
    ref = EDMEulerScheduler(sigma_data=0.5)
    x, out = torch.randn(len(SIGMAS), 1, 3, 3), torch.randn(len(SIGMAS), 1, 3, 3)
    row = parameterisation("edm", 0.5)
    for i, sigma in enumerate(SIGMAS.float()):
        c_skip, c_out, c_in = row.scalings(SIGMAS[i:i + 1], x[i:i + 1])
        torch.testing.assert_close(c_in * x[i:i + 1], ref.precondition_inputs(x[i:i + 1], sigma))
        torch.testing.assert_close(c_skip * x[i:i + 1] + c_out * out[i:i + 1],
                                   ref.precondition_outputs(x[i:i + 1], out[i:i + 1], sigma))
        torch.testing.assert_close(row.noise_input(SIGMAS[i:i + 1], None) / EDM_NOISE_SCALE,
                                   ref.precondition_noise(sigma).float().reshape(1))


def test_edm_loss_is_lambda_weighted_denoising_error():
    net = ToyNet()
    x0, noise = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    loss = edm_loss(net, x0, SIGMAS, noise)
    denoiser = Denoiser(net, NoiseSchedule.create("edm", 1000), "edm")
    x = x0 + SIGMAS.float().reshape(-1, 1, 1, 1) * noise
    d = denoiser(x, SIGMAS)
    want = edm_loss_weight(SIGMAS).float() * (d - x0).pow(2).flatten(1).mean(1)   # eq. 2 with Table 1's λ
    torch.testing.assert_close(loss, want, rtol=2e-4, atol=1e-6)


def test_log_normal_sigmas():
    g = torch.Generator().manual_seed(0)
    log_sigma = edm_sigmas(200_000, g).log()
    assert abs(float(log_sigma.mean()) + 1.2) < 0.01 and abs(float(log_sigma.std()) - 1.2) < 0.01


def test_edm_schedule_spans_edm_sigmas():
    schedule = NoiseSchedule.create("edm", 1000)
    assert math.isclose(schedule.sigma_min, EDM_SIGMA_MIN, rel_tol=1e-9)
    assert math.isclose(schedule.sigma_max, EDM_SIGMA_MAX, rel_tol=1e-9)
    # the T levels are EDM's eq. 5 with ρ = 7, and the "karras" spacing of N steps is karras_sigmas
    want = karras_sigmas(EDM_SIGMA_MIN, EDM_SIGMA_MAX, 1000)[:-1].flip(0)
    torch.testing.assert_close(schedule.sigmas, want, rtol=1e-7, atol=0)
    torch.testing.assert_close(discrete_sigmas(schedule, 18, "karras"), karras_sigmas(schedule.sigma_min,
                                                                                      schedule.sigma_max, 18))


def test_euler_on_karras_sigmas_matches_diffusers_edm_euler():
    from diffusers import EDMEulerScheduler
    net = ToyNet()
    schedule = NoiseSchedule.create("edm", 1000)
    denoiser = Denoiser(net, schedule, "edm")
    steps = 12
    ref = EDMEulerScheduler(sigma_data=0.5)
    ref.set_timesteps(steps)
    ours_sigmas = discrete_sigmas(schedule, steps, "karras")
    torch.testing.assert_close(ref.sigmas.double(), ours_sigmas, rtol=1e-5, atol=1e-7)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = generate(denoiser, (2, 1, 8, 8), sampler="euler", steps=steps, spacing="karras", noise=z)
    sample = z * ref.init_noise_sigma
    for t in ref.timesteps:
        sigma = ref.sigmas[ref.step_index if ref.step_index is not None else 0]
        out = net(ref.scale_model_input(sample, t), EDM_NOISE_SCALE * ref.precondition_noise(sigma).expand(2))
        sample = ref.step(out, t, sample).prev_sample
    torch.testing.assert_close(ours, sample, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- config and CLI


def test_config_refuses_what_edm_replaces():
    with pytest.raises(NoisecraftError, match="min_snr_gamma"):
        DiffusionConfig(schedule="edm", prediction="edm", min_snr_gamma=5.0)
    with pytest.raises(NoisecraftError, match="schedule"):
        DiffusionConfig(schedule="cosine", prediction="edm", min_snr_gamma=None)
    digits = load_dataset("digits", split="train")
    config = make_run_config(digits, diffusion={"prediction": "edm"}, train={"steps": 1})
    assert (config.diffusion.schedule, config.diffusion.min_snr_gamma, config.diffusion.sigma_data) == ("edm", None, 0.5)


def test_cli_preconditioning_flag(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--preconditioning", "edm", "--prediction", "v", "--steps", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "drop --prediction v" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--preconditioning", "edm", "--steps", "2", "--base-channels", "8",
                 "--out", str(tmp_path / "run")]) == 0
    pipe = DiffusionPipeline.from_run(tmp_path / "run")
    assert pipe.config.diffusion.prediction == "edm"
    assert (pipe.defaults.sampler, pipe.defaults.spacing) == ("heun", "karras")
    import numpy as np
    for name, extra in (("plain", []), ("churn", ["--s-churn", "40"])):
        assert main(["sample", str(tmp_path / "run"), "--n", "2", "--out", str(tmp_path / f"{name}.npz")] + extra) == 0
    plain, churned = (np.load(tmp_path / f"{n}.npz")["images"] for n in ("plain", "churn"))
    assert plain.shape == churned.shape and not np.array_equal(plain, churned)


def test_cli_preconditioning_vp_and_edm_prediction_clash(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--preconditioning", "vp", "--prediction", "edm", "--steps", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "drop --preconditioning vp" in capsys.readouterr().err


# ------------------------------------------------------------------------------- training


def test_edm_training_learns_and_resumes_exactly(few_digits, tmp_path):
    straight = Trainer(tiny_edm_config(steps=6), few_digits, tmp_path / "straight", progress=False)
    summary = straight.fit()
    assert math.isfinite(summary["loss"])
    first = Trainer(tiny_edm_config(steps=3), few_digits, tmp_path / "resumed", progress=False)
    first.fit()
    second = resume_trainer(tmp_path / "resumed", few_digits, progress=False, steps=6)
    second.fit()
    for a, b in zip(straight.ema.state_dict().values(), second.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_edm_loss_falls(few_digits, tmp_path):
    trainer = Trainer(tiny_edm_config(steps=40, lr=3e-3), few_digits, tmp_path / "run", progress=False)
    losses = [trainer.train_step() for _ in range(40)]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:3]) / 3


# ------------------------------------------------------------------------------- every tool on an EDM run


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_on_an_edm_run(edm_run, sampler):
    pipe = DiffusionPipeline.from_run(edm_run)
    steps = 4 if sampler not in ("langevin", "pc") else 2
    images = pipe.sample(2, sampler=sampler, steps=steps, seed=0, label=3, guidance=2.0).images
    assert images.shape == (2, 1, 16, 16) and bool(torch.isfinite(images).all())


def test_editing_and_guidance_on_an_edm_run(edm_run, few_digits):
    pipe = DiffusionPipeline.from_run(edm_run)
    images = few_digits.images[:2].float() / 127.5 - 1
    out = pipe.img2img(images, strength=0.5, seed=0, label=1).images
    assert out.shape == images.shape and bool(torch.isfinite(out).all())
    mask = torch.zeros_like(images)
    mask[..., 8:] = 1
    painted = pipe.inpaint(images, mask, seed=0, label=1).images
    assert torch.allclose(painted[..., :8], images[..., :8], atol=0.05)   # the kept half stays
    from noisecraft.guidance.objectives import brightness
    plain = pipe.sample(2, seed=0, label=1).images
    guided = pipe.sample(2, seed=0, label=1, guide=brightness, guide_scale=50.0).images
    assert bool(torch.isfinite(guided).all()) and not torch.equal(guided, plain)


def test_the_bound_reads_x0_through_the_edm_row(edm_run, few_digits):
    pipe = DiffusionPipeline.from_run(edm_run)
    d = pipe.denoiser
    x0 = few_digits.images[:3].float() / 127.5 - 1
    t = torch.tensor([5, 300, 990])
    x_t = d.schedule.q_sample(x0, t, torch.randn_like(x0))
    sigma = d.schedule.sigmas[t]
    labels = torch.tensor([1, 2, 3])
    _, _, x0_hat = model_posterior(d, d.schedule, x_t, t, cond=labels)
    want = d(x_t / d.schedule.sqrt_alphas_cumprod[t].float().reshape(-1, 1, 1, 1), sigma, labels)
    torch.testing.assert_close(x0_hat, want, rtol=1e-4, atol=1e-5)
    bound = vlb_bits_per_dim(d, d.schedule, x0, cond=labels, timesteps=8)
    assert math.isfinite(bound["mean"]) and bound["mean"] > 0
    ode = ode_bits_per_dim(d, few_digits.images[:2], cond=labels[:2], rtol=1e-3, atol=1e-3)
    assert math.isfinite(float(ode["mean"]))


def test_defaults_are_the_tables_values_bit_for_bit(edm_run):
    pipe = DiffusionPipeline.from_run(edm_run)
    plain = pipe.sample(2, seed=4, label=2).images
    spelled = pipe.sample(2, seed=4, label=2, sampler="heun", steps=10, spacing="karras", guidance=1.0).images
    assert torch.equal(plain, spelled)


def test_latent_text_run_with_edm_trains_samples_and_distils(tmp_path):
    from tiny_runs import train_tiny_vae_and_clip
    vae, clip = train_tiny_vae_and_clip(tmp_path)
    run = tmp_path / "ldm"
    assert main(["train", "--dataset", "digits", "--latent", str(vae), "--text-encoder", str(clip),
                 "--preconditioning", "edm", "--steps", "2", "--base-channels", "8", "--batch-size", "8",
                 "--out", str(run)]) == 0
    pipe = DiffusionPipeline.from_run(run)
    d = pipe.config.diffusion
    assert (d.prediction, d.sigma_data, d.p_mean) == ("edm", 1.0, round(-1.2 + math.log(2), 4))
    assert (pipe.defaults.sampler, pipe.defaults.steps, pipe.defaults.guidance) == ("heun", 15, 4.0)
    images = pipe.sample(2, prompt="a seven", steps=3, seed=0).images
    assert images.shape == (2, 1, 16, 16) and bool(torch.isfinite(images).all())
    assert main(["distill", str(run), "--out", str(tmp_path / "fast"), "--teacher-steps", "2", "--iterations", "2",
                 "--batch-size", "4"]) == 0
    student = DiffusionPipeline.from_run(tmp_path / "fast" / "steps-1")
    assert bool(torch.isfinite(student.sample(2, prompt="a seven", seed=0).images).all())
