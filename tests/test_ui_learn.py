"""The "watch and learn" views of the UI (ui/learn.py), on tiny random models: plain functions returning pictures,
no gradio needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_guidance import tiny_unet, write_run

from noisecraft.config import DataConfig, DiffusionConfig, LatentConfig, RunConfig, TrainConfig
from noisecraft.errors import NoisecraftError
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.schedule import NoiseSchedule
from noisecraft.ui import learn


def _digit(h=8, w=8):
    arr = np.zeros((h, w), np.uint8)
    arr[1:-1, w // 2 - 1:w // 2 + 1] = 255      # a "1"
    return arr


def test_forward_process_view_follows_the_closed_form():
    schedule = NoiseSchedule.create("linear")
    picture0, info0 = learn.forward_process_view(_digit(), schedule, 0)
    assert picture0.dtype == np.uint8 and picture0.ndim == 3 and picture0.shape[-1] == 3
    assert min(picture0.shape[:2]) >= learn.MIN_VIEW_PX
    a = float(schedule.alphas_cumprod[500])
    picture, info = learn.forward_process_view(_digit(), "linear", 500, seed=3)
    assert info["t"] == 500 and info["alpha_bar"] == pytest.approx(a)
    assert info["snr"] == pytest.approx(a / (1 - a)) and info["sigma"] == pytest.approx(((1 - a) / a) ** 0.5)
    # exactly sqrt(ā)·x0 + sqrt(1 - ā)·ε with the seed's ε, on the picture's own pixels
    x0 = torch.from_numpy(_digit()).float() / 127.5 - 1
    eps = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(3))[0, 0]
    expected = torch.round(((a ** 0.5 * x0 + (1 - a) ** 0.5 * eps).clamp(-1, 1) + 1) * 127.5).numpy()
    s = picture.shape[0] // 8
    assert np.array_equal(picture[::s, ::s, 0], expected.astype(np.uint8))
    # the same seed animates the same noise; t = 0 is nearly the image; late t is nearly pure noise
    assert np.array_equal(learn.forward_process_view(_digit(), "linear", 500, seed=3)[0], picture)
    assert info0["snr"] > 1e3 and learn.forward_process_view(_digit(), schedule, 999)[1]["snr"] < 1e-3


def test_forward_process_view_takes_pil_rgb_and_tensors_and_refuses_bad_t():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    picture, _ = learn.forward_process_view(rgb, "cosine", 10, min_px=1)
    assert picture.shape == (20, 30, 3)
    picture, _ = learn.forward_process_view(torch.zeros(1, 4, 4), "cosine", 10, min_px=1)
    assert picture.shape == (4, 4, 3)
    big = np.zeros((1000, 600, 3), np.uint8)
    assert learn.forward_process_view(big, "cosine", 10, min_px=1, max_side=100)[0].shape == (100, 60, 3)
    for bad in (-1, 1000, 2.5, True):
        with pytest.raises(NoisecraftError, match="t must be an integer timestep in"):
            learn.forward_process_view(_digit(), "linear", bad)
    with pytest.raises(NoisecraftError, match="uint8"):
        learn.forward_process_view(np.zeros((4, 4), np.float32), "linear", 0)


def test_schedules_figure_is_a_picture():
    figure = learn.schedules_figure()
    assert isinstance(figure, Image.Image) and figure.width > 300 and figure.height > 200
    assert "eq. 4" in learn.SCHEDULES_CAPTION and "eq. 4" in learn.FORWARD_CAPTION


@pytest.fixture(scope="module")
def pixel_pipe(tmp_path_factory):
    return DiffusionPipeline.from_run(write_run(tmp_path_factory.mktemp("learn") / "run"))


def test_trajectory_strip_and_gif(pixel_pipe, tmp_path):
    result = pixel_pipe.sample(3, steps=6, seed=0, save_every=2)
    strip = learn.trajectory_strip(result)
    assert isinstance(strip, Image.Image) and strip.width > strip.height     # columns: the saved steps
    assert not np.array_equal(np.asarray(strip), np.asarray(learn.trajectory_strip(result, index=2)))
    path = learn.trajectory_gif(result, tmp_path / "d.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == len(result.trajectory) == 4      # steps 1, 3, 5 and the last
    with pytest.raises(NoisecraftError, match="save_every"):
        learn.trajectory_strip(pixel_pipe.sample(1, steps=2, seed=0))
    with pytest.raises(NoisecraftError, match="has no trajectory"):
        learn.trajectory_strip(result, index=3)
    assert "Algorithm 2" in learn.TRAJECTORY_CAPTION


def _latent_pipe():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(in_channels=1, latent_channels=4, block_out_channels=(8, 16), norm_groups=4)).eval()
    unet = UNet(UNetConfig(in_channels=4, base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_levels=()))
    config = RunConfig(model=unet.config, diffusion=DiffusionConfig(), train=TrainConfig(steps=1),
                       data=DataConfig(dataset="digits", image_shape=(1, 16, 16)),
                       latent=LatentConfig(scaling_factor=0.5, latent_shape=(4, 8, 8)))
    return DiffusionPipeline(unet, config, vae=vae, scaling_factor=0.5)


def test_latent_channels_view_shows_the_four_channels():
    pipe = _latent_pipe()
    picture, info = learn.latent_channels_view(pipe, _digit())          # 8×8 input, resized to 16×16
    assert isinstance(picture, Image.Image)
    assert info["latent_shape"] == (4, 8, 8)
    x = torch.nn.functional.interpolate(learn.as_tensor(_digit()), size=(16, 16), mode="bicubic", antialias=True,
                                        align_corners=False).clamp(-1, 1)
    z = pipe.encode(x)
    assert info["mean"] == pytest.approx(float(z.mean()), abs=1e-5)
    # six cells in one row (x, D(z) and the four channels) above their captions
    assert picture.width > 4 * picture.height
    assert "LDM" in learn.LATENT_CAPTION


def test_latent_channels_view_refuses_pixel_models(pixel_pipe):
    with pytest.raises(NoisecraftError, match="pixel space"):
        learn.latent_channels_view(pixel_pipe, _digit())


def test_tiny_unet_is_importable():   # the helper these tests share with test_guidance
    assert tiny_unet().config.in_channels == 1


def test_panels_and_the_learn_tab(pixel_pipe, tmp_path):
    picture, line = learn.forward_panel(None, "cosine", 100, 0)          # no upload: a bundled digit
    assert picture.shape[-1] == 3 and line.startswith("t = 100: ᾱ_t = ")
    strip, gif, result = learn.trajectory_panel(pixel_pipe, steps=5, seed=1, gif_path=tmp_path / "t.gif")
    assert isinstance(strip, Image.Image) and gif.exists() and len(result.trajectory) == 5
    ddpm = pixel_pipe.sample(1, steps=5, seed=1, sampler="ddpm", spacing="leading").images  # the caption's algorithm
    assert torch.equal(result.images, ddpm) and pixel_pipe.defaults.sampler != "ddpm"
    with pytest.raises(NoisecraftError, match="steps must be"):
        learn.trajectory_panel(pixel_pipe, steps=0)
    gr = pytest.importorskip("gradio")
    from noisecraft.ui.engine import Engine
    from noisecraft.ui.library import ModelLibrary
    library = ModelLibrary([tmp_path])
    with gr.Blocks():
        learn.build_tab(Engine(library, outputs=tmp_path / "out"), library)
