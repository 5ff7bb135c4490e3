"""The caption-embedding cache of a shard set (`noisecraft encode --text-encoder`, data/text_shards.py): its rows are
what the trainer would compute for each caption, training from it equals embedding on the fly, two torchrun
processes write what one does, and a stale cache is refused in one sentence. Also: the --max-bad limit is the total
over torchrun processes, and every process stops after the same step in the same sentence.

A tiny CLIP (and VAE) trained for a few steps on scikit-learn's 16×16 digits; small captioned and labelled shard sets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_distributed import free_port, train
from test_stream_training import _corrupt_copy, small  # noqa: F401 (small: a fixture, 40 digits in 5 shards of 8)
from test_trainer import assert_same_tensors
from tiny_runs import train_tiny_vae_and_clip

from noisecraft.cli import main
from noisecraft.data import sources
from noisecraft.data.captions import class_captions
from noisecraft.data.encoded import encode_prompts
from noisecraft.data.shards import manifest_fingerprint, read_manifest, write_shards
from noisecraft.data.sources import open_shard_dataset
from noisecraft.data.stream import ShardLoader, ShardStream
from noisecraft.data.text_shards import MANIFEST, open_text_cache, text_encoder_digest, text_file
from noisecraft.errors import NoisecraftError
from noisecraft.io.checkpoint import load_json, load_weights, save_weights
from noisecraft.models.text_encoders import load_text_encoder

TRAIN = ["--base-channels", "16", "--batch-size", "8", "--sample-every", "0", "--checkpoint-every", "0",
         "--log-every", "1", "--workers", "0", "--seed", "0"]
torchrun = pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None,
                              reason="torchrun is not available")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return train_tiny_vae_and_clip(tmp_path_factory.mktemp("components"))


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """24 small colour images with captions (two for image 0, one empty), as 4 shards of 6."""
    root = tmp_path_factory.mktemp("captioned")
    (root / "src").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(root / "src" / f"{i}.png")
        caption = "" if i == 7 else f"picture number {i % 5}"
        lines.append(json.dumps({"file": f"{i}.png", "caption": caption}) + "\n")
    lines.append('{"file": "0.png", "caption": "the first picture"}\n')
    (root / "src" / "captions.jsonl").write_text("".join(lines))
    write_shards(root / "src", root / "shards", shard_size=6)
    return root / "shards"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The 1500 training digits with labels (no captions: a text run draws class captions), as 5 shards of 300."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    assert main(["shard", "digits", "--out", str(out), "--shard-size", "300", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def cache(components, captioned, tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "cache"
    assert main(["encode", "--text-encoder", str(components[1]), "--data", str(captioned), "--out", str(out),
                 "--quiet"]) == 0
    return out


def _table(path: Path) -> tuple[list[str], torch.Tensor]:
    stored = load_weights(path)
    return json.loads(stored["texts"].numpy().tobytes().decode()), stored["contexts"]


# ---------------------------------------------------------------- writing


def test_each_caption_embeds_as_the_trainer_would(components, captioned, cache, capsys):
    encoder = load_text_encoder(components[1]).eval()
    manifest = read_manifest(captioned)
    meta = load_json(cache / MANIFEST)
    assert meta["shards_fingerprint"] == manifest_fingerprint(manifest) and meta["texts"] == "captions"
    assert meta["encoder"] == text_encoder_digest(encoder) and meta["count"] == 24
    assert (meta["max_length"], meta["dim"]) == (encoder.max_length, encoder.dim)
    stream = ShardStream(manifest, 1, decode=False)
    for s, info in enumerate(manifest.shards):
        texts, contexts = _table(cache / text_file(info.file))
        captions = {t for options, _ in stream.shard_texts(s) for t in options}
        assert texts[0] == "" and set(texts) == captions | {""} and len(texts) == len(set(texts))
        for text, row in zip(texts, contexts):    # the streamed trainer embeds one caption at a time
            torch.testing.assert_close(row, encode_prompts(encoder, [text])[0], atol=1e-5, rtol=1e-5)
    assert any("the first picture" in _table(cache / text_file(info.file))[0] for info in manifest.shards)
    # a second encode reuses every file
    before = {f.name: f.stat().st_mtime_ns for f in cache.glob("*.safetensors")}
    capsys.readouterr()
    assert main(["encode", "--text-encoder", str(components[1]), "--data", str(captioned), "--out", str(cache)]) == 0
    assert "captions: 4/4 shards (reused)" in capsys.readouterr().out
    assert before == {f.name: f.stat().st_mtime_ns for f in cache.glob("*.safetensors")}


def test_the_cached_source_gives_the_on_the_fly_conditions(components, captioned, digits, tmp_path):
    """Same draws, same captions, same embeddings (to float rounding), for shard captions and class captions."""
    encoder = load_text_encoder(components[1]).eval()
    for folder, class_texts in ((captioned, None), (digits, class_captions("digits"))):
        out = tmp_path / folder.parent.name
        assert main(["encode", "--text-encoder", str(components[1]), "--data", str(folder), "--out", str(out),
                     "--batch-size", "5", "--quiet"]) == 0
        cached = sources._CachedTexts(open_text_cache(out), class_texts)
        fly = sources._StreamTexts(encoder, class_texts)
        for first in (0, 8, 16):
            batch = next(iter(ShardLoader(ShardStream(read_manifest(folder), 8, seed=3, start=first))))
            g1, g2 = torch.Generator().manual_seed(first), torch.Generator().manual_seed(first)
            want = fly(batch, g1, 0.5, 8, slice(0, 8))
            got = cached(batch, g2, 0.5, 8, slice(0, 8))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert torch.equal(g1.get_state(), g2.get_state()) and bool(batch.valid.all()) and cached.bad == 0


def test_latents_and_captions_into_one_folder_and_two_processes_write_what_one_does(components, digits, tmp_path):
    vae, clip = components
    one = tmp_path / "one"
    assert main(["encode", str(vae), "--text-encoder", str(clip), "--data", str(digits), "--out", str(one),
                 "--quiet"]) == 0
    assert (one / "latents.json").is_file() and (one / MANIFEST).is_file()
    assert load_json(one / MANIFEST)["texts"] == "class captions of digits"
    texts = _table(one / "shard-000000.text.safetensors")[0]
    assert texts[0] == "" and set(texts[1:]) <= {t for c in class_captions("digits") for t in c}
    if importlib.util.find_spec("torch.distributed.run") is None:
        return
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "noisecraft", "encode", "--text-encoder", str(clip),
           "--data", str(digits), "--out", str(two)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("embedded the class captions") == 1           # only rank 0 reports
    for f in sorted(one.glob("*.text.safetensors")):
        assert_same_tensors(load_weights(two / f.name), load_weights(f))
    a, b = load_json(one / MANIFEST), load_json(two / MANIFEST)
    assert {k: v for k, v in a.items() if k != "files"} == {k: v for k, v in b.items() if k != "files"}


# ---------------------------------------------------------------- training from the cache


def _losses(run: Path) -> list[float]:
    return [float(line.split(",")[1]) for line in (run / "log.csv").read_text().splitlines()[1:]]


def test_training_from_the_cache_equals_embedding_on_the_fly_and_resumes_bit_for_bit(components, captioned, cache,
                                                                                    tmp_path, capsys):
    args = ["train", "--data", str(captioned), "--text-encoder", str(components[1]), "--label-dropout", "0.3",
            *TRAIN]
    assert main([*args, "--steps", "4", "--out", str(tmp_path / "fly")]) == 0
    assert main([*args, "--text-cache", str(cache), "--steps", "4", "--out", str(tmp_path / "cached")]) == 0
    assert "caption embeddings cached in" in capsys.readouterr().out
    assert load_json(tmp_path / "cached" / "config.json")["data"]["text_cache"] == str(cache.resolve())
    fly, cached = _losses(tmp_path / "fly"), _losses(tmp_path / "cached")
    assert len(fly) == len(cached) == 4
    np.testing.assert_allclose(cached, fly, rtol=1e-4, atol=1e-6)                # the loss at every step k
    a, b = load_weights(tmp_path / "fly" / "model.safetensors"), load_weights(tmp_path / "cached" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    # a run from the cache resumes bit for bit, even after the cache moved
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)
    assert main([*args, "--text-cache", str(moved), "--steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    elsewhere = tmp_path / "elsewhere"
    moved.rename(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--steps", "4", "--text-cache", str(elsewhere)]) == 0
    for name in ("state/model.safetensors", "state/ema.safetensors", "model.safetensors"):
        assert_same_tensors(load_weights(tmp_path / "resumed" / name), load_weights(tmp_path / "cached" / name))


# ---------------------------------------------------------------- refusing a stale cache


def _one_sentence(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("noisecraft: error: ") and err.endswith(".")
    return err


def test_a_stale_cache_is_refused_in_one_sentence(components, captioned, digits, cache, tmp_path, capsys):
    clip = components[1]

    def train_on(data, encoder, out, text_cache=cache, *extra):
        return main(["train", "--data", str(data), "--text-encoder", str(encoder), "--text-cache", str(text_cache),
                     "--steps", "1", *TRAIN, *extra, "--out", str(tmp_path / out)])
    # other shards: the same pictures written in another order
    other = tmp_path / "other"
    write_shards(captioned.parent / "src", other, shard_size=6, seed=1)
    assert train_on(other, clip, "a") == 2
    assert "was made from other shards" in _one_sentence(capsys)
    # another text encoder: one weight changed
    changed = tmp_path / "clip2"
    shutil.copytree(clip, changed)
    weights_file = changed / "text_encoder" / "model.safetensors"
    weights = load_weights(weights_file)
    name = next(k for k in weights if weights[k].is_floating_point())
    weights[name] = weights[name] + 1e-3
    save_weights(weights, weights_file)
    assert train_on(captioned, changed, "b") == 2
    assert "was made with another text encoder or tokenizer" in _one_sentence(capsys)
    # another max length or width, class captions instead of the shards' own
    fingerprint = manifest_fingerprint(read_manifest(captioned))
    opened, meta = open_text_cache(cache), load_json(cache / MANIFEST)
    length, dim, digest = meta["max_length"], meta["dim"], meta["encoder"]
    with pytest.raises(NoisecraftError, match=f"holds {length}x{dim} caption embeddings, but this run's text encoder"):
        opened.check(fingerprint, digest, 77, dim, "captions")
    with pytest.raises(NoisecraftError, match="embeds captions, but this run trains on class captions of digits"):
        opened.check(fingerprint, digest, length, dim, "class captions of digits")
    # a run without text, a run in memory, an unfinished cache, nothing to encode
    assert main(["train", "--data", str(captioned), "--text-cache", str(cache), "--steps", "1", *TRAIN,
                 "--out", str(tmp_path / "c")]) == 2
    assert "add --text-encoder SPEC" in _one_sentence(capsys)
    assert main(["train", "--dataset", "digits", "--text-encoder", str(clip), "--text-cache", str(cache), "--steps",
                 "1", *TRAIN, "--out", str(tmp_path / "d")]) == 2
    assert "train on the shards with --data SHARDS as well" in _one_sentence(capsys)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(cache, unfinished)
    (unfinished / MANIFEST).unlink()
    assert train_on(captioned, clip, "e", unfinished) == 2
    assert "its encoding did not finish" in _one_sentence(capsys)
    assert main(["encode", "--data", str(captioned), "--out", str(tmp_path / "f")]) == 2
    assert "say what to encode" in _one_sentence(capsys)


def test_a_caption_missing_from_the_cache_is_an_unusable_sample(components, captioned, cache, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    for f in sorted(broken.glob("*.text.safetensors"))[:2]:
        f.unlink()
    args = ["train", "--data", str(captioned), "--text-encoder", str(components[1]), "--text-cache", str(broken),
            *TRAIN, "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "unreadable samples skipped" in capsys.readouterr().out
    assert main([*args, "--max-bad", "1", "--out", str(tmp_path / "limited")]) == 2
    assert "more than the limit of 1" in _one_sentence(capsys)


# ---------------------------------------------------------------- --max-bad over torchrun processes


@torchrun
def test_the_bad_sample_limit_is_the_total_over_processes(small, tmp_path):
    """Shard 0 has its first 4 images broken; with batches of 8 on two processes, both ranks meet some of them, each
    no more than the limit of 3, together more: both stop after the same step, in the same sentence."""
    bad = tmp_path / "bad"
    shutil.copytree(small, bad)
    for _ in range(4):
        _corrupt_nth(bad / "shard-000000.tar", _)
    args = ["--data", str(bad), "--steps", "30", "--max-bad", "3", *TRAIN]
    one = train(args + ["--out", str(tmp_path / "one")], ok=False)
    two = train(args + ["--out", str(tmp_path / "two")], nproc=2, ok=False)
    # the processes share stderr: a line may start with the other's progress bar, so keep what follows the prefix
    sentences = [line[line.index("noisecraft: error:"):] for line in two.stderr.splitlines()
                 if "noisecraft: error:" in line]
    assert len(sentences) == 2 and sentences[0] == sentences[1], two.stderr[-3000:]
    assert "Stopped after 4 unusable samples of" in sentences[0] and "over 2 processes" in sentences[0]
    assert "more than the limit of 3" in sentences[0]
    assert "Stopped after skipping 4 unreadable samples" in one.stderr          # one process: the loader's sentence


def _corrupt_nth(path: Path, n: int) -> None:
    """Overwrite the PNG data (not its signature) of the n-th image of a tar shard, keeping its size."""
    import tarfile
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][n]
    with open(path, "r+b") as f:
        f.seek(member.offset_data + 8)
        f.write(b"\xff" * (member.size - 8))


def test_bad_counts_are_reduced_in_the_steps_own_all_reduce(small, tmp_path):
    """The trainer adds this process's count to the all-reduce of readable rows and checks the sum (a fake
    two-process reduction: the other process reports 5 bad samples)."""
    from test_trainer import make_config

    from noisecraft.training.trainer import Trainer
    data = open_shard_dataset(_corrupt_copy(small, tmp_path / "bad"), workers=0, max_bad=5)
    config = make_config(steps=5, batch_size=8)
    config.data = replace(config.data, shards=str(data.folder), shards_fingerprint=data.fingerprint,
                          class_names=data.class_names)
    trainer = Trainer(config, data, tmp_path / "run", progress=False)
    seen = []

    def all_reduce_sum(t):
        seen.append(float(t[-1]))
        other = torch.zeros_like(t)
        other[-1] = 5
        return t + other
    object.__setattr__(trainer.dist, "all_reduce_sum", all_reduce_sum)
    with pytest.raises(NoisecraftError, match="Stopped after 6 unusable samples"):
        trainer.fit()
    assert seen[-1] == 1
