"""Shard sets: writing (tar layout, manifest, atomic files), streaming (exact pixels, order as a pure function of
(seed, epoch), rank partition, resume at any sample, DataLoader workers), bad data, and `noisecraft shard`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.cli import main
from noisecraft.data import stream as stream_module
from noisecraft.data.datasets import load_dataset
from noisecraft.data.shards import read_manifest, write_shards
from noisecraft.data.stream import ShardLoader, ShardStream, epoch_order, open_shards, rank_slice
from noisecraft.errors import NoisecraftError
from noisecraft.training.distributed import Distributed


def _image(rng, w, h, mode):
    shape = (h, w) if mode == "L" else (h, w, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class folders of PNGs of three sizes, grey and colour, with captions (one image has two, one none)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    lines = []
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir()
        for i in range(7):
            w, h = [(20, 16), (16, 16), (24, 30)][i % 3]
            _image(rng, w, h, "L" if i % 2 else "RGB").save(root / name / f"{i}.png")
            if (c, i) != (1, 6):
                lines.append({"file": f"{name}/{i}.png", "caption": f"a {name} number {i}"})
    lines.append({"file": "cat/0.png", "caption": "a second caption"})
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture(scope="module")
def folder_shards(folder, tmp_path_factory):
    return write_shards(folder, tmp_path_factory.mktemp("fs") / "shards", shard_size=4, shuffle=False)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    return write_shards("digits", tmp_path_factory.mktemp("ds") / "shards", shard_size=400, seed=3)


def _flat(loader):
    batches = list(loader)
    return (torch.cat([b.ids for b in batches]), torch.cat([b.images for b in batches]),
            torch.cat([b.labels for b in batches]), [c for b in batches for c in b.captions])


# --------------------------------------------------------------------------------------------------
# Writing


def test_digits_round_trip_is_exact_and_the_manifest_describes_the_shards(digits_shards):
    m = digits_shards
    ds = load_dataset("digits")
    assert (m.count, [s.count for s in m.shards], m.channels) == (1500, [400, 400, 400, 300], 1)
    assert m.image_sizes == {"16x16": 1500} and m.class_names == ds.class_names and m.labels and not m.captions
    for i, info in enumerate(m.shards):
        path = m.path(i)
        assert info.bytes == path.stat().st_size
        assert info.sha256 == stream_module.file_sha256(path)
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert tar.getmembers()[0].mtime == 0 and all(n.split(".")[1] in ("cls", "png") for n in names)
            assert names[:2] == [f"{i * 400:09d}.cls", f"{i * 400:09d}.png"]   # the image last in each sample
    ids, images, labels, _ = _flat(ShardLoader(ShardStream(m, 100, end=1500, window=None)))
    source = torch.randperm(1500, generator=torch.Generator().manual_seed(3))   # the writer's shuffle
    assert sorted(ids.tolist()) == list(range(1500))
    assert torch.equal(images, ds.images[source[ids]])                          # PNG is lossless: exact
    assert torch.equal(labels, ds.labels[source[ids]])


def test_folder_round_trip_gives_the_folder_datasets_pixels_labels_and_captions(folder, folder_shards):
    m = folder_shards
    assert (m.count, len(m.shards), m.class_names, m.captions, m.channels) == (14, 4, ["cat", "dog"], True, 3)
    assert m.image_sizes == {"20x16": 6, "16x16": 4, "24x30": 4} and m.raw["uncaptioned"] == 1
    assert m.raw["image_formats"] == {"png": 14}     # the files' own PNG bytes, copied
    ds = load_dataset(f"folder:{folder}", image_size=12)
    with pytest.raises(NoisecraftError, match="3 sizes"):
        ShardStream(m, 2)
    ids, images, labels, captions = _flat(ShardLoader(ShardStream(m, 14, image_size=12, end=14)))
    assert torch.equal(images, ds.images[ids]) and torch.equal(labels, ds.labels[ids])
    by_file = dict(zip([ds.files[i] for i in ids.tolist()], captions))
    assert by_file["dog/3.png"] == "a dog number 3" and by_file["dog/6.png"] == ""
    assert by_file["cat/0.png"] in ("a cat number 0", "a second caption")


def test_writing_is_reproducible_and_refuses_a_non_empty_folder(folder, folder_shards, tmp_path):
    again = write_shards(folder, tmp_path / "again", shard_size=4, shuffle=False)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in folder_shards.shards]
    with pytest.raises(NoisecraftError, match="not empty.*--overwrite"):
        write_shards(folder, tmp_path / "again", shard_size=4)
    (tmp_path / "again" / "notes.txt").write_text("mine")
    fewer = write_shards(folder, tmp_path / "again", shard_size=7, overwrite=True, image_format="jpg", quality=90)
    left = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert left == ["manifest.json", "notes.txt", "shard-000000.tar", "shard-000001.tar"]
    assert fewer.raw["image_formats"] == {"jpg": 14}


def test_an_unreadable_source_image_is_skipped_and_an_unfinished_set_is_refused(folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "dog" / "2.png").write_bytes(b"not a png")
    m = write_shards(src, tmp_path / "out", shard_size=5)
    assert m.count == 13 and m.raw["skipped"] == 1 and "dog/2.png" in m.raw["skipped_examples"][0]
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(NoisecraftError, match=r"no manifest.json \(its writing did not finish\)"):
        read_manifest(tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# Order, ranks, resume, workers


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    counts = [5, 7, 3, 9, 4]
    a = epoch_order(counts, seed=1, epoch=2, window=2)
    assert torch.equal(a, epoch_order(counts, seed=1, epoch=2, window=2))
    assert sorted(a.tolist()) == list(range(28))
    assert not torch.equal(a, epoch_order(counts, seed=1, epoch=3, window=2))
    assert not torch.equal(a, epoch_order(counts, seed=2, epoch=2, window=2))
    # window 1: each shard is read whole before the next one starts
    starts = np.cumsum([0] + counts)
    shard_of = np.searchsorted(starts, epoch_order(counts, 0, 0, window=1).numpy(), side="right") - 1
    assert (np.diff(shard_of) != 0).sum() == len(counts) - 1


def test_ranks_partition_every_global_batch_and_the_epoch(digits_shards):
    for n in range(9):
        for world in (1, 2, 3):
            assert [rank_slice(n, r, world) for r in range(world)] == \
                [Distributed(rank=r, world_size=world).shard(n) for r in range(world)]
    one = ShardStream(digits_shards, 64, seed=5)
    streams = [ShardStream(digits_shards, 64, seed=5, rank=r, world_size=3) for r in range(3)]
    assert one.samples_per_epoch == 1472 and one.steps_per_epoch == 23
    for epoch in (0, 1):
        seen = []
        for step in range(epoch * 23, (epoch + 1) * 23):
            parts = [s.batch_ids(step) for s in streams]
            assert torch.equal(torch.cat(parts), one.batch_ids(step))       # the same global batch on 1 or 3 ranks
            seen += torch.cat(parts).tolist()
        assert len(seen) == len(set(seen)) == 1472 and seen == one.epoch_ids(epoch)[:1472].tolist()
    # what the ranks really read in one epoch: disjoint, and together the epoch
    read = [_flat(ShardLoader(ShardStream(digits_shards, 64, seed=5, rank=r, world_size=2, end=1472)))[0].tolist()
            for r in range(2)]
    assert not set(read[0]) & set(read[1]) and sorted(read[0] + read[1]) == sorted(one.epoch_ids(0)[:1472].tolist())


def test_starting_at_any_sample_yields_the_tail_without_decoding_the_skipped_images(digits_shards, monkeypatch):
    end = 1472 + 200                                             # into the second epoch
    ids, images, labels, _ = _flat(ShardLoader(ShardStream(digits_shards, 64, seed=1, end=end)))
    decoded = []
    real = stream_module._open_image
    monkeypatch.setattr(stream_module, "_open_image", lambda f: decoded.append(1) or real(f))
    for k in (0, 37, 1472, 1500):
        decoded.clear()
        tail_ids, tail_images, tail_labels, _ = _flat(ShardLoader(ShardStream(digits_shards, 64, seed=1, start=k,
                                                                               end=end)))
        assert torch.equal(tail_ids, ids[k:]) and torch.equal(tail_images, images[k:])
        assert torch.equal(tail_labels, labels[k:]) and len(decoded) == end - k


def test_two_workers_give_the_same_batches_in_the_same_order(digits_shards):
    stream = ShardStream(digits_shards, 50, seed=2, rank=1, world_size=2, start=100, end=1100)
    alone = list(ShardLoader(stream, num_workers=0))
    pooled = list(ShardLoader(stream, num_workers=2))
    assert [b.position for b in pooled] == [b.position for b in alone] == list(range(100, 1100, 50))
    assert all(torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images) for a, b in zip(alone, pooled))


# --------------------------------------------------------------------------------------------------
# Bad data


def _member_offset(path, name):
    with tarfile.open(path) as tar:
        m = tar.getmember(name)
        return m.offset_data, m.size


def test_corrupt_truncated_and_missing_shards_are_skipped_with_counted_warnings(digits_shards, tmp_path, caplog):
    out = tmp_path / "bad"
    shutil.copytree(digits_shards.folder, out)
    offset, size = _member_offset(out / "shard-000000.tar", "000000005.png")
    with open(out / "shard-000000.tar", "r+b") as f:               # a corrupt image, the tar itself intact
        f.seek(offset)
        f.write(b"\xff" * size)
    offset, _ = _member_offset(out / "shard-000001.tar", "000000710.png")
    with open(out / "shard-000001.tar", "r+b") as f:               # cut inside the image of sample 310 of 400
        f.truncate(offset + 10)
    (out / "shard-000003.tar").unlink()                            # 300 samples gone
    with caplog.at_level(logging.WARNING, logger="noisecraft.data.stream"):
        manifest = open_shards(out)
        assert sum("missing" in r.message or "bytes but the manifest" in r.message for r in caplog.records) == 2
        caplog.clear()
        open_shards(out, verify="sha256")                           # also finds the image changed in place
        assert sum("does not match its sha256" in r.message for r in caplog.records) == 1
        caplog.clear()
        loader = ShardLoader(ShardStream(manifest, 100, end=1500, window=None), max_bad=1000)
        batches = list(loader)
    ids = torch.cat([b.ids for b in batches])
    valid = torch.cat([b.valid for b in batches])
    bad = set(ids[~valid].tolist())
    assert bad == {5} | set(range(710, 800)) | set(range(1200, 1500))
    assert loader.bad == 1 + 90 + 300
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in line for line in lines)     # one line per distinct problem
    assert any("sample 5 is not a readable image" in x for x in lines)
    assert any("shard-000001.tar is truncated after 310 samples" in x for x in lines)
    assert any("shard-000003.tar cannot be opened" in x for x in lines)
    assert all(not b.images[~b.valid].any() for b in batches)       # skipped rows are zeros; nothing else moved
    with pytest.raises(NoisecraftError, match=r"^Stopped after skipping 51 unreadable samples .* limit of 50") as e:
        list(ShardLoader(ShardStream(manifest, 100, end=1500, window=None), num_workers=2, max_bad=50))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_a_shard_that_disappears_mid_run_is_skipped(digits_shards, tmp_path):
    out = tmp_path / "vanish"
    shutil.copytree(digits_shards.folder, out)
    stream = ShardStream(out, 100, window=1, end=1400)
    last_shard = int(np.searchsorted([400, 800, 1200], int(stream.epoch_ids(0)[-1]), side="right"))
    loader = ShardLoader(stream, max_bad=500)
    seen = 0
    for i, batch in enumerate(loader):
        if i == 0:
            (out / f"shard-{last_shard:06d}.tar").unlink()
        seen += int(batch.valid.sum())
    lost = digits_shards.shards[last_shard].count
    assert loader.bad == lost - 100 and seen == 1400 - loader.bad   # end=1400 stops 100 samples short of it


def test_an_empty_caption_keeps_the_image_and_is_counted(folder_shards, caplog):
    with caplog.at_level(logging.WARNING, logger="noisecraft.data.stream"):
        loader = ShardLoader(ShardStream(folder_shards, 7, image_size=8, end=14))
        batches = list(loader)
    assert loader.empty_captions == 1 and loader.bad == 0 and all(b.valid.all() for b in batches)
    assert sum("empty caption" in r.getMessage() for r in caplog.records) == 1


def test_a_failure_or_death_inside_a_worker_comes_back_as_one_sentence(digits_shards, monkeypatch):
    def broken(im, size):
        raise ZeroDivisionError("deep inside")
    monkeypatch.setattr(stream_module, "_square", broken)
    with pytest.raises(NoisecraftError, match="ZeroDivisionError: deep inside") as e:
        next(iter(ShardLoader(ShardStream(digits_shards, 10, image_size=8), num_workers=1)))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(stream_module, "_square", lambda im, size: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(NoisecraftError, match="A data-loading worker for .* stopped .*exited unexpectedly"):
        next(iter(ShardLoader(ShardStream(digits_shards, 10, image_size=8), num_workers=1)))


# --------------------------------------------------------------------------------------------------
# The command


def test_the_shard_command_writes_a_set_and_refuses_bad_input_in_one_line(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shard", str(folder), "--out", str(out), "--shard-size", "5", "--image-size", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 shard(s), 14 images (8x8 ×14)" in printed and "2 classes" in printed
    assert read_manifest(out).image_sizes == {"8x8": 14}
    (tmp_path / "empty").mkdir()
    for argv, message in [
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "neither an existing folder nor a built-in"),
        (["mnsit", "--out", str(tmp_path / "x")], "neither an existing folder nor a built-in"),
        ([str(tmp_path / "empty"), "--out", str(tmp_path / "x")], "holds no images"),
        ([str(folder), "--out", str(out)], "exists and is not empty"),
        ([str(folder), "--out", str(folder / "inside")], "inside the source folder"),
        ([str(folder), "--out", str(tmp_path / "y"), "--split", "test"], "has no test split"),
    ]:
        assert main(["shard", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        main(["shard", str(folder), "--out", str(out), "--shard-size", "0"])
    assert "--shard-size: must be at least 1" in capsys.readouterr().err
