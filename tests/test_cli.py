"""Tests for the `noisecraft` command line, run in-process through noisecraft.cli.main.

A tiny U-Net trained for 20 steps on scikit-learn's bundled digits stands in for a real run; the
error cases check the promise of the CLI: exit status 2, one line "noisecraft: error: ...", no traceback,
and no file of an existing run touched.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noisecraft.cli import main
from noisecraft.io.checkpoint import load_json

TINY = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-levels", "1"]


@pytest.fixture(scope="module")
def run(_one_thread, tmp_path_factory) -> Path:
    """An unconditional tiny run: 20 steps, sample grids at steps 10 and 20."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--dataset", "digits", "--out", str(out), "--steps", "20", "--batch-size", "32",
                 *TINY, "--sample-every", "10"]) == 0
    return out


@pytest.fixture(scope="module")
def conditional_run(_one_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "cond"
    assert main(["train", "--dataset", "digits", "--conditional", "--out", str(out), "--steps", "6",
                 "--batch-size", "16", *TINY, "--sample-every", "0"]) == 0
    return out


def file_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_cleanly(capsys, argv) -> str:
    """Run the CLI, expect status 2 and exactly one 'noisecraft: error:' line on stderr; return that line."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()   # also splits on '\r', so a stray progress bar would show up here
    assert len(lines) == 1, lines
    assert lines[0].startswith("noisecraft: error: ")
    return lines[0]


def load_npz(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# ---------------------------------------------------------------- entry point


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "noisecraft", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "train", "sample", "viz"):
        assert command in proc.stdout
    assert proc.stdout.startswith("usage: noisecraft")


# ---------------------------------------------------------------- train and sample, end to end


def test_train_writes_a_complete_run(run):
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "model.safetensors", "state", "samples"} <= names
    assert (run / "state" / "COMPLETE").is_file()
    assert load_json(run / "state" / "trainer.json")["step"] == 20
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000010.png", "step_0000020.png"]
    with Image.open(run / "samples" / "step_0000020.png") as im:
        im.verify()
    model = load_json(run / "config.json")["model"]
    assert (model["base_channels"], model["channel_mults"], model["num_res_blocks"], model["attention_levels"]) == \
           (8, [1, 2], 1, [1])
    assert model["num_classes"] == 0
    assert load_json(run / "config.json")["train"]["steps"] == 20


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("ddpm", 10)])
def test_sample_writes_npz_grid_and_gif(run, tmp_path, capsys, sampler, steps):
    out, grid, gif = tmp_path / "s.npz", tmp_path / "g.png", tmp_path / "d.gif"
    assert main(["sample", str(run), "--n", "8", "--steps", str(steps), "--sampler", sampler,
                 "--out", str(out), "--grid", str(grid), "--gif", str(gif)]) == 0
    assert "8 samples" in capsys.readouterr().out
    arrays = load_npz(out)
    assert set(arrays) == {"images"}               # unconditional: no labels
    assert arrays["images"].dtype == np.uint8 and arrays["images"].shape == (8, 16, 16, 1)
    assert arrays["images"].std() > 0
    with Image.open(grid) as im:
        assert im.format == "PNG"
        im.load()
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames > 1
        im.seek(im.n_frames - 1)
        im.load()


def test_sample_is_reproducible_and_independent_of_batch_size(run, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["sample", str(run), "--n", "5", "--steps", "4", "--seed", "3", "--out", str(a)]) == 0
    assert main(["sample", str(run), "--n", "5", "--steps", "4", "--seed", "3", "--batch-size", "2",
                 "--out", str(b)]) == 0
    assert np.array_equal(load_npz(a)["images"], load_npz(b)["images"])


def test_conditional_sample_with_label_and_guidance(conditional_run, tmp_path):
    assert load_json(conditional_run / "config.json")["model"]["num_classes"] == 10
    out = tmp_path / "c.npz"
    assert main(["sample", str(conditional_run), "--n", "4", "--steps", "4", "--label", "3", "--guidance", "3",
                 "--out", str(out)]) == 0
    arrays = load_npz(out)
    assert arrays["images"].shape == (4, 16, 16, 1) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [3, 3, 3, 3]


def test_conditional_label_out_of_range(conditional_run, tmp_path, capsys):
    line = fails_cleanly(capsys, ["sample", conditional_run, "--n", "2", "--steps", "2", "--label", "10",
                                  "--out", tmp_path / "x.npz"])
    assert "0..9" in line
    assert not (tmp_path / "x.npz").exists()


def test_viz_forward_and_schedules(tmp_path, capsys):
    forward, schedules = tmp_path / "f.png", tmp_path / "s.png"
    assert main(["viz", "forward", "--dataset", "digits", "--out", str(forward)]) == 0
    assert main(["viz", "schedules", "--out", str(schedules)]) == 0
    for path in (forward, schedules):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 0
            im.load()
    assert str(forward) in capsys.readouterr().out


# ---------------------------------------------------------------- errors a user can cause


def test_unknown_dataset(tmp_path, capsys):
    line = fails_cleanly(capsys, ["train", "--dataset", "nope", "--out", tmp_path / "r", "--steps", "1"])
    assert "Unknown dataset 'nope'" in line and "digits" in line
    assert not (tmp_path / "r").exists()


def test_missing_mnist_files_with_no_download(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    line = fails_cleanly(capsys, ["train", "--dataset", "mnist", "--data-dir", empty, "--no-download",
                                  "--out", tmp_path / "r", "--steps", "1"])
    assert str(empty / "mnist") in line and "train-images-idx3-ubyte.gz" in line
    assert not (tmp_path / "r").exists()


def test_missing_mnist_files_and_failed_download(tmp_path, capsys, monkeypatch):
    # Point the download at a closed local port so the attempt fails at once.
    monkeypatch.setenv("NOISECRAFT_MNIST_URL", "http://127.0.0.1:9/")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "*")
    empty = tmp_path / "data"
    empty.mkdir()
    line = fails_cleanly(capsys, ["train", "--dataset", "mnist", "--data-dir", empty, "--out", tmp_path / "r",
                                  "--steps", "1"])
    assert "Could not download http://127.0.0.1:9/" in line and str(empty / "mnist") in line
    assert not (tmp_path / "r").exists()
    assert not [p for p in empty.rglob("*") if p.is_file()]     # no partial download left behind


def test_unknown_sampler(run, tmp_path, capsys):
    line = fails_cleanly(capsys, ["sample", run, "--n", "2", "--steps", "2", "--sampler", "nope",
                                  "--out", tmp_path / "x.npz"])
    assert "unknown sampler 'nope'" in line and "ddim" in line
    assert not (tmp_path / "x.npz").exists()


def test_corrupt_checkpoint(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    state_before = file_bytes(broken / "state")
    line = fails_cleanly(capsys, ["sample", broken, "--n", "2", "--steps", "2", "--out", tmp_path / "x.npz"])
    assert "model.safetensors" in line and "damaged" in line
    assert file_bytes(broken / "state") == state_before
    assert not (tmp_path / "x.npz").exists()


def test_weights_that_do_not_match_config(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = load_json(other / "config.json")
    config["model"]["base_channels"] = 16
    (other / "config.json").write_text(__import__("json").dumps(config))
    line = fails_cleanly(capsys, ["sample", other, "--n", "2", "--steps", "2", "--out", tmp_path / "x.npz"])
    assert "does not match" in line


def test_run_directory_without_config(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    line = fails_cleanly(capsys, ["sample", empty, "--out", tmp_path / "x.npz"])
    assert "no config.json" in line
    line = fails_cleanly(capsys, ["train", "--resume", empty])
    assert "no config.json" in line


def test_label_on_unconditional_model(run, tmp_path, capsys):
    line = fails_cleanly(capsys, ["sample", run, "--n", "2", "--steps", "2", "--label", "3",
                                  "--out", tmp_path / "x.npz"])
    assert "unconditional" in line and "--conditional" in line


def test_train_refuses_to_overwrite_an_existing_run(run, capsys):
    before = file_bytes(run)
    line = fails_cleanly(capsys, ["train", "--dataset", "digits", "--out", run, "--steps", "2", *TINY])
    assert "already holds a run" in line and "--resume" in line
    assert file_bytes(run) == before


def test_image_size_the_model_cannot_take(tmp_path, capsys):
    # Odd sizes train (the U-Net upsamples to each skip's size, tests/test_trainer.py); a size of 0 is refused.
    line = fails_cleanly(capsys, ["train", "--dataset", "digits", "--image-size", "0", "--out", tmp_path / "r",
                                  "--steps", "2"])
    assert "--image-size" in line
    assert not (tmp_path / "r").exists()


def test_sample_needs_an_output_and_train_needs_out(run, capsys):
    assert "--out samples.npz" in fails_cleanly(capsys, ["sample", run])
    assert "--out DIR" in fails_cleanly(capsys, ["train", "--dataset", "digits", "--steps", "1"])


def test_viz_forward_at_chosen_timesteps(tmp_path, capsys):
    from PIL import Image
    default, chosen = tmp_path / "default.png", tmp_path / "chosen.png"
    assert main(["viz", "forward", "--dataset", "digits", "--out", str(default)]) == 0
    assert main(["viz", "forward", "--dataset", "digits", "--t", "0", "500", "--out", str(chosen)]) == 0
    # three cells (x0, t=0, t=500) instead of nine: the strip is narrower
    assert Image.open(chosen).width < Image.open(default).width
    line = fails_cleanly(capsys, ["viz", "forward", "--dataset", "digits", "--t", "1000", "--out", tmp_path / "x.png"])
    assert "0..999" in line
