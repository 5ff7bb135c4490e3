"""CIFAR-10: the canonical pickle batches (read without running pickled code), the release archive, the lossy JPEG
copy, load_dataset's search and naming, captions, and the domain classifier on colour images. Synthetic files
throughout; the real JPEG copy is checked only when NOISECRAFT_DATA holds it."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.data import cifar
from noisecraft.data.captions import captions_for, class_prompts
from noisecraft.data.datasets import ImageDataset, load_dataset
from noisecraft.errors import NoisecraftError

SHARED_DATA = Path(os.environ.get("NOISECRAFT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
CLASSES = cifar.CIFAR10_CLASSES
REAL_CACHE_DIR = cifar.decoded_cache_dir    # kept before the fixture below points it at each test's folder


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No shared data folder, and decoded JPEG arrays cached in the test's own folder, not in ~/.cache."""
    monkeypatch.delenv("NOISECRAFT_DATA", raising=False)
    monkeypatch.setattr(cifar, "decoded_cache_dir", lambda: tmp_path / "decoded")


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message.rstrip(".")


# --------------------------------------------------------------------------------------------------
# Writing batches the way the canonical release was written: Python 2's cPickle, protocol 2, where a str is a
# BINSTRING (read back as bytes with encoding="bytes") and numpy 1 names its rebuilder numpy.core.multiarray.


class _Python2Pickler(pickle._Pickler):
    """Python 2 had no separate bytes type: every str (numpy's 'u1' and '|' included) was a BINSTRING."""

    def _save_bytes_as_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin-1")
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = dispatch[str] = _save_bytes_as_str


def python2_pickle(obj, numpy1_names: bool = True) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    data = out.getvalue()
    assert b"_codecs" not in data
    return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n") if numpy1_names else data


def synthetic_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"synthetic batch {seed}".encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def write_batches(folder: Path, n: int = 20, numpy1_names: bool = True) -> dict[str, dict]:
    """The canonical folder layout, with n images per batch; returns the batches written."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {name: synthetic_batch(n, seed) for seed, name in enumerate(cifar.BATCH_FILES["train"]
                                                                          + cifar.BATCH_FILES["test"])}
    for name, batch in batches.items():
        (folder / name).write_bytes(python2_pickle(batch, numpy1_names))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": n, b"num_vis": 3072}
    (folder / cifar.META_FILE).write_bytes(python2_pickle(meta))
    return batches


def expected(batches: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([batches[n][b"data"] for n in names])
    labels = np.concatenate([batches[n][b"labels"] for n in names])
    return data.reshape(-1, 3, 32, 32), labels


def load_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # synthetic batches are, rightly, "not the canonical release"
        return load_dataset(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Canonical batches


@pytest.mark.parametrize("numpy1_names", [True, False])
def test_canonical_folder_round_trip(tmp_path, numpy1_names):
    batches = write_batches(tmp_path / cifar.CANONICAL_FOLDER, numpy1_names=numpy1_names)
    with pytest.warns(UserWarning, match="not the canonical release"):
        train = load_dataset("cifar10", "train", data_dir=tmp_path)
    test = load_quietly("cifar10", "test", data_dir=tmp_path)
    assert isinstance(train, ImageDataset) and train.name == "cifar10" and train.class_names == CLASSES
    assert train.image_shape == (3, 32, 32) and len(train) == 100 and len(test) == 20
    images, labels = expected(batches, cifar.BATCH_FILES["train"])
    assert train.images.dtype == torch.uint8 and np.array_equal(train.images.numpy(), images)
    assert train.labels.dtype == torch.int64 and np.array_equal(train.labels.numpy(), labels)
    # Row-major planes: the first 1024 values of a row are the red channel, the first 32 of those the top row.
    assert np.array_equal(train.images[0, 0, 0].numpy(), batches["data_batch_1"][b"data"][0, :32])
    assert np.array_equal(train.images[0, 2, 31].numpy(), batches["data_batch_1"][b"data"][0, -32:])
    assert np.array_equal(test.images.numpy(), expected(batches, ["test_batch"])[0])
    resized = load_quietly("cifar10", "test", data_dir=tmp_path, image_size=16)
    assert resized.image_shape == (3, 16, 16)


def test_canonical_archive_is_read_without_extracting(tmp_path):
    batches = write_batches(tmp_path / "unpacked" / cifar.CANONICAL_FOLDER)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / cifar.CANONICAL_ARCHIVE, "w:gz") as archive:
        archive.add(tmp_path / "unpacked" / cifar.CANONICAL_FOLDER, arcname=cifar.CANONICAL_FOLDER)
    with pytest.warns(UserWarning, match="md5"):
        train = load_dataset("cifar10", "train", data_dir=data_dir)
    images = expected(batches, cifar.BATCH_FILES["train"])[0]
    assert train.name == "cifar10" and np.array_equal(train.images.numpy(), images)
    assert sorted(p.name for p in data_dir.iterdir()) == [cifar.CANONICAL_ARCHIVE]    # nothing extracted
    # An archive without test_batch says what it lacks.
    with tarfile.open(data_dir / cifar.CANONICAL_ARCHIVE, "w:gz") as archive:
        archive.add(tmp_path / "unpacked" / cifar.CANONICAL_FOLDER / "data_batch_1",
                    arcname=f"{cifar.CANONICAL_FOLDER}/data_batch_1")
    with pytest.raises(NoisecraftError, match="lacks test_batch") as info:
        load_quietly("cifar10", "test", data_dir=data_dir)
    assert _one_sentence(str(info.value))


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsNumpy:
    def __reduce__(self):
        return (np.frombuffer, (b"\x00" * 8, np.uint8))


def test_forbidden_globals_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / cifar.CANONICAL_FOLDER
    write_batches(folder)
    batch = synthetic_batch(20, 0)
    batch[b"data"] = _RunsACommand(marker)
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(NoisecraftError, match=r"data_batch_3 asks to build the Python object (posix|nt|os)\.system"
                       r".*refused without running it") as info:
        load_quietly("cifar10", "train", data_dir=tmp_path)
    assert not marker.exists() and _one_sentence(str(info.value))
    # The allowed set is exact: other numpy functions are refused too, and so is a global in batches.meta.
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _CallsNumpy(), b"labels": []}, protocol=4))
    with pytest.raises(NoisecraftError, match="numpy.frombuffer"):
        load_quietly("cifar10", "train", data_dir=tmp_path)
    (folder / cifar.META_FILE).write_bytes(pickle.dumps({b"label_names": _RunsACommand(marker)}))
    with pytest.raises(NoisecraftError, match="batches.meta asks to build"):
        load_quietly("cifar10", "test", data_dir=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update({b"data": b[b"data"][:, :3000]}), "uint8 array of shape 20×3000.*not uint8 N×3072"),
    (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "float32 array"),
    (lambda b: b.update({b"data": b[b"data"].tobytes()}), "holds a bytes as its data"),
    (lambda b: b[b"labels"].__setitem__(4, 10), "label 10, outside 0..9"),
    (lambda b: b[b"labels"].__setitem__(4, -1), "label -1, outside 0..9"),
    (lambda b: b[b"labels"].pop(), "holds 20 images but 19 labels"),
    (lambda b: b[b"labels"].__setitem__(0, "cat"), "labels that are not all integers"),
    (lambda b: b.pop(b"labels"), "no 'labels' entry"),
    (lambda b: b.update({b"fine_labels": b.pop(b"labels")}), "CIFAR-100"),
])
def test_bad_batches_are_refused(tmp_path, change, message):
    folder = tmp_path / cifar.CANONICAL_FOLDER
    write_batches(folder)
    batch = synthetic_batch(20, 7)
    change(batch)
    (folder / "test_batch").write_bytes(python2_pickle(batch))
    with pytest.raises(NoisecraftError, match=message) as info:
        load_quietly("cifar10", "test", data_dir=tmp_path)
    assert "test_batch" in str(info.value) and _one_sentence(str(info.value))


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", "not a readable pickle"),
    (python2_pickle([1, 2, 3]), "holds a list, not the dict"),
    (python2_pickle(synthetic_batch(20, 1))[:-100], "not a readable pickle"),
])
def test_damaged_files_are_refused(tmp_path, content, message):
    folder = tmp_path / cifar.CANONICAL_FOLDER
    write_batches(folder)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(NoisecraftError, match=message) as info:
        load_quietly("cifar10", "test", data_dir=tmp_path)
    assert _one_sentence(str(info.value))


def test_bad_meta_and_missing_batch(tmp_path):
    folder = tmp_path / cifar.CANONICAL_FOLDER
    write_batches(folder)
    (folder / cifar.META_FILE).write_bytes(python2_pickle({b"label_names": [b"a", b"b"]}))
    with pytest.raises(NoisecraftError, match="class names"):
        load_quietly("cifar10", "test", data_dir=tmp_path)
    (folder / cifar.META_FILE).unlink()      # without batches.meta the usual names are used
    assert load_quietly("cifar10", "test", data_dir=tmp_path).class_names == CLASSES
    (folder / "data_batch_2").unlink()
    with pytest.raises(NoisecraftError, match="lacks data_batch_2"):
        load_quietly("cifar10", "train", data_dir=tmp_path)


def test_canonical_checksums_are_recognised(tmp_path, monkeypatch):
    folder = tmp_path / cifar.CANONICAL_FOLDER
    write_batches(folder)
    monkeypatch.setattr(cifar, "BATCH_MD5", {n: cifar._md5((folder / n).read_bytes()) for n in cifar.BATCH_MD5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # the canonical bytes load without a warning
        assert len(load_dataset("cifar10", "test", data_dir=tmp_path)) == 20


# --------------------------------------------------------------------------------------------------
# The JPEG copy


def colour(label: int, index: int) -> tuple[int, int, int]:
    return (20 * label + 10, 200 - 15 * label, 40 + 100 * index)


def write_jpeg_archive(folder: Path, split: str, per_class: int = 2, classes=CLASSES, extra=None) -> None:
    """SPLIT/CLASS/NNNN.jpg members of flat colours, written in a shuffled order."""
    members = [(f"{split}/{c}/{i:04d}.jpg", colour(label, i)) for label, c in enumerate(classes)
               for i in range(per_class)]
    members = members[1::2] + members[0::2]
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"{split}.tar.gz", "w:gz") as archive:
        for name, rgb in members + (extra or []):
            buffer = io.BytesIO()
            if isinstance(rgb, bytes):
                buffer.write(rgb)
            else:
                Image.new("RGB", (32, 32), rgb).save(buffer, format="JPEG", quality=95)
            info = tarfile.TarInfo(name)
            info.size = buffer.tell()
            buffer.seek(0)
            archive.addfile(info, buffer)


def test_jpeg_copy_decodes_in_class_order_and_is_cached(tmp_path, monkeypatch):
    write_jpeg_archive(tmp_path / cifar.JPEG_FOLDER, "train", extra=[("train/README.txt", b"not a picture")])
    data = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert data.name == "cifar10-jpeg" and data.class_names == CLASSES and data.image_shape == (3, 32, 32)
    assert data.labels.tolist() == [label for label in range(10) for _ in range(2)]
    want = torch.tensor([colour(label, i) for label in range(10) for i in range(2)], dtype=torch.float32)
    assert (data.images.float().mean(dim=(2, 3)) - want).abs().max() < 4      # JPEG is lossy, but not that lossy
    (cached,) = (tmp_path / "decoded").glob("cifar10-jpeg-train-*.npz")
    monkeypatch.setattr(cifar, "decode_jpeg_split", lambda *a: pytest.fail("a cached split must not be decoded"))
    again = load_dataset("cifar10-jpeg", "train", data_dir=tmp_path)
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    cached.write_bytes(b"garbage")      # a damaged cache is decoded afresh
    monkeypatch.undo()
    monkeypatch.setattr(cifar, "decoded_cache_dir", lambda: tmp_path / "decoded")
    assert torch.equal(load_dataset("cifar10", "train", data_dir=tmp_path).images, data.images)


def test_jpeg_copy_unpacked_folder(tmp_path):
    write_jpeg_archive(tmp_path / "packed", "test", per_class=1)
    with tarfile.open(tmp_path / "packed" / "test.tar.gz") as archive:
        archive.extractall(tmp_path / cifar.JPEG_FOLDER, filter="data")
    data = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(data) == 10 and data.labels.tolist() == list(range(10)) and data.name == "cifar10-jpeg"


@pytest.mark.parametrize("classes, extra, message", [
    (CLASSES[:9], None, "holds class folders airplane.*not the 10 CIFAR-10 classes"),
    (CLASSES, [("train/cat/bad.jpg", b"\xff\xd8 broken jpeg")], "Cannot decode train/cat/bad.jpg"),
    (CLASSES, [("train/cat/big.jpg", None)], "is 33×32, not a 32×32"),
])
def test_bad_jpeg_archives_are_refused(tmp_path, classes, extra, message):
    if extra and extra[0][1] is None:
        buffer = io.BytesIO()
        Image.new("RGB", (33, 32)).save(buffer, format="JPEG")
        extra = [(extra[0][0], buffer.getvalue())]
    write_jpeg_archive(tmp_path / cifar.JPEG_FOLDER, "train", per_class=1, classes=classes, extra=extra)
    with pytest.raises(NoisecraftError, match=message) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert _one_sentence(str(info.value))


def test_search_prefers_canonical_and_names_what_is_missing(tmp_path):
    with pytest.raises(NoisecraftError, match="CIFAR-10 was not found") as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    text = str(info.value)
    assert cifar.CANONICAL_ARCHIVE in text and cifar.JPEG_FOLDER in text and _one_sentence(text)
    with pytest.raises(NoisecraftError, match="JPEG copy was not found"):
        load_dataset("cifar10-jpeg", "test", data_dir=tmp_path)
    write_jpeg_archive(tmp_path / cifar.JPEG_FOLDER, "test", per_class=1)
    assert load_dataset("cifar10", "test", data_dir=tmp_path).name == "cifar10-jpeg"
    write_batches(tmp_path / "cifar10" / cifar.CANONICAL_FOLDER)       # the cifar10/ sub-folder is searched too
    assert load_quietly("CIFAR-10", "test", data_dir=tmp_path).name == "cifar10"
    assert load_dataset("cifar10-jpeg", "test", data_dir=tmp_path).name == "cifar10-jpeg"


def test_captions():
    assert class_prompts("cifar10")[3] == "a photo of a cat"
    assert class_prompts("cifar10-jpeg") == class_prompts("cifar10")
    assert class_prompts("cifar10")[0] == "a photo of an airplane"
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    data = ImageDataset(images, torch.tensor([9, 0, 9]), list(CLASSES), "cifar10-jpeg")
    caps = captions_for(data)
    assert torch.equal(caps.choices[0], caps.choices[2]) and "truck" in caps.texts[int(caps.choices[0, 0])]


@pytest.mark.skipif(not (SHARED_DATA / cifar.JPEG_FOLDER / "train.tar.gz").is_file(),
                    reason=f"the CIFAR-10 JPEG copy is not in {SHARED_DATA} (set NOISECRAFT_DATA)")
def test_real_jpeg_copy(monkeypatch):
    # Decoded once per machine (about 10 s) and cached where noisecraft itself caches it, so reruns take ~1 s.
    monkeypatch.setattr(cifar, "decoded_cache_dir", REAL_CACHE_DIR)
    for split, n in (("train", 50000), ("test", 10000)):
        data = load_dataset("cifar10", split, data_dir=SHARED_DATA)
        assert data.name == "cifar10-jpeg" and len(data) == n and data.image_shape == (3, 32, 32)
        assert data.class_names == CLASSES and torch.bincount(data.labels).tolist() == [n // 10] * 10


# --------------------------------------------------------------------------------------------------
# The domain classifier on colour images


def test_classifier_recipe_and_domain_fid_on_rgb(tmp_path, monkeypatch):
    from noisecraft.evaluation import classifier as clf
    from noisecraft.evaluation.fid import domain_fid

    assert clf.recipe_for("CIFAR-10") == clf.recipe_for("cifar10-jpeg") == clf.CIFAR10_RECIPE
    assert clf.recipe_for("mnist") == clf.Recipe() and clf.CIFAR10_RECIPE.arch == "pooled"
    write_jpeg_archive(tmp_path / cifar.JPEG_FOLDER, "train", per_class=3)
    write_jpeg_archive(tmp_path / cifar.JPEG_FOLDER, "test", per_class=1)
    cache = tmp_path / "classifiers"
    # "cifar10" loads the JPEG copy here, so its classifier is cached (and scores are kept) as cifar10-jpeg's.
    directory = clf.classifier_directory("cifar10", tmp_path, cache, steps=3)
    assert directory.name == f"cifar10-jpeg-{clf.CLASSIFIER_VERSION}-s3-seed0"
    monkeypatch.setattr(clf, "CIFAR10_RECIPE", clf.Recipe("pooled", width=8, feature_dim=16, batch_size=16,
                                                          augment=True))
    model = clf.load_or_train_classifier("cifar10", data_dir=tmp_path, cache_dir=cache, steps=3, progress=False)
    meta = json.loads((directory / "classifier.json").read_text())
    assert meta["config"] == {"in_channels": 3, "num_classes": 10, "width": 8, "feature_dim": 16, "arch": "pooled"}
    assert meta["dataset"] == "cifar10-jpeg" and meta["augment"] and "test_accuracy" in meta
    monkeypatch.setattr(clf, "train_classifier", lambda *a, **k: pytest.fail("a cached classifier is not retrained"))
    again = clf.load_or_train_classifier("cifar10-jpeg", data_dir=tmp_path, cache_dir=cache, steps=3, progress=False)
    data = load_dataset("cifar10", "train", data_dir=tmp_path)
    feats = clf.classifier_features(model, data.images)
    assert feats.shape == (30, 16) and np.array_equal(feats, clf.classifier_features(again, data.images))
    same = domain_fid(data.images, data, model)
    darker = domain_fid((data.images // 3), data, model)
    assert same == pytest.approx(0.0, abs=1e-6) and darker > 1e-4
    with pytest.raises(NoisecraftError, match="3-channel"):
        domain_fid(data.images[:, :1], data, model)


def test_flip_and_shift():
    from noisecraft.evaluation.classifier import _flip_and_shift

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = _flip_and_shift(x, torch.Generator().manual_seed(3), pad=2)
    b = _flip_and_shift(x, torch.Generator().manual_seed(3), pad=2)
    assert a.shape == x.shape and torch.equal(a, b)
    for i in range(2):     # every output row is a shifted (maybe mirrored) stretch of the input's own values
        assert set(a[i].flatten().tolist()) <= set(x[i].flatten().tolist())
