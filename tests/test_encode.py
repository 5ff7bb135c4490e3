"""The latent cache of a shard set (`noisecraft encode`, data/latent_shards.py): its rows are the VAE posteriors of
the images in each shard's order, two torchrun processes write what one does, a stale cache is refused in one
sentence, and training from it equals encoding on the fly and resumes bit for bit.

A tiny VAE on scikit-learn's 16×16 digits, written as 5 shards of 300; one CPU thread.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_distributed import free_port
from test_stream_training import _corrupt_copy
from test_trainer import assert_same_tensors
from tiny_runs import train_tiny_vae_and_clip

from noisecraft.cli import main
from noisecraft.data.encoded import _folder_digest
from noisecraft.data.latent_shards import MANIFEST, latent_file, open_latent_cache, vae_digest
from noisecraft.data.shards import manifest_fingerprint, read_manifest, write_shards
from noisecraft.errors import NoisecraftError
from noisecraft.io.checkpoint import load_json, load_weights, save_weights
from noisecraft.models.vae_loading import encode_dataset, load_vae

TRAIN = ["--base-channels", "16", "--batch-size", "8", "--sample-every", "0", "--checkpoint-every", "0",
         "--log-every", "1", "--workers", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return train_tiny_vae_and_clip(tmp_path_factory.mktemp("components"))[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "shards"
    assert main(["shard", "digits", "--out", str(out), "--shard-size", "300", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def cache(vae, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "cache"
    assert main(["encode", str(vae), "--data", str(shards), "--out", str(out), "--quiet"]) == 0
    return out


def _shard_images(path: Path) -> torch.Tensor:
    """The images of one tar shard in tar order, read with tarfile and Pillow (not through the stream reader)."""
    with tarfile.open(path) as tar:
        images = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("L"))
                  for m in tar.getmembers() if m.name.endswith(".png")]
    return torch.from_numpy(np.stack(images)).unsqueeze(1)


def _cache_tensors(folder: Path) -> dict:
    return {f.name: load_weights(f) for f in sorted(folder.glob("*.safetensors"))}


# ---------------------------------------------------------------- writing


def test_the_cache_holds_each_shards_posteriors_in_tar_order(vae, shards, cache, tmp_path, capsys):
    model, scale, _ = load_vae(vae)
    manifest = read_manifest(shards)
    meta = load_json(cache / MANIFEST)
    assert meta["count"] == meta["valid"] == 1500 and len(meta["files"]) == 5
    assert meta["shards_fingerprint"] == manifest_fingerprint(manifest)
    assert meta["vae"] == vae_digest(vae) and meta["scaling_factor"] == scale and meta["dtype"] == "float32"
    assert meta["image_shape"] == [1, 16, 16]
    for info in manifest.shards:
        stored = load_weights(cache / latent_file(info.file))
        mean, std = encode_dataset(model, _shard_images(shards / info.file))
        assert stored["mean"].shape == (info.count, *meta["latent_shape"]) == mean.shape
        torch.testing.assert_close(stored["mean"], mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored["std"], std, atol=1e-5, rtol=1e-5)
        assert stored["valid"].dtype == torch.uint8 and bool(stored["valid"].all())
    # a second encode into the same folder reuses every file
    before = {f.name: f.stat().st_mtime_ns for f in cache.glob("*.safetensors")}
    capsys.readouterr()
    assert main(["encode", str(vae), "--data", str(shards), "--out", str(cache)]) == 0
    assert "5/5 shards (reused)" in capsys.readouterr().out
    assert before == {f.name: f.stat().st_mtime_ns for f in cache.glob("*.safetensors")}
    # float16 halves the files, and stays within float16 rounding of the float32 cache
    half = tmp_path / "half"
    assert main(["encode", str(vae), "--data", str(shards), "--out", str(half), "--dtype", "float16", "--quiet"]) == 0
    first = latent_file(manifest.shards[0].file)
    low, full = load_weights(half / first), load_weights(cache / first)
    assert low["mean"].dtype == torch.float16
    torch.testing.assert_close(low["mean"].float(), full["mean"], atol=1e-3, rtol=1e-3)
    assert (half / first).stat().st_size < 0.6 * (cache / first).stat().st_size


def test_an_unreadable_image_is_a_zero_row_marked_invalid(vae, shards, tmp_path):
    bad = _corrupt_copy(shards, tmp_path / "bad")
    out = tmp_path / "cache"
    assert main(["encode", str(vae), "--data", str(bad), "--out", str(out), "--quiet"]) == 0
    assert load_json(out / MANIFEST)["valid"] == 1499
    first = load_weights(out / "shard-000000.latents.safetensors")
    assert first["valid"].tolist()[:2] == [0, 1] and int(first["valid"].sum()) == 299
    assert not first["mean"][0].any() and not first["std"][0].any()


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None, reason="torchrun is not available")
def test_two_torchrun_processes_write_the_cache_of_one(vae, shards, cache, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "noisecraft", "encode", str(vae), "--data", str(shards),
           "--out", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("encoded 1500 images") == 1          # only rank 0 reports
    assert_same_tensors(_cache_tensors(out), _cache_tensors(cache))
    one, two = load_json(cache / MANIFEST), load_json(out / MANIFEST)
    assert {k: v for k, v in one.items() if k != "files"} == {k: v for k, v in two.items() if k != "files"}
    assert [(f["file"], f["count"], f["valid"]) for f in one["files"]] == \
           [(f["file"], f["count"], f["valid"]) for f in two["files"]]


# ---------------------------------------------------------------- refusing a stale cache


def _one_sentence(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]        # (after a progress bar, if training started)
    assert err.startswith("noisecraft: error: ") and err.endswith(".")
    return err


def test_a_stale_cache_is_refused_in_one_sentence(vae, shards, cache, tmp_path, capsys):
    def train(data, vae_run, out):
        return main(["train", "--data", str(data), "--latent", str(vae_run), "--latents", str(cache), "--steps", "1",
                     *TRAIN, "--out", str(tmp_path / out)])
    # other shards: the same digits shuffled otherwise
    other = tmp_path / "other"
    write_shards("digits", other, shard_size=300, seed=1)
    assert train(other, vae, "a") == 2
    assert "was made from other shards" in _one_sentence(capsys)
    # another VAE: one weight changed
    changed = tmp_path / "vae2"
    shutil.copytree(vae, changed)
    weights = load_weights(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_weights(weights, changed / "model.safetensors")
    assert train(shards, changed, "b") == 2
    assert "was made with another VAE" in _one_sentence(capsys)
    # another image size, a pixel run, no shards, an unfinished cache
    with pytest.raises(NoisecraftError, match="latents of 1x16x16 images, but this run trains on"):
        open_latent_cache(cache).check(manifest_fingerprint(read_manifest(shards)), vae_digest(vae), (1, 8, 8),
                                       (4, 4, 4))
    assert main(["train", "--data", str(shards), "--latents", str(cache), "--steps", "1", *TRAIN,
                 "--out", str(tmp_path / "c")]) == 2
    assert "add --latent VAE_RUN" in _one_sentence(capsys)
    assert main(["train", "--dataset", "digits", "--latent", str(vae), "--latents", str(cache), "--steps", "1",
                 *TRAIN, "--out", str(tmp_path / "d")]) == 2
    assert "train on the shards with --data SHARDS as well" in _one_sentence(capsys)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(cache, unfinished)
    (unfinished / MANIFEST).unlink()
    assert main(["train", "--data", str(shards), "--latent", str(vae), "--latents", str(unfinished), "--steps", "1",
                 *TRAIN, "--out", str(tmp_path / "e")]) == 2
    assert "its encoding did not finish" in _one_sentence(capsys)


# ---------------------------------------------------------------- training from the cache


def test_training_from_the_cache_equals_encoding_on_the_fly(vae, shards, cache, tmp_path, capsys):
    args = ["train", "--data", str(shards), "--latent", str(vae), "--conditional", "--steps", "3", *TRAIN]
    assert main([*args, "--out", str(tmp_path / "fly")]) == 0
    assert main([*args, "--latents", str(cache), "--out", str(tmp_path / "cached")]) == 0
    assert "latents cached in" in capsys.readouterr().out
    config = load_json(tmp_path / "cached" / "config.json")
    assert config["data"]["latents"] == str(cache.resolve())
    # the digest the cache was made with is the digest of the run's own copy of the VAE (what training checks)
    assert _folder_digest(tmp_path / "cached" / "vae") == vae_digest(vae)
    for name in ("state/model.safetensors", "model.safetensors"):
        a, b = load_weights(tmp_path / "fly" / name), load_weights(tmp_path / "cached" / name)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-5, f"{name}: {worst}"


def test_training_from_the_cache_resumes_bit_for_bit_even_after_the_cache_moved(vae, shards, cache, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)
    args = ["train", "--data", str(shards), "--latent", str(vae), "--conditional", "--label-dropout", "0.3", *TRAIN]
    assert main([*args, "--latents", str(moved), "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--latents", str(moved), "--steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--steps", "3", "--workers", "1"]) == 0
    elsewhere = tmp_path / "elsewhere"
    moved.rename(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--steps", "4", "--latents", str(elsewhere)]) == 0
    for name in ("state/model.safetensors", "state/ema.safetensors", "model.safetensors"):
        assert_same_tensors(load_weights(tmp_path / "resumed" / name), load_weights(tmp_path / "straight" / name))
    assert not (tmp_path / "straight" / "cache").exists()


def test_a_cache_file_lost_mid_run_skips_its_samples(vae, shards, cache, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    for f in sorted(broken.glob("*.safetensors"))[:3]:
        f.unlink()
    args = ["train", "--data", str(shards), "--latent", str(vae), "--latents", str(broken), "--steps", "2", *TRAIN]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "unreadable samples skipped" in capsys.readouterr().out
    assert main([*args, "--max-bad", "1", "--out", str(tmp_path / "limited")]) == 2
    assert "without a usable latent" in _one_sentence(capsys)
    assert json.loads((cache / MANIFEST).read_text())["valid"] == 1500      # the original is untouched
