"""Guidance and control: loss guidance, inpainting, img2img (SDEdit), seed/label interpolation, negative
labels, and their command lines.

Most checks use an analytic denoiser, exact for Gaussian data, so the expected numbers follow from the
equations; the rest use a tiny random U-Net written as a run directory (no training), which is enough
to exercise the real code paths end to end in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from noisecraft.cli import main
from noisecraft.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from noisecraft.denoiser import Denoiser
from noisecraft.errors import NoisecraftError
from noisecraft.guidance.inpainting import InpaintingDenoiser
from noisecraft.guidance.loss import LatentSteering, LossGuidance
from noisecraft.guidance.objectives import brightness, less_blue, match_reference
from noisecraft.io.checkpoint import save_json, save_weights
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.samplers import SAMPLERS, generate
from noisecraft.samplers.control import img2img, interpolate, lerp, slerp, strength_sigmas
from noisecraft.samplers.steps import discrete_sigmas
from noisecraft.schedule import NoiseSchedule

SHAPE = (1, 8, 8)


class GaussianDenoiser(nn.Module):
    """The exact denoiser for data x0 ~ N(0, s²·I): D(x, σ) = s²/(s² + σ²)·x (the posterior mean)."""

    def __init__(self, s: float = 0.5):
        super().__init__()
        self.s2 = s * s
        self.schedule = NoiseSchedule.create("linear", 1000)

    sigma_min = property(lambda self: self.schedule.sigma_min)
    sigma_max = property(lambda self: self.schedule.sigma_max)

    def forward(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *(1,) * (x.ndim - 1))
        return self.s2 / (self.s2 + sigma**2) * x


def tiny_unet(num_classes: int = 0, seed: int = 0) -> UNet:
    """A tiny random U-Net with its zero-initialised layers made random too (a fresh one predicts ε = 0
    everywhere and ignores its labels)."""
    torch.manual_seed(seed)
    net = UNet(UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                          attention_levels=(1,), num_classes=num_classes))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                nn.init.normal_(p, std=0.05)
    return net.eval()


def write_run(path: Path, num_classes: int = 0) -> Path:
    """A run directory (config.json + model.safetensors) for a tiny random U-Net on 16×16 digits."""
    net = tiny_unet(num_classes)
    config = RunConfig(model=net.config, diffusion=DiffusionConfig(), train=TrainConfig(steps=1),
                       data=DataConfig(dataset="digits", image_shape=(1, 16, 16),
                                       class_names=[str(i) for i in range(num_classes)],
                                       conditional=bool(num_classes)))
    path.mkdir(parents=True)
    save_json(config.to_dict(), path / "config.json")
    save_weights({k: v.contiguous() for k, v in net.state_dict().items()}, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("guidance") / "run")


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("guidance") / "cond", num_classes=10)


# ---------------------------------------------------------------- loss guidance


@pytest.mark.parametrize("mode", ["x0", "score"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "heun"])
def test_loss_guidance_lowers_the_loss_at_the_same_seed(mode, sampler):
    den = GaussianDenoiser()
    plain = generate(den, (6, *SHAPE), sampler=sampler, steps=12, seed=1)
    guided = generate(LossGuidance(den, brightness, scale=0.02, mode=mode), (6, *SHAPE), sampler=sampler,
                      steps=12, seed=1)
    assert brightness(guided).sum() < brightness(plain).sum() - 1.0
    assert torch.isfinite(guided).all()


def test_loss_guidance_equations_on_the_analytic_denoiser():
    """score: D - s·σ²·∇_x ℓ(D(x)) with ∂D/∂x = s²/(s²+σ²); x0: D - s·∇_{x̂0} ℓ. ∇ brightness = -1/C."""
    den, s, sigma = GaussianDenoiser(0.5), 0.3, 2.0
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    base = den(x, sigma)
    jac = 0.25 / (0.25 + sigma**2)
    score = LossGuidance(den, brightness, s, mode="score")(x, sigma)
    x0 = LossGuidance(den, brightness, s, mode="x0")(x, sigma)
    # float32: autograd through the analytic denoiser vs its closed form, values ≤ ~2 → a few ulps; atol 1e-6
    torch.testing.assert_close(score, base + s * sigma**2 * jac, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x0, base + s, rtol=1e-5, atol=1e-6)
    # per-sample σ works too
    sig = torch.tensor([0.5, 1.0, 2.0])
    out = LossGuidance(den, brightness, s, mode="x0")(x, sig)
    torch.testing.assert_close(out, den(x, sig) + s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "heun", "lms"])
def test_latent_steering_is_the_tutorials_recipe(sampler):
    """One step from σ to 0 with the move on: x' = x - k·σ²·∇ℓ(x̂0), then the step with the slope of the unmoved x,
    so x_next = x' + (0 - σ)·(x - D(x))/σ = D(x) - k·σ²·∇ℓ; ∇ brightness = -1/C. Step 0 is skipped by default."""
    den, k, sigma = GaussianDenoiser(0.5), 0.1, 2.0
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1)) * sigma
    sigmas = torch.tensor([sigma, 0.0])
    steered = SAMPLERS[sampler](den, x, sigmas, steer=LatentSteering(brightness, k, every=1, skip_first=False))
    # float32: one step of a few operations on values ≤ ~10 → atol 1e-5
    torch.testing.assert_close(steered, den(x, sigma) + k * sigma**2 / SHAPE[0], rtol=1e-5, atol=1e-5)
    plain = SAMPLERS[sampler](den, x, sigmas)
    assert torch.equal(SAMPLERS[sampler](den, x, sigmas, steer=LatentSteering(brightness, k)), plain)   # i = 0
    with pytest.raises(NoisecraftError, match="steer"):
        generate(den, (1, *SHAPE), sampler="ddim", steps=3, steer=LatentSteering(brightness, k))


def test_loss_guidance_every_k_calls_and_reset():
    calls = []

    def loss(x0):
        calls.append(1)
        return x0.flatten(1).sum(1)

    guided = LossGuidance(GaussianDenoiser(), loss, 0.1, every=3)
    x = torch.ones(2, *SHAPE)
    for _ in range(7):
        guided(x, 1.0)
    assert len(calls) == 3                    # calls 0, 3, 6
    guided.reset()
    guided(x, 1.0)
    assert len(calls) == 4


def test_loss_guidance_inside_no_grad_leaves_the_model_alone():
    net = tiny_unet()
    den = LossGuidance(Denoiser(net, NoiseSchedule.create("cosine", 1000)), brightness, 0.1, mode="score")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = den(x, 3.0)
    assert not out.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_loss_guidance_max_sigma_and_bad_inputs():
    den = GaussianDenoiser()
    x = torch.randn(2, *SHAPE)
    capped = LossGuidance(den, brightness, 1.0, max_sigma=1.0)
    torch.testing.assert_close(capped(x, 5.0), den(x, 5.0))
    assert not torch.allclose(capped(x, 0.5), den(x, 0.5))
    with pytest.raises(NoisecraftError, match="one value per sample"):
        LossGuidance(den, lambda x0: x0, 1.0)(x, 1.0)
    with pytest.raises(NoisecraftError, match="mode"):
        LossGuidance(den, brightness, 1.0, mode="nope")
    with pytest.raises(NoisecraftError, match="every"):
        LossGuidance(den, brightness, 1.0, every=0)


def test_builtin_guides():
    x = torch.zeros(2, 3, 4, 4)
    assert brightness(x + 0.5).tolist() == [-8.0, -8.0]          # -Σ pixels / C
    assert less_blue(x).shape == (2,)
    with pytest.raises(NoisecraftError, match="RGB"):
        less_blue(torch.zeros(2, 1, 4, 4))
    ref = torch.ones(3, 4, 4)
    assert match_reference(ref)(x).tolist() == [24.0, 24.0]
    with pytest.raises(NoisecraftError, match="reference"):
        match_reference(torch.ones(3, 2, 2))(x)


def test_match_reference_guide_moves_samples_towards_the_reference():
    den = GaussianDenoiser()
    ref = torch.linspace(-1, 1, 64).reshape(SHAPE)
    plain = generate(den, (4, *SHAPE), sampler="ddim", steps=10, seed=0)
    guided = generate(LossGuidance(den, match_reference(ref), 0.2), (4, *SHAPE), sampler="ddim", steps=10, seed=0)
    assert (guided - ref).pow(2).mean() < 0.5 * (plain - ref).pow(2).mean()


# ---------------------------------------------------------------- inpainting


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "lms", "plms", "ddpm"])
def test_inpainting_keeps_the_known_region(sampler):
    den = GaussianDenoiser()
    known = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(SHAPE[1:])
    mask[:, 4:] = 1                                               # generate the right half
    out = generate(InpaintingDenoiser(den, known, mask), (3, *SHAPE), sampler=sampler, steps=10, seed=0)
    # exact up to float32 rounding of x ≈ σ_max·z (σ_max ≈ 157 here: one ulp is 1.5e-5)
    assert (out - known)[..., :4].abs().max() < 1e-4
    assert (out - known)[..., 4:].abs().mean() > 0.05


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_inpainting_with_a_unet(sampler):
    schedule = NoiseSchedule.create("cosine", 1000)
    den = Denoiser(tiny_unet(), schedule, clip_x0=True)
    known = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    out = generate(InpaintingDenoiser(den, known, mask), (2, 1, 16, 16), sampler=sampler, steps=8, seed=0)
    keep = mask == 0
    assert (out - known)[keep].abs().max() < 1e-5
    assert (out - known)[~keep].abs().mean() > 0.05


def test_inpainting_mask_errors():
    den = GaussianDenoiser()
    with pytest.raises(NoisecraftError, match="does not fit"):
        InpaintingDenoiser(den, torch.zeros(2, *SHAPE), torch.zeros(5, 5))
    with pytest.raises(NoisecraftError, match=r"\[0, 1\]"):
        InpaintingDenoiser(den, torch.zeros(2, *SHAPE), torch.full(SHAPE[1:], 2.0))


# ---------------------------------------------------------------- img2img


def test_strength_picks_the_last_steps():
    sigmas = discrete_sigmas(NoiseSchedule.create("linear", 1000), 10)
    assert torch.equal(strength_sigmas(sigmas, 1.0), sigmas)
    assert torch.equal(strength_sigmas(sigmas, 0.5), sigmas[5:])
    assert len(strength_sigmas(sigmas, 0.01)) == 2                 # at least one step
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(NoisecraftError, match="strength"):
            strength_sigmas(sigmas, bad)


def test_img2img_small_strength_stays_close_and_large_moves_away():
    den = Denoiser(tiny_unet(), NoiseSchedule.create("cosine", 1000), clip_x0=True)
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    dist = {s: float((img2img(den, images, s, sampler="ddim", steps=10, seed=0) - images).abs().mean()) for s in (0.1, 0.5, 1.0)}
    assert dist[0.1] < dist[0.5] < dist[1.0]
    assert dist[0.1] < 0.1


def test_img2img_is_per_sample_seeded(run):
    pipe = DiffusionPipeline.from_run(run)
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = pipe.img2img(images, 0.5, steps=6, seed=4).images
    b = pipe.img2img(images, 0.5, steps=6, seed=4, batch_size=2).images
    # float32: batches of 2 vs 5 through the U-Net may take other kernels; 6 steps on pixels ≤ 1 (4e-7 seen)
    # → atol 1e-5. Another image's seed changes pixels by O(1).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    c = pipe.img2img(images[2], 0.5, n=3, steps=6, seed=4).images            # one image, edited 3 times
    assert c.shape == (3, 1, 16, 16) and not torch.equal(c[0], c[1])
    with pytest.raises(NoisecraftError, match="shape"):
        pipe.img2img(torch.zeros(1, 3, 16, 16), 0.5)


# ---------------------------------------------------------------- interpolation


def test_slerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    assert torch.equal(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, rtol=1e-6, atol=0)   # float64 inside, one float32 rounding
    path = slerp(z0, z1, torch.linspace(0, 1, 9))
    assert path.shape == (9, 1, 16, 16)
    norms = path.flatten(1).norm(dim=1)
    ends = torch.stack([z0.norm(), z1.norm()])
    assert norms.min() > 0.9 * ends.min() and norms.max() < 1.1 * ends.max()
    # the straight line cuts inside the sphere: about 1/√2 of the norm half way
    assert lerp(z0, z1, 0.5).norm() < 0.8 * slerp(z0, z1, 0.5).norm()
    torch.testing.assert_close(slerp(z0, z0, 0.3), z0, rtol=1e-6, atol=0)   # parallel: no 0/0; as above
    with pytest.raises(NoisecraftError, match="shape"):
        slerp(z0, torch.zeros(3), 0.5)


def test_interpolation_ends_are_the_two_seeds_pictures():
    den = GaussianDenoiser()
    path = interpolate(den, SHAPE, 3, 7, 5, sampler="ddim", steps=8)
    # float32: a batch of 5 vs 1 (vectorised loops vs their scalar tails), 8 steps, pixels ≤ ~1 → atol 1e-5
    torch.testing.assert_close(path[0], generate(den, (1, *SHAPE), sampler="ddim", steps=8, seed=3)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(path[-1], generate(den, (1, *SHAPE), sampler="ddim", steps=8, seed=7)[0], rtol=1e-5, atol=1e-5)
    assert path.shape == (5, *SHAPE)


def test_soft_labels_mix_label_embeddings(conditional_run):
    pipe = DiffusionPipeline.from_run(conditional_run)
    net = pipe.model
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([500.0, 500.0])
    hard = torch.tensor([3, 8])
    soft = torch.nn.functional.one_hot(hard, 11).float()
    with torch.no_grad():
        # float32: one-hot weights times the embedding table vs a lookup; outputs ≤ ~1.2 → atol 1e-5
        torch.testing.assert_close(net(x, t, soft), net(x, t, hard), rtol=1e-5, atol=1e-5)
    with pytest.raises(NoisecraftError, match="soft labels"):
        net(x, t, torch.ones(2, 10))
    path = pipe.interpolate_seeds(0, 0, 4, label=3, label_b=8, steps=4, guidance=2.0).images
    for image, label in ((path[0], 3), (path[-1], 8)):
        on_path = pipe.defaults.resolve(steps=4, guidance=2.0, path=True)   # the sampler and spacing of paths
        end = pipe.sample(1, seed=0, label=label, **on_path).images[0]
        torch.testing.assert_close(image, end, rtol=0, atol=1e-5)   # float32: batch 4, soft labels; pixels ≤ 1
    assert not torch.allclose(path[1], path[0])


def test_negative_label_replaces_the_null_label(conditional_run):
    pipe = DiffusionPipeline.from_run(conditional_run)
    plain = pipe.sample(2, steps=4, seed=0, label=3, guidance=3.0).images
    negative = pipe.sample(2, steps=4, seed=0, label=3, guidance=3.0, negative_label=5).images
    away = pipe.sample(2, steps=4, seed=0, guidance=3.0, negative_label=5).images   # "anything but a 5"
    assert not torch.allclose(plain, negative) and not torch.allclose(away, negative)
    with pytest.raises(NoisecraftError, match="negative label"):
        pipe.sample(1, steps=2, label=3, guidance=2.0, negative_label=10)


# ---------------------------------------------------------------- command line


def fails_cleanly(capsys, argv) -> str:
    capsys.readouterr()
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("noisecraft: error: "), lines
    return lines[0]


def load_images(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["images"]


def test_cli_sample_with_builtin_and_file_guides(run, tmp_path):
    plain, bright, custom = tmp_path / "p.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    # DDPM, as these expectations were set on: score-mode guidance moves x̂0 by σ²·∂D/∂x·∇ℓ, and the Jacobian of
    # this barely trained network is not yet a covariance, so its direction depends on the σ's a sampler visits.
    base = ["sample", str(run), "--n", "4", "--sampler", "ddpm", "--steps", "6"]
    assert main([*base, "--out", str(plain)]) == 0
    assert main([*base, "--out", str(bright), "--guide", "noisecraft.guidance.objectives:brightness", "--guide-scale", "0.1",
                 "--guide-every", "2"]) == 0
    assert load_images(bright).astype(float).mean() > load_images(plain).astype(float).mean() + 5
    guide = tmp_path / "my_guide.py"
    guide.write_text("def darker(x0):\n    return x0.flatten(1).sum(1)\n")
    assert main([*base, "--out", str(custom), "--guide", f"{guide}:darker", "--guide-mode", "score",
                 "--guide-scale", "0.1", "--guide-max-sigma", "10"]) == 0
    assert load_images(custom).astype(float).mean() < load_images(plain).astype(float).mean()


@pytest.mark.parametrize("spec, words", [
    ("brightness", "module:function"),
    ("no_such_module_xyz:f", "no module named"),
    ("noisecraft.guidance.objectives:nope", "no attribute"),
    ("noisecraft.guidance.objectives:__doc__", "not a function"),
    ("missing/file.py:f", "does not exist"),
])
def test_cli_bad_guide_spec(run, tmp_path, capsys, spec, words):
    line = fails_cleanly(capsys, ["sample", run, "--n", "1", "--steps", "2", "--guide", spec,
                                  "--out", tmp_path / "x.npz"])
    assert words in line
    assert not (tmp_path / "x.npz").exists()


def test_cli_guide_file_that_fails_to_import(run, tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert "boom" in fails_cleanly(capsys, ["sample", run, "--n", "1", "--steps", "2", "--guide", f"{broken}:f",
                                            "--out", tmp_path / "x.npz"])
    line = fails_cleanly(capsys, ["sample", run, "--n", "1", "--steps", "2", "--guide", "noisecraft.guidance.objectives:less_blue",
                                  "--out", tmp_path / "x.npz"])
    assert "RGB" in line


def test_cli_img2img_inpaint_interpolate_and_viz_reverse(run, tmp_path, capsys):
    source = tmp_path / "in.npz"
    assert main(["sample", str(run), "--n", "2", "--steps", "4", "--out", str(source)]) == 0
    png = tmp_path / "one.png"
    Image.fromarray(load_images(source)[0, ..., 0]).save(png)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")

    edited, grid = tmp_path / "e.npz", tmp_path / "e.png"
    assert main(["img2img", str(run), "--input", str(source), "--strength", "0.3", "--steps", "6",
                 "--out", str(edited), "--grid", str(grid)]) == 0
    assert load_images(edited).shape == (2, 16, 16, 1) and grid.is_file()
    assert main(["img2img", str(run), "--input", str(png), "--n", "3", "--strength", "0.8", "--steps", "5",
                 "--sampler", "euler", "--out", str(edited)]) == 0
    assert load_images(edited).shape == (3, 16, 16, 1)

    filled = tmp_path / "f.npz"
    assert main(["inpaint", str(run), "--input", str(source), "--mask", str(tmp_path / "mask.png"), "--steps", "6",
                 "--out", str(filled), "--gif", str(tmp_path / "f.gif")]) == 0
    before, after = load_images(source), load_images(filled)
    assert np.array_equal(before[:, :, :8], after[:, :, :8])          # the kept half, exactly
    assert (tmp_path / "f.gif").is_file()

    path = tmp_path / "path.png"
    assert main(["interpolate", str(run), "--seeds", "0", "1", "--n", "5", "--steps", "4", "--grid", str(path)]) == 0
    with Image.open(path) as im:
        assert im.width > 4 * im.height                                 # one row of 5

    strip, gif = tmp_path / "strip.png", tmp_path / "rev.gif"
    assert main(["viz", "reverse", str(run), "--steps", "6", "--save-every", "2", "--n", "4",
                 "--out", str(strip), "--gif", str(gif)]) == 0
    with Image.open(strip) as im:
        assert im.format == "PNG" and im.height < im.width
    with Image.open(gif) as im:
        assert im.n_frames == 4                                          # steps 1, 3, 5 and the last
    assert str(strip) in capsys.readouterr().out


def test_cli_edit_errors(run, conditional_run, tmp_path, capsys):
    assert "does not exist" in fails_cleanly(capsys, ["img2img", run, "--input", tmp_path / "nope.png",
                                                      "--out", tmp_path / "x.npz"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert "cannot read" in fails_cleanly(capsys, ["inpaint", run, "--input", bad, "--mask", bad,
                                                   "--out", tmp_path / "x.npz"])
    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(ok)
    assert "strength" in fails_cleanly(capsys, ["img2img", run, "--input", ok, "--strength", "1.5",
                                                "--out", tmp_path / "x.npz"])
    assert "needs a run" in fails_cleanly(capsys, ["viz", "reverse", "--out", tmp_path / "r.png"])
    assert "two" in fails_cleanly(capsys, ["interpolate", conditional_run, "--labels", "1", "2", "3",
                                           "--grid", tmp_path / "g.png"])
