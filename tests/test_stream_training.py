"""Training streamed from tar shards (`noisecraft train --data`): exact resume on any number of data workers, after a
SIGKILL too, two torchrun processes equal to one, latent and text runs, unreadable samples weighted 0, and a resume on
other shards refused in one sentence.

Tiny U-Nets on scikit-learn's digits written as shards, one CPU thread.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_distributed import assert_same_weights, logged_steps, train
from test_trainer import assert_same_tensors, make_config, replace_steps, snapshot
from tiny_runs import train_tiny_vae_and_clip

from noisecraft.cli import main
from noisecraft.data import sources
from noisecraft.data.captions import class_captions
from noisecraft.data.datasets import load_dataset
from noisecraft.data.shards import write_shards
from noisecraft.data.sources import ShardDataset, open_shard_dataset
from noisecraft.data.stream import ShardLoader, ShardStream
from noisecraft.errors import NoisecraftError
from noisecraft.io.checkpoint import load_weights
from noisecraft.training.trainer import Trainer, resume_trainer

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py"
TINY = ["--batch-size", "16", "--base-channels", "16", "--channel-mults", "1,2", "--attention-levels", "1",
        "--sample-every", "0", "--checkpoint-every", "0", "--log-every", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The first 40 digits as PNGs in class folders, written as 5 shards of 8: with batches of 16, an epoch is two
    steps, so a few steps cross epochs (and the dropped tail of each)."""
    root = tmp_path_factory.mktemp("digits40")
    ds = load_dataset("digits").subset(40)
    for i, (image, label) in enumerate(zip(ds.images, ds.labels.tolist())):
        folder = root / "src" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), "L").save(folder / f"{i:02d}.png")
    write_shards(root / "src", root / "shards", shard_size=8)
    return root / "shards"


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """All 1500 training digits (with labels) in 5 shards."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards("digits", out, shard_size=300)
    return out


def streamed(folder, workers=0) -> ShardDataset:
    return open_shard_dataset(folder, workers=workers)


def shard_config(data: ShardDataset, **kw):
    config = make_config(**kw)
    config.data = replace(config.data, shards=str(data.folder), shards_fingerprint=data.fingerprint,
                          class_names=data.class_names)
    return config


# ---------------------------------------------------------------- exact resume


def test_resume_on_shards_is_bitwise_equal_to_a_straight_run_whatever_the_workers(small, tmp_path):
    # Dropout > 0 (the global RNG) and label dropout (the trainer's generator) both have to come back exactly; the
    # straight run reads in-process, the interrupted one through 1 worker and then 2.
    n = 3
    config = shard_config(streamed(small), conditional=True, dropout=0.2, steps=2 * n, label_dropout=0.3,
                          log_every=1)
    straight = Trainer(config, streamed(small, workers=0), tmp_path / "straight", progress=False)
    straight.fit()
    want = snapshot(straight)

    first = Trainer(replace_steps(config, n), streamed(small, workers=1), tmp_path / "resumed", progress=False)
    first.fit()
    torch.manual_seed(12345)   # whatever happens to the global RNG in between must not matter
    second = resume_trainer(tmp_path / "resumed", streamed(small, workers=2), progress=False, steps=2 * n)
    assert second.step == n
    second.fit()
    got = snapshot(second)
    for part in ("model", "ema", "optimizer", "generator", "torch_global"):
        assert_same_tensors(got[part], want[part], part)
    assert_same_tensors(load_weights(tmp_path / "resumed" / "model.safetensors"),
                        load_weights(tmp_path / "straight" / "model.safetensors"))
    assert logged_steps(tmp_path / "resumed") == list(range(1, 2 * n + 1))


def test_each_step_trains_on_the_streams_global_batch(small, tmp_path, monkeypatch):
    """Step k's pixels are global batch k of the ShardStream with the run's seed: the order the reader defines."""
    data = streamed(small)
    config = shard_config(data, steps=5, batch_size=16)
    trainer = Trainer(config, data, tmp_path / "run", progress=False)
    seen = []
    original = trainer.source.batch

    def spy(step, generator, drop, shard):
        got = original(step, generator, drop, shard)
        seen.append((step, got.x0.clone()))
        return got
    monkeypatch.setattr(trainer.source, "batch", spy)
    trainer.fit()
    assert [step for step, _ in seen] == list(range(5))
    for step, x0 in seen:
        want = next(iter(ShardLoader(ShardStream(data.manifest, 16, seed=config.train.seed, start=16 * step))))
        assert torch.equal(x0, want.pixels()), step


# ---------------------------------------------------------------- unreadable samples


def _corrupt_copy(folder: Path, out: Path) -> Path:
    """A copy of a shard set whose first shard's first image has its PNG data overwritten (same size, so the manifest
    still matches by size): the sample decodes to an error and must be skipped."""
    import shutil
    import tarfile
    shutil.copytree(folder, out)
    path = out / "shard-000000.tar"
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(path, "r+b") as f:
        f.seek(member.offset_data + 8)                    # keep the PNG signature, break the chunks
        f.write(b"\xff" * (member.size - 8))
    return out


@pytest.mark.parametrize("edm", [False, True])
def test_unreadable_rows_weigh_nothing_and_are_counted(small, tmp_path, edm):
    bad = streamed(_corrupt_copy(small, tmp_path / f"bad{edm}"))
    config = shard_config(bad, conditional=True, steps=4)
    if edm:
        config.diffusion = replace(config.diffusion, prediction="edm", schedule="edm", min_snr_gamma=None)
    results = []
    for fill in (0.0, 1e6):           # whatever an unreadable row holds must not change the step
        trainer = Trainer(config, bad, tmp_path / f"run{edm}{fill}", progress=False)
        images = trainer.source.images

        def poisoned(batch, generator, n, shard, images=images, fill=fill):
            x0 = images(batch, generator, n, shard)
            x0[~batch.valid] = fill
            return x0
        trainer.source.images = poisoned
        summary = trainer.fit()
        results.append((summary, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (first, weights), (second, poisoned_weights) = results
    assert first["skipped"] == second["skipped"] >= 1          # 40 samples, 32 per epoch, 4 steps: seen at least once
    assert np.isfinite(first["loss"]) and first["loss"] == second["loss"]
    assert_same_tensors(weights, poisoned_weights)


# ---------------------------------------------------------------- the command line


def test_resume_refuses_other_shards_and_the_wrong_kind_of_data_in_one_sentence(small, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(small), "--steps", "2", "--out", str(run), "--workers", "0", *TINY]) == 0
    out = capsys.readouterr().out
    assert "training on the shards in" in out and "done: 2 steps" in out
    other = tmp_path / "other"
    write_shards(small.parent / "src", other, shard_size=8, seed=1)        # the same images, shuffled otherwise
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "3", "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("noisecraft: error: the shards in") and "are not the ones this run was trained on" in err
    assert err.count("\n") == 0 and err.endswith(".") and ". " not in err
    memory = tmp_path / "memory"
    assert main(["train", "--dataset", "digits", "--steps", "1", "--out", str(memory), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(memory), "--steps", "2", "--data", str(small)]) == 2
    assert "in memory, not on shards; continue it without --data." in capsys.readouterr().err
    # the shards moved: --data points at them, the fingerprint vouches for them
    moved = tmp_path / "moved"
    small.parent.joinpath("shards").rename(moved)
    try:
        assert main(["train", "--resume", str(run), "--steps", "3", "--data", str(moved), "--workers", "0"]) == 0
    finally:
        moved.rename(small)
    with pytest.raises(NoisecraftError, match="has no manifest.json|does not exist"):
        open_shard_dataset(tmp_path / "nowhere")
    capsys.readouterr()
    assert main(["train", "--data", str(small), "--dataset", "digits", "--out", str(tmp_path / "both"), *TINY]) == 2
    assert "choose one source of images" in capsys.readouterr().err


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return train_tiny_vae_and_clip(tmp_path_factory.mktemp("components"))


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A folder of 24 small colour images with captions (two for one of them), as shards."""
    root = tmp_path_factory.mktemp("captioned")
    (root / "src").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(root / "src" / f"{i}.png")
        lines.append(f'{{"file": "{i}.png", "caption": "picture number {i % 5}"}}\n')
    lines.append('{"file": "0.png", "caption": "the first picture"}\n')
    (root / "src" / "captions.jsonl").write_text("".join(lines))
    write_shards(root / "src", root / "shards", shard_size=6)
    return root / "shards"


@pytest.mark.parametrize("kind", ["latent+class captions", "text on shard captions"])
def test_latent_and_text_runs_on_shards_resume_exactly(components, digits_shards, captioned, tmp_path, kind):
    vae, clip = components
    if kind.startswith("latent"):
        args = ["--data", str(digits_shards), "--latent", str(vae), "--text-encoder", str(clip)]
    else:
        args = ["--data", str(captioned), "--text-encoder", str(clip), "--label-dropout", "0.3"]
    args += ["--base-channels", "16", "--batch-size", "8", "--sample-every", "0", "--checkpoint-every", "0",
             "--log-every", "1", "--workers", "0"]
    assert main(["train", *args, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert main(["train", *args, "--steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--steps", "4", "--workers", "1"]) == 0
    for name in ("state/model.safetensors", "state/ema.safetensors", "model.safetensors"):
        assert_same_tensors(load_weights(tmp_path / "resumed" / name), load_weights(tmp_path / "straight" / name))
    assert not (tmp_path / "straight" / "cache").exists()       # nothing cached: encoded on the fly


def test_text_conditions_are_the_shard_captions_or_class_captions_with_dropout(captioned, digits_shards):
    calls = []

    def encoder(texts):          # a stand-in text encoder: the embedding of a text is its length
        calls.append(list(texts))
        return (torch.tensor([[[float(len(t))]] for t in texts]),)
    g = torch.Generator().manual_seed(0)
    for folder, class_texts in ((captioned, None), (digits_shards, class_captions("digits"))):
        data = open_shard_dataset(folder)
        batch = next(iter(ShardLoader(ShardStream(data.manifest, 8, seed=0))))
        texts = sources._StreamTexts(encoder, class_texts)
        kept = texts.texts(batch, g, 0.0, 8, slice(0, 8))
        if class_texts is None:
            assert kept == batch.captions and all(t.startswith(("picture number", "the first")) for t in kept)
        else:
            assert all(t in class_texts[label] for t, label in zip(kept, batch.labels.tolist()))
        assert texts.texts(batch, g, 1.0, 8, slice(0, 8)) == [""] * 8          # all dropped: the empty prompt
        calls.clear()
        contexts = texts(batch, g, 0.0, 8, slice(0, 8))
        assert contexts.shape == (8, 1, 1) and all(len(c) == 1 for c in calls)   # one caption per encoder call
        assert len(calls) == len({c[0] for c in calls})                           # each embedded once
        if class_texts is None:
            assert contexts.flatten().tolist() == [float(len(t)) for t in batch.captions]
            texts(batch, g, 0.0, 8, slice(0, 8))
            assert len(calls) == len(set(batch.captions))                         # the second time: cached


def test_text_runs_need_captions_or_labels(captioned, tmp_path):
    unlabelled = open_shard_dataset(captioned)
    assert not unlabelled.has_labels
    uncaptioned = replace(unlabelled, manifest=replace(unlabelled.manifest, captions=False))
    config = SimpleNamespace(latent=None, text=True, data=SimpleNamespace(conditional=False))
    with pytest.raises(NoisecraftError, match="neither captions nor labels"):
        sources._stream_source(config, uncaptioned, tmp_path, 0, 1)


# ---------------------------------------------------------------- SIGKILL and two processes


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("kill_resume", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("kill_resume", None)


def test_sigkill_on_the_streaming_path_resumes_bitwise_equal(harness, tmp_path):
    # Forked runs of the CLI reading the shards through one worker process; checkpoints every step, so a kill loses at
    # most the step in flight. Kill 1 is aimed at a part of a checkpoint write, kill 2 at a random moment.
    summary = harness.run_harness(tmp_path, kills=2, seed=1, checkpoint_every=1, steps=8, fork=True, verbose=False,
                                  shards=True, workers=1)
    assert summary["problems"] == [] and summary["ok"] and summary["kills"] == 2
    assert summary["max_lost"] <= 1
    assert len(summary["bitwise_equal"]) == 4 and all(summary["bitwise_equal"].values())
    assert logged_steps(tmp_path / "run") == list(range(1, 9))


def test_two_processes_on_shards_give_the_weights_of_one_and_resume_on_one(digits_shards, tmp_path):
    args = ["--data", str(digits_shards), "--conditional", "--workers", "1", *TINY]
    train(args + ["--steps", "6", "--out", str(tmp_path / "one")])
    done = train(args + ["--steps", "6", "--out", str(tmp_path / "two")], nproc=2)
    assert "2 processes" in done.stdout and done.stdout.count("done:") == 1
    assert_same_weights(tmp_path / "two", tmp_path / "one")
    assert logged_steps(tmp_path / "two") == list(range(1, 7))
    # half on two processes, the rest on one: the same run
    train(args + ["--steps", "3", "--out", str(tmp_path / "half")], nproc=2)
    train(["--resume", str(tmp_path / "half"), "--steps", "6", "--workers", "0",
           "--data-dir", os.environ.get("NOISECRAFT_DATA", "")])
    assert_same_weights(tmp_path / "half", tmp_path / "one")
