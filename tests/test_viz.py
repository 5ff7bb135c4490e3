"""Tests for noisecraft.viz: uint8 conversion, grid geometry, and files that Pillow can open."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.errors import NoisecraftError
from noisecraft.viz.images import make_grid, save_gif, save_grid, save_strip, to_uint8
from noisecraft.viz.plots import moving_average, plot_loss_curve, plot_schedules


def _images(n, c=1, h=28, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1


# ---------------------------------------------------------------- to_uint8


def test_to_uint8_exact_values_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0, -0.5]).view(1, 1, 2, 2)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 1)
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 64]]  # round(63.75) = 64


def test_to_uint8_clamps_and_handles_nan():
    x = torch.tensor([-5.0, 3.0, float("inf"), float("nan")]).view(1, 1, 1, 4)
    assert to_uint8(x).reshape(-1).tolist() == [0, 255, 255, 128]


def test_to_uint8_moves_channels_last():
    x = torch.zeros(2, 3, 4, 5)
    x[:, 0] = 1.0  # red channel full
    out = to_uint8(x)
    assert out.shape == (2, 4, 5, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 128).all()


def test_to_uint8_rejects_bad_channel_count():
    with pytest.raises(NoisecraftError):
        to_uint8(torch.zeros(1, 2, 4, 4))


# ---------------------------------------------------------------- make_grid


def test_grid_size_arithmetic_and_mode():
    grid = make_grid(_images(10), nrow=5, padding=2)
    assert grid.mode == "L"
    assert grid.size == (5 * (28 + 2) + 2, 2 * (28 + 2) + 2)  # (152, 62)


def test_grid_default_nrow_scale_and_rgb():
    grid = make_grid(_images(10, c=3, h=16, w=16), scale=3, padding=1)
    assert grid.mode == "RGB"
    # ceil(sqrt(10)) = 4 per row -> 3 rows; cells 48 px
    assert grid.size == (4 * (48 + 1) + 1, 3 * (48 + 1) + 1)


def test_grid_places_pixels_and_padding():
    images = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)])
    arr = np.array(make_grid(images, nrow=2, padding=1, scale=2, pad_value=100))
    assert arr.shape == (1 + 4 + 1, 2 * (4 + 1) + 1)
    assert (arr[1:5, 1:5] == 0).all() and (arr[1:5, 6:10] == 255).all()
    assert arr[0].tolist() == [100] * 11 and (arr[:, 5] == 100).all()


def test_grid_nrow_larger_than_batch():
    assert make_grid(_images(3), nrow=8, padding=0).size == (3 * 28, 28)


# ---------------------------------------------------------------- files


def test_save_grid_auto_scale_and_atomic(tmp_path):
    path = save_grid(_images(4), tmp_path / "new" / "dir" / "grid.png", nrow=2)
    assert path.exists()
    with Image.open(path) as im:
        # 28 px -> auto scale 3 (84 px >= 64)
        assert im.size == (2 * (84 + 2) + 2, 2 * (84 + 2) + 2) and im.mode == "L"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left behind


def test_save_grid_explicit_scale(tmp_path):
    with Image.open(save_grid(_images(2, c=3, h=16, w=16), tmp_path / "g.png", nrow=2, scale=1)) as im:
        assert im.size == (2 * 18 + 2, 18 + 2) and im.mode == "RGB"


def test_save_grid_unknown_extension(tmp_path):
    with pytest.raises(NoisecraftError):
        save_grid(_images(1), tmp_path / "grid.unknownext")


def test_save_strip_one_row(tmp_path):
    path = save_strip(_images(4), tmp_path / "strip.png", captions=["t=0", "t=1", "t=2", "t=3"], scale=2)
    with Image.open(path) as im:
        assert im.width == 4 * (56 + 2) + 2
        assert im.height > 56 + 4  # the caption band sits under the images


def test_save_strip_rows_with_titles(tmp_path):
    images = torch.stack([_images(3, c=3, seed=1), _images(3, c=3, seed=2)])  # R=2, N=3
    no_titles = save_strip(images, tmp_path / "a.png", scale=1)
    titled = save_strip(images, tmp_path / "b.png", captions=["a", "b", "c"], scale=1, rows=["x_t", "x0"])
    with Image.open(no_titles) as a, Image.open(titled) as b:
        assert a.size == (3 * 30 + 2, 2 * 30 + 2)
        assert b.width > a.width and b.height > a.height


def test_save_strip_caption_count_mismatch(tmp_path):
    with pytest.raises(NoisecraftError):
        save_strip(_images(3), tmp_path / "s.png", captions=["only one"])


def test_save_gif_frames_size_and_timing(tmp_path):
    frames = [_images(4, seed=s) for s in range(5)]
    path = save_gif(frames, tmp_path / "anim.gif", nrow=2, scale=1, duration_ms=50, hold_last_ms=1000)
    with Image.open(path) as im:
        assert im.n_frames == 5
        assert im.size == (2 * 30 + 2, 2 * 30 + 2)
        assert im.info.get("loop") == 0
        im.seek(4)
        assert im.info["duration"] == 1000


def test_save_gif_with_captions(tmp_path):
    frames = [_images(4, seed=s) for s in range(3)]
    path = save_gif(frames, tmp_path / "anim.gif", nrow=2, scale=1, captions=["t=999", "t=500", "t=0"])
    with Image.open(path) as im:
        assert im.n_frames == 3
        assert im.width == 2 * 30 + 2 and im.height > 2 * 30 + 2


def test_save_gif_rejects_mismatched_frames(tmp_path):
    with pytest.raises(NoisecraftError):
        save_gif([_images(4), _images(2)], tmp_path / "a.gif")
    with pytest.raises(NoisecraftError):
        save_gif([_images(4)], tmp_path / "a.gif", captions=["a", "b"])


# ---------------------------------------------------------------- plots


def _stand_in_schedule(betas):
    a = torch.cumprod(1 - betas, 0)
    return types.SimpleNamespace(
        betas=betas, alphas_cumprod=a, sigmas=((1 - a) / a).sqrt(), log_snr=torch.log(a / (1 - a))
    )


def test_plot_schedules_writes_png(tmp_path):
    schedules = {
        "linear": _stand_in_schedule(torch.linspace(1e-4, 0.02, 100)),
        "scaled_linear": _stand_in_schedule(torch.linspace(0.00085**0.5, 0.012**0.5, 100) ** 2),
    }
    path = plot_schedules(schedules, tmp_path / "plots" / "schedules.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300


def test_moving_average():
    assert moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_plot_loss_curve_from_csv(tmp_path):
    csv_path = tmp_path / "log.csv"
    rows = ["step,loss,lr,images_per_s,elapsed_s"]
    rows += [f"{i},{1.0 / i + 0.01},0.0002,100.0,{i * 0.1:.1f}" for i in range(1, 51)]
    rows += ["51,nan,0.0002,100.0,5.1"]  # a NaN loss is skipped, not fatal
    csv_path.write_text("\n".join(rows) + "\n")
    with Image.open(plot_loss_curve(csv_path, tmp_path / "loss.png")) as im:
        assert im.format == "PNG"


def test_plot_loss_curve_missing_file(tmp_path):
    with pytest.raises(NoisecraftError):
        plot_loss_curve(tmp_path / "missing.csv", tmp_path / "loss.png")
