"""One source of sampling defaults: for Stable Diffusion and for each kind of our runs, every job (sample, txt2img,
img2img, inpaint, interpolate), from Python and from the command line, called with only its required arguments
gives bit for bit the picture of the same call with the model's defaults spelled out — and those defaults are
the documented ones (SD: LMS, 50 steps, guidance 7.5, linspace; our pixel runs: DPM++ 2M SDE-20 on Karras σ's; our
latent runs: DDPM-10; our text runs: DPM++ 2M SDE-20 on Karras σ's at 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_guidance import write_run
from tiny_runs import train_tiny_vae_and_clip
from tiny_sd import save_tiny_pipeline

from noisecraft.cli import main
from noisecraft.io.images import load_images, load_mask
from noisecraft.pipelines.stable_diffusion import load_pipeline
from noisecraft.viz.images import to_uint8

# The defaults written out by hand, as the README states them: a change of a default must change this table.
SPELLED = {
    "ours": dict(sampler="dpmpp_2m_sde", steps=20, guidance=1.0, spacing="karras"),
    "latent": dict(sampler="ddpm", steps=10, guidance=1.0, spacing="leading"),
    "text": dict(sampler="dpmpp_2m_sde", steps=20, guidance=2.0, spacing="karras"),
    "sd": dict(sampler="lms", steps=50, guidance=7.5, spacing="linspace"),
}
PATH_SPELLED = {   # interpolate: a deterministic sampler
    "ours": dict(sampler="ddim", steps=50, guidance=1.0, spacing="leading"),
    "latent": dict(sampler="ddim", steps=50, guidance=1.0, spacing="leading"),
    "text": dict(sampler="ddim", steps=50, guidance=2.0, spacing="leading"),
    "sd": dict(sampler="lms", steps=50, guidance=7.5, spacing="linspace"),
}
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (model path, which defaults it has, channels, a non-square input size its VAE factor divides)."""
    root = tmp_path_factory.mktemp("defaults")
    train_tiny_vae_and_clip(root, steps=2, batch_size=16)
    common = ["--dataset", "digits", "--steps", "2", "--base-channels", "8", "--batch-size", "8", "--sample-every",
              "0", "--checkpoint-every", "0"]
    assert main(["train", *common, "--latent", str(root / "vae"), "--out", str(root / "latent")]) == 0
    assert main(["train", *common, "--latent", str(root / "vae"), "--text-encoder", str(root / "clip"),
                 "--out", str(root / "text")]) == 0
    save_tiny_pipeline(root / "sd")
    return {
        "pixel": (write_run(root / "pixel"), "ours", 1, (20, 12)),
        "class": (write_run(root / "class", num_classes=10), "ours", 1, (12, 20)),
        "latent": (root / "latent", "latent", 1, (24, 16)),
        "text": (root / "text", "text", 1, (16, 24)),
        "sd": (root / "sd", "sd", 3, (40, 72)),
    }


def _input_files(tmp_path, channels, size):
    """A picture and a mask of the given (H, W) size, as PNG files."""
    rng = np.random.default_rng(0)
    h, w = size
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    image, mask = tmp_path / "input.png", tmp_path / "mask.png"
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(image)
    mask_pixels = np.zeros((h, w), dtype=np.uint8)
    mask_pixels[:, w // 2:] = 255
    Image.fromarray(mask_pixels).save(mask)
    return image, mask


def _flags(settings: dict) -> list[str]:
    return ["--sampler", settings["sampler"], "--steps", str(settings["steps"]), "--guidance",
            str(settings["guidance"]), "--spacing", settings["spacing"]]


def _cli(argv: list[str], out) -> np.ndarray:
    assert main([*argv, "--out", str(out)]) == 0
    with np.load(out) as data:
        return data["images"]


def _jobs(kind, image, mask, channels, text: bool):
    """job -> (CLI arguments after the model, Python call taking the spelled-out settings, uses the path sampler)."""
    prompt = {"prompt": PROMPT} if text else {}
    prompt_flags = ["--prompt", PROMPT] if text else []
    pictures = load_images(image, channels)
    holes = load_mask(mask, tuple(pictures.shape[-2:]))
    jobs = {
        "sample": (["sample", "--n", "2", *prompt_flags],
                   lambda pipe, **s: pipe.sample(2, **prompt, **s), False),
        "img2img": (["img2img", "--input", str(image), *prompt_flags],
                    lambda pipe, **s: pipe.img2img(pictures, **prompt, **s), False),
        "inpaint": (["inpaint", "--input", str(image), "--mask", str(mask), *prompt_flags],
                    lambda pipe, **s: pipe.inpaint(pictures, holes, **prompt, **s), False),
        "interpolate": (["interpolate", "--seeds", "0", "1", "--n", "3"],
                        lambda pipe, **s: pipe.interpolate_seeds(0, 1, 3, **s), True),
    }
    if text:
        jobs["txt2img"] = (["txt2img", PROMPT, "--n", "2"], lambda pipe, **s: pipe.sample(2, prompt=PROMPT, **s), False)
    return jobs


@pytest.mark.parametrize("kind", ["pixel", "class", "latent", "text", "sd"])
def test_every_job_takes_the_models_defaults(models, kind, tmp_path):
    path, defaults, channels, size = models[kind]
    image, mask = _input_files(tmp_path, channels, size)
    pipe = load_pipeline(path)
    text = pipe.takes_prompts
    for job, (argv, call, on_path) in _jobs(kind, image, mask, channels, text).items():
        spelled = (PATH_SPELLED if on_path else SPELLED)[defaults]
        implicit = call(pipe).images
        explicit = call(pipe, **spelled).images
        assert torch.equal(implicit, explicit), (kind, job, "Python")
        cli_implicit = _cli([argv[0], str(path), *argv[1:]], tmp_path / f"{job}-a.npz")
        cli_explicit = _cli([argv[0], str(path), *argv[1:], *_flags(spelled)], tmp_path / f"{job}-b.npz")
        assert np.array_equal(cli_implicit, cli_explicit), (kind, job, "CLI")
        assert np.array_equal(cli_implicit, to_uint8(implicit)), (kind, job, "CLI = Python")
        if job in ("img2img", "inpaint"):        # the input's own size, not the model's default size
            assert tuple(implicit.shape[-2:]) == size, (kind, job)


def test_stable_diffusion_defaults_and_edits_keep_the_input_size(models, tmp_path, capsys):
    path = models["sd"][0]
    pipe = load_pipeline(path)
    assert pipe.defaults.resolve() == SPELLED["sd"]
    assert pipe.image_shape == (3, 64, 64)           # the tiny SD's own default size: sample_size 8 × VAE factor 8
    # an input whose sides are no multiple of 8 is rounded down, with a one-line note
    image, mask = _input_files(tmp_path, 3, (45, 70))
    images = _cli(["img2img", "--model", str(path), "--input", str(image), "--prompt", PROMPT, "--steps", "2"],
                  tmp_path / "rounded.npz")
    assert images.shape[1:3] == (40, 64)
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert note == ["note: the input is 45×70; resized to 40×64, a multiple of 8 for this model."]
    with pytest.warns(UserWarning, match="45×70 resized to 40×64"):
        out = pipe.img2img(load_images(image, 3), prompt=PROMPT, steps=2).images
    assert tuple(out.shape[-2:]) == (40, 64)


def test_a_named_sampler_keeps_the_runs_plain_spacing():
    """A pixel run's default is DPM++ 2M SDE on Karras σ's; a sampler named without a spacing (and the interpolation
    path) keeps leading steps, as every sampler table was drawn; a spacing given always wins."""
    from noisecraft.pipelines.defaults import defaults_for_run
    pixel = defaults_for_run(text_conditional=False)
    assert pixel.resolve() == SPELLED["ours"]
    assert pixel.resolve("ddim", 50)["spacing"] == "leading"
    assert pixel.resolve("dpmpp_2m_sde")["spacing"] == "leading"      # "DPM++ 2M SDE Karras" names the default's grid
    assert pixel.resolve(path=True) == PATH_SPELLED["ours"]
    assert pixel.resolve("heun", spacing="karras")["spacing"] == "karras"
    edm = defaults_for_run(text_conditional=False, edm=True)
    assert edm.resolve("ddim")["spacing"] == edm.resolve()["spacing"] == "karras"
