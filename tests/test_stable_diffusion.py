"""Stable Diffusion 1.x checkpoints through noisecraft's own models: tiny random SD components made by diffusers and
transformers load from the diffusers folder and from the single file, and txt2img / inpainting match diffusers'
own pipelines on the same starting latents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_sd import save_tiny_pipeline  # noqa: E402

from noisecraft.cli import main  # noqa: E402
from noisecraft.errors import NoisecraftError  # noqa: E402
from noisecraft.io.checkpoint import load_weights  # noqa: E402
from noisecraft.pipelines.stable_diffusion import convert, detect_format, load_pipeline  # noqa: E402

PROMPT = "an astronaut riding a horse on mars"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(folder, diffusers pipeline) of a tiny SD model saved in the diffusers layout."""
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    return folder, save_tiny_pipeline(folder)


def _latents(seed=1, shape=(1, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference_images(ref, **kwargs):
    with torch.no_grad():
        return ref(output_type="pt", **kwargs).images          # in [0, 1]


@pytest.mark.parametrize("scheduler, sampler", [("lms", "lms"), ("euler", "euler"), ("ddim", "ddim")])
def test_txt2img_matches_diffusers_stable_diffusion_pipeline(tmp_path, scheduler, sampler):
    folder = tmp_path / "sd"
    ref = save_tiny_pipeline(folder, scheduler=scheduler)
    z = _latents()
    # 5 trailing steps: 999, 799, ..., 199 — evenly spaced, so diffusers' DDIM (which always steps t -> t - T/k)
    # visits the same timesteps as ours.
    expected = _reference_images(ref, prompt=PROMPT, negative_prompt="blurry", num_inference_steps=5,
                                 guidance_scale=7.5, latents=z.clone(), height=64, width=64)
    pipe = load_pipeline(folder)
    ours = pipe.sample(1, prompt=PROMPT, negative_prompt="blurry", sampler=sampler, steps=5, spacing="trailing",
                       guidance=7.5, noise=_as_diffusers_starts(pipe, z, scheduler)).images
    assert ours.shape == expected.shape == (1, 3, 64, 64)
    assert (ours - (expected * 2 - 1)).abs().max() < 1e-4


def _as_diffusers_starts(pipe, z, scheduler):
    """diffusers' σ-space schedulers (LMS, Euler) with trailing or linspace spacing start at x_T = σ_max·z (the
    k-diffusion convention); we start from the DDPM prior, x_T = sqrt(1 + σ_max²)·z on the σ scale. Same x_T:
    rescale z. (DDIM starts at z on the DDPM scale, as we do.)"""
    if scheduler == "ddim":
        return z
    sigma = float(pipe.schedule.sigmas[-1])
    return z * sigma / (1 + sigma**2) ** 0.5


def test_defaults_are_stable_diffusions(sd):
    pipe = load_pipeline(sd[0])
    assert pipe.defaults.resolve() == {"sampler": "lms", "steps": 50, "guidance": 7.5, "spacing": "linspace"}
    assert pipe.defaults.resolve(path=True) == pipe.defaults.resolve()     # LMS is deterministic: paths use it too
    assert pipe.schedule.kind == "scaled_linear"
    assert float(pipe.schedule.betas[0]) == pytest.approx(0.00085) and float(pipe.schedule.betas[-1]) == pytest.approx(0.012)
    assert pipe.config.diffusion.prediction == "eps" and pipe.scaling_factor == pytest.approx(0.18215)
    assert pipe.image_shape == (3, 64, 64) and pipe.model_shape == (4, 8, 8)


def test_other_sizes_and_every_sampler_run(sd):
    pipe = load_pipeline(sd[0])
    images = pipe.sample(2, prompt=PROMPT, steps=3, height=40, width=72, sampler="dpmpp_2m").images
    assert images.shape == (2, 3, 40, 72) and torch.isfinite(images).all()
    from noisecraft.samplers import SAMPLERS
    for name in SAMPLERS:
        out = pipe.sample(1, prompt=PROMPT, steps=2, sampler=name, height=16, width=16).images
        assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all(), name
    with pytest.raises(NoisecraftError, match="multiple of 8"):
        pipe.sample(1, prompt=PROMPT, steps=2, height=30)


def test_inpainting_unet_matches_diffusers_inpaint_pipeline(tmp_path):
    folder = tmp_path / "sd-inpaint"
    ref = save_tiny_pipeline(folder, in_channels=9)
    pipe = load_pipeline(folder)
    assert pipe.inpainting_model
    image01 = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    masked_latents = pipe.encode((image01 * 2 - 1) * (mask < 0.5))
    z = _latents(5)
    expected = _reference_images(ref, prompt=PROMPT, image=image01, mask_image=mask, masked_image_latents=masked_latents,
                                 latents=z.clone(), num_inference_steps=5, guidance_scale=5.0, height=64, width=64,
                                 strength=1.0)
    ours = pipe.inpaint(image01 * 2 - 1, mask[0, 0], prompt=PROMPT, sampler="lms", steps=5, spacing="trailing",
                        guidance=5.0, noise=_as_diffusers_starts(pipe, z, "lms")).images
    assert (ours - (expected * 2 - 1)).abs().max() < 2e-4
    with pytest.raises(NoisecraftError, match="inpainting model"):
        pipe.sample(1, prompt=PROMPT, steps=2)


def test_single_file_round_trip_keeps_every_tensor_and_every_output(sd, tmp_path):
    folder, _ = sd
    single = convert(folder, tmp_path / "tiny.safetensors")
    assert detect_format(single) == "single-file"
    tensors = load_weights(single)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in tensors)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in tensors)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in tensors)
    back = convert(single, tmp_path / "back", config=folder)
    for part, file in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")):
        # transformers 5 saves CLIPTextModel without the "text_model." prefix, older versions (and we) with it.
        original, again = ({k.removeprefix("text_model."): v for k, v in load_weights(f / part / file).items()
                            if not k.endswith("position_ids")} for f in (folder, back))
        assert original.keys() == again.keys(), part
        assert all(torch.equal(original[k], again[k]) for k in original), part
    ckpt = convert(folder, tmp_path / "tiny.ckpt")
    z = _latents(7)
    # The file stores no head counts or GroupNorm groups; this tiny model departs from SD's conventions for both,
    # so it is read with its own configuration (as from_single_file(config=...) in diffusers).
    outputs = [load_pipeline(p, config=None if p == folder else folder).sample(1, prompt=PROMPT, steps=3,
                                                                               noise=z).images
               for p in (folder, single, ckpt)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    with pytest.raises(NoisecraftError, match="divisible by norm_groups=32"):
        load_pipeline(single)            # SD's conventions (32 groups) do not fit 16-channel blocks: one sentence


def test_prompt_mixing_and_embeddings(sd):
    pipe = load_pipeline(sd[0])
    a, b = pipe.embed([PROMPT, "a red cube"])
    assert torch.equal(pipe.mix_prompts(PROMPT, "a red cube", 0.0), a)
    assert torch.allclose(pipe.mix_prompts(PROMPT, "a red cube", 1.0), b)
    partial = pipe.mix_prompts(PROMPT, "a red cube", 1.0, tokens=[1, 2])
    assert torch.equal(partial[1:3], b[1:3]) and torch.equal(partial[3:], a[3:]) and torch.equal(partial[0], a[0])
    z = _latents(2)
    by_text = pipe.sample(1, prompt=PROMPT, steps=3, noise=z, guidance=3.0).images
    by_embedding = pipe.sample(1, prompt=a, steps=3, noise=z, guidance=3.0).images
    assert torch.equal(by_text, by_embedding)
    mixed = pipe.sample(1, prompt=pipe.mix_prompts(PROMPT, "a red cube", 0.5), steps=3, noise=z, guidance=3.0).images
    assert not torch.allclose(mixed, by_text, atol=1e-3)
    with pytest.raises(NoisecraftError, match="token positions"):
        pipe.mix_prompts(PROMPT, "x", tokens=[200])
    with pytest.raises(NoisecraftError, match="prompt embeddings"):
        pipe.sample(1, prompt=torch.zeros(5, 3), steps=2)


def test_loss_guidance_on_the_decoded_image_makes_it_less_blue(sd):
    pipe = load_pipeline(sd[0])
    z = _latents(4, (2, 4, 8, 8))

    def blue(x0):   # decoded x̂0 in [-1, 1]: the blue channel's total per image
        return x0[:, 2].sum(dim=(1, 2))

    settings = dict(prompt=PROMPT, sampler="ddpm", steps=10, guidance=1.0, spacing="leading", noise=z)  # not SD defaults
    plain = pipe.sample(2, **settings).images
    guided = pipe.sample(2, **settings, guide=blue, guide_scale=1.0, guide_every=5).images
    assert guided[:, 2].mean() < plain[:, 2].mean() - 0.03                          # less blue
    assert (guided[:, 2] - plain[:, 2]).abs().mean() > (guided[:, :2] - plain[:, :2]).abs().mean()  # mostly blue


def test_the_tutorials_blue_loss_recipe_makes_the_decoded_image_bluer(sd):
    """guide_mode "latents": the latents move by -k·σ²·∇ blue_loss(decode(x̂0)) every 5 steps but the first."""
    from noisecraft.guidance.objectives import blue_loss
    pipe = load_pipeline(sd[0])
    z = _latents(4, (2, 4, 8, 8))
    settings = dict(prompt=PROMPT, steps=20, noise=z)                         # SD's LMS and w 7.5
    plain = pipe.sample(2, **settings).images
    recipe = dict(guide=blue_loss, guide_mode="latents", guide_every=5)
    bluer = pipe.sample(2, **settings, **recipe, guide_scale=75).images          # the tutorial's k
    much_bluer = pipe.sample(2, **settings, **recipe, guide_scale=1000).images
    # the tiny random decoder responds weakly (k = 75 moves the loss by ~0.002), but in the same direction, growing with k
    assert (blue_loss(much_bluer) < blue_loss(bluer)).all() and (blue_loss(bluer) < blue_loss(plain)).all()
    assert (blue_loss(much_bluer) < blue_loss(plain) - 0.01).all()
    with pytest.raises(NoisecraftError, match="steer"):
        pipe.sample(1, **{**settings, "noise": z[:1]}, sampler="ddim", guide=blue_loss, guide_mode="latents")


def test_precision_slicing_and_tiling(sd):
    pipe = load_pipeline(sd[0])
    z = _latents(6, (1, 4, 16, 16))
    size = dict(height=128, width=128)
    reference = pipe.sample(1, prompt=PROMPT, steps=3, noise=z, **size).images
    sliced = load_pipeline(sd[0]).enable_attention_slicing(7).sample(1, prompt=PROMPT, steps=3, noise=z, **size)
    assert (sliced.images - reference).abs().max() < 1e-4
    tiled = load_pipeline(sd[0]).enable_vae_tiling(tile_latent=8).sample(1, prompt=PROMPT, steps=3, noise=z, **size)
    assert tiled.images.shape == reference.shape and (tiled.images - reference).abs().mean() < 0.1
    assert not torch.equal(tiled.images, reference)                   # it did tile
    half = load_pipeline(sd[0], dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert next(half.vae.parameters()).dtype == torch.float32        # the decoder stays in float32
    low = half.sample(1, prompt=PROMPT, steps=3, noise=z, **size).images
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - reference).abs().mean() < 0.1
    with pytest.raises(NoisecraftError, match="precision"):
        pipe.set_precision("int8")


def test_prompt_mixing_names_the_tokens_it_blends(sd, tmp_path, capsys):
    pipe = load_pipeline(sd[0])
    assert pipe.text_encoder.token_strings("a dog wearing hat") == [
        "<|startoftext|>", "a</w>", "dog</w>", "wearing</w>", "hat</w>", "<|endoftext|>"]
    assert main(["txt2img", "--model", str(sd[0]), "a dog wearing hat", "--n", "1", "--steps", "2", "--height", "16",
                 "--width", "16", "--out", str(tmp_path / "m.npz"), "--mix-prompt", "a cat wearing hat",
                 "--mix-tokens", "2", "--mix", "1"]) == 0
    assert "mixing position 2: 'dog</w>' with 'cat</w>' (weight 1)" in capsys.readouterr().out


def test_cli_txt2img_convert_and_decoded_steps(sd, tmp_path):
    folder, _ = sd
    grid = tmp_path / "astronaut.png"
    assert main(["txt2img", "--model", str(folder), PROMPT, "--n", "2", "--steps", "4", "--height", "32",
                 "--width", "48", "--grid", str(grid), "--out", str(tmp_path / "a.npz"), "--save-every", "2",
                 "--negative-prompt", "blurry", "--mix-prompt", "a red cube", "--mix", "0.3"]) == 0
    images = np.load(tmp_path / "a.npz")["images"]
    assert images.shape == (2, 32, 48, 3)
    steps = sorted((tmp_path / "astronaut_steps").glob("step_*.png"))
    assert [p.name for p in steps] == ["step_001.png", "step_003.png", "step_004.png"]
    single = tmp_path / "tiny.safetensors"
    assert main(["convert", str(folder), str(single), "--dtype", "float16"]) == 0
    assert all(v.dtype == torch.float16 for v in load_weights(single).values() if v.is_floating_point())
    assert main(["txt2img", "--model", str(single), "--model-config", str(folder), PROMPT, "--n", "1", "--steps", "2",
                 "--height", "16",
                 "--width", "16", "--grid", str(tmp_path / "b.png"), "--dtype", "bfloat16",
                 "--attention-slicing", "16", "--vae-tiling"]) == 0
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 255
    from PIL import Image
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "in.png")
    assert main(["inpaint", "--model", str(folder), "--input", str(tmp_path / "in.png"), "--mask",
                 str(tmp_path / "mask.png"), "--prompt", PROMPT, "--steps", "3", "--grid", str(tmp_path / "c.png")]) == 0
    assert main(["img2img", "--model", str(folder), "--input", str(tmp_path / "in.png"), "--prompt", PROMPT,
                 "--steps", "4", "--strength", "0.5", "--grid", str(tmp_path / "d.png")]) == 0


def test_bad_checkpoints_get_one_clear_sentence(sd, tmp_path, capsys):
    import shutil
    folder, _ = sd
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(NoisecraftError, match="lacks the component folder"):
        load_pipeline(broken)
    single = convert(folder, tmp_path / "tiny.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    assert main(["txt2img", "--model", str(truncated), PROMPT, "--grid", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("noisecraft: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other.safetensors"
    from noisecraft.io.checkpoint import save_weights
    save_weights({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
                  "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, other)
    with pytest.raises(NoisecraftError):
        load_pipeline(other)
    with pytest.raises(NoisecraftError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")
    with pytest.raises(NoisecraftError, match="neither"):
        load_pipeline(tmp_path)
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    config = json.loads((wrong / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (wrong / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NoisecraftError, match="do not fit"):
        load_pipeline(wrong)
    assert main(["txt2img", PROMPT, "--grid", str(tmp_path / "x.png")]) == 2
    assert "--model" in capsys.readouterr().err
