"""Tests for noisecraft.data.datasets and .download (fast; real MNIST files come from ../shared/data)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from noisecraft.data import download as dl
from noisecraft.data.datasets import (
    DATASET_NAMES,
    FASHION_CLASSES,
    ImageDataset,
    load_dataset,
    parse_idx,
    resolve_data_dir,
)
from noisecraft.errors import NoisecraftError

# Read once at import, before the autouse fixture below clears NOISECRAFT_DATA for every test.
SHARED_DATA = Path(
    os.environ.get("NOISECRAFT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "mnist").is_dir() or not (SHARED_DATA / "fashion-mnist").is_dir(),
    reason=f"MNIST / Fashion-MNIST IDX files not found under {SHARED_DATA} (set NOISECRAFT_DATA to a folder "
    "holding mnist/ and fashion-mnist/)",
)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    # Tests must not depend on (or download into) the developer's own cache or mirrors.
    for var in ("NOISECRAFT_DATA", "NOISECRAFT_MNIST_URL", "NOISECRAFT_FASHION_MNIST_URL"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------------------------------
# ImageDataset and digits


def test_digits_shapes_range_labels():
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1500, 297)
    assert train.image_shape == (1, 16, 16) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    assert train.class_names == [str(i) for i in range(10)]
    assert set(train.labels.tolist()) == set(range(10))
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    assert train.name == "digits"


def test_digits_deterministic_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    test = load_dataset("digits", split="test")
    train_rows = {bytes(x) for x in a.images.flatten(1).numpy()}
    overlap = sum(bytes(x) in train_rows for x in test.images.flatten(1).numpy())
    assert overlap == 0


def test_digits_image_size():
    ds = load_dataset("digits", image_size=32)
    assert ds.image_shape == (1, 32, 32)


def test_batch_range_dtype_and_subset():
    ds = load_dataset("digits")
    x, y = ds.batch(torch.tensor([0, 5, 7]))
    assert x.dtype == torch.float32 and x.shape == (3, 1, 16, 16)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(y, ds.labels[[0, 5, 7]])
    full, _ = ds.batch(torch.arange(len(ds)))
    assert float(full.min()) == -1.0 and float(full.max()) == 1.0
    small = ds.subset(10)
    assert len(small) == 10 and torch.equal(small.images, ds.images[:10])
    assert len(ds.subset(10_000)) == len(ds)
    unlabelled = ImageDataset(ds.images[:4], None, [], "x")
    assert unlabelled.batch(torch.tensor([1, 2]))[1] is None and unlabelled.num_classes == 0
    assert "n=1500" in repr(ds)


def test_unknown_name_and_split():
    with pytest.raises(NoisecraftError, match="mnist") as info:
        load_dataset("cifar-100")
    assert all(n in str(info.value) for n in DATASET_NAMES) and "folder:PATH" in str(info.value)
    with pytest.raises(NoisecraftError, match="split"):
        load_dataset("digits", split="validation")


def test_resolve_data_dir(monkeypatch, tmp_path):
    assert resolve_data_dir() == Path.home() / ".cache" / "noisecraft"
    monkeypatch.setenv("NOISECRAFT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


# --------------------------------------------------------------------------------------------------
# Real MNIST / Fashion-MNIST from the shared folder


@needs_shared
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_shared_idx_datasets(name, monkeypatch):
    monkeypatch.setenv("NOISECRAFT_DATA", str(SHARED_DATA))
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_dataset(name, split=split, download=False)
        assert len(ds) == n and ds.image_shape == (1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64
        if name == "fashion-mnist":  # perfectly balanced by construction
            assert torch.equal(torch.bincount(ds.labels), torch.full((10,), n // 10))
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    assert ds.class_names == (FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)])


@needs_shared
def test_shared_checksums_match_constants():
    for name, source in dl.SOURCES.items():
        for file_name, sha in source.files.items():
            assert dl.content_sha256(SHARED_DATA / source.folder / file_name) == sha, file_name


@needs_shared
def test_mnist_image_size_resize(monkeypatch):
    monkeypatch.setenv("NOISECRAFT_DATA", str(SHARED_DATA))
    ds = load_dataset("mnist", split="test", download=False, image_size=32)
    assert ds.image_shape == (1, 32, 32) and len(ds) == 10000


def test_missing_files_without_download(tmp_path):
    with pytest.raises(NoisecraftError) as info:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / "mnist") in msg and "train-images-idx3-ubyte.gz" in msg


# --------------------------------------------------------------------------------------------------
# Corrupt IDX files


def _idx(ndim_dims: tuple[int, ...], payload: bytes) -> bytes:
    header = bytes([0, 0, 8, len(ndim_dims)]) + b"".join(d.to_bytes(4, "big") for d in ndim_dims)
    return header + payload


def _write_tiny_mnist(folder: Path, images: bytes | None = None, labels: bytes | None = None, n: int = 12):
    """A tiny but valid train split (n images of 28×28) in folder/mnist, optionally overriding bytes."""
    rng = np.random.default_rng(0)
    target = folder / "mnist"
    target.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = gzip.compress(_idx((n, 28, 28), rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()))
    if labels is None:
        labels = gzip.compress(_idx((n,), rng.integers(0, 10, n, dtype=np.uint8).tobytes()))
    (target / "train-images-idx3-ubyte.gz").write_bytes(images)
    (target / "train-labels-idx1-ubyte.gz").write_bytes(labels)
    # The test files only need to exist so that nothing tries to download them.
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (target / name).write_bytes(b"")


def test_tiny_valid_idx_loads(tmp_path):
    _write_tiny_mnist(tmp_path)
    ds = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert len(ds) == 12 and ds.image_shape == (1, 28, 28)


def test_truncated_idx_raises(tmp_path):
    raw = _idx((12, 28, 28), bytes(12 * 784))[:1016]
    _write_tiny_mnist(tmp_path, images=gzip.compress(raw))
    with pytest.raises(NoisecraftError, match=r"truncated \(expected 9408 bytes.*got 1000\).*re-download"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_truncated_gzip_raises(tmp_path):
    good = gzip.compress(_idx((12, 28, 28), bytes(range(256)) * 36 + bytes(192)))
    _write_tiny_mnist(tmp_path, images=good[: len(good) // 2])
    with pytest.raises(NoisecraftError, match="not a valid gzip file"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_wrong_magic_raises(tmp_path):
    # A label file where an image file belongs: magic 0x801 instead of 0x803.
    _write_tiny_mnist(tmp_path, images=gzip.compress(_idx((12,), bytes(12))))
    with pytest.raises(NoisecraftError, match="magic number 0x00000801 but expected 0x00000803"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_label_count_mismatch_and_bad_label(tmp_path):
    _write_tiny_mnist(tmp_path, labels=gzip.compress(_idx((11,), bytes(11))))
    with pytest.raises(NoisecraftError, match="12 images but .* 11 labels"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    _write_tiny_mnist(tmp_path, labels=gzip.compress(_idx((12,), bytes([42] * 12))))
    with pytest.raises(NoisecraftError, match="label 42"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_parse_idx_accepts_raw_bytes():
    arr = parse_idx(_idx((2, 3), bytes(range(6))), ndim=2)
    assert arr.shape == (2, 3) and arr[1, 2] == 5


def _load_corrupted(images: bytes) -> None:
    """Load a tiny MNIST whose image file is `images`: must give NoisecraftError or a sane dataset."""
    with tempfile.TemporaryDirectory() as tmp:
        _write_tiny_mnist(Path(tmp), images=images)
        try:
            ds = load_dataset("mnist", data_dir=tmp, download=False)
        except NoisecraftError as err:
            assert str(err).count("\n") == 0
            return
        assert ds.images.dtype == torch.uint8 and ds.images.ndim == 4 and len(ds) == 12


_GOOD_RAW = _idx((12, 28, 28), np.random.default_rng(1).integers(0, 256, 12 * 784, dtype=np.uint8).tobytes())
_GOOD_GZ = gzip.compress(_GOOD_RAW)
_FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(cut=st.integers(0, len(_GOOD_RAW)), compress=st.booleans())
def test_property_truncated_idx(cut, compress):
    data = _GOOD_RAW[:cut]
    _load_corrupted(gzip.compress(data) if compress else data)


@_FAST
@given(cut=st.integers(0, len(_GOOD_GZ) - 1))
def test_property_truncated_gzip(cut):
    _load_corrupted(_GOOD_GZ[:cut])


@_FAST
@given(patch=st.dictionaries(st.integers(0, 15), st.integers(0, 255), min_size=1, max_size=6))
def test_property_random_header_bytes(patch):
    data = bytearray(_GOOD_RAW)
    for pos, value in patch.items():
        data[pos] = value
    _load_corrupted(gzip.compress(bytes(data)))


@_FAST
@given(pos=st.integers(0, len(_GOOD_GZ) - 1), value=st.integers(0, 255))
def test_property_flipped_gzip_byte(pos, value):
    data = bytearray(_GOOD_GZ)
    data[pos] = value
    _load_corrupted(bytes(data))


# --------------------------------------------------------------------------------------------------
# Downloads against a local HTTP server


class _CountingHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def served(tmp_path):
    """A ThreadingHTTPServer on 127.0.0.1 serving a temp copy of the shared MNIST files."""
    root = tmp_path / "served"
    shutil.copytree(SHARED_DATA / "mnist", root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_CountingHandler, directory=str(root)))
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/", server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@needs_shared
def test_download_verifies_and_caches(served, tmp_path, monkeypatch):
    root, url, requests = served
    monkeypatch.setenv("NOISECRAFT_MNIST_URL", url)
    cache = tmp_path / "cache"
    ds = load_dataset("mnist", split="test", data_dir=cache)
    assert len(ds) == 10000
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(dl.MNIST_FILES)
    for name in dl.MNIST_FILES:  # arrived byte for byte
        assert (cache / "mnist" / name).read_bytes() == (root / name).read_bytes()
    assert len(requests) == 4
    load_dataset("mnist", split="train", data_dir=cache)
    assert len(requests) == 4  # cached: no second download


@needs_shared
def test_download_base_url_argument(served, tmp_path):
    _, url, requests = served
    folder = dl.ensure_files("mnist", tmp_path, base_url=url, files=["t10k-labels-idx1-ubyte.gz"])
    assert (folder / "t10k-labels-idx1-ubyte.gz").is_file() and requests == ["/t10k-labels-idx1-ubyte.gz"]


@needs_shared
@pytest.mark.parametrize("corrupt", ["content", "garbage"])
def test_download_checksum_mismatch(served, tmp_path, corrupt):
    root, url, _ = served
    bad = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one wrong label, still a perfectly valid gzip IDX file
    bad.write_bytes(gzip.compress(bytes(raw)) if corrupt == "content" else b"<html>not found</html>")
    cache = tmp_path / "cache"
    with pytest.raises(NoisecraftError) as info:
        dl.ensure_files("mnist", cache, base_url=url)
    msg = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and dl.MNIST_FILES["t10k-labels-idx1-ubyte.gz"] in msg
    if corrupt == "content":
        assert hashlib.sha256(bytes(raw)).hexdigest() in msg
    left = [p.name for p in (cache / "mnist").iterdir()]
    assert "t10k-labels-idx1-ubyte.gz" not in left and not [n for n in left if n.endswith(".part")]


def test_download_network_failure(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NoisecraftError, match="place the MNIST files manually in .*--data-dir") as info:
        dl.ensure_files("mnist", tmp_path, base_url=f"http://127.0.0.1:{port}/")
    assert str(tmp_path / "mnist") in str(info.value)
    assert not [p for p in (tmp_path / "mnist").iterdir()]


@needs_shared
def test_download_http_404(served, tmp_path):
    _, url, _ = served
    with pytest.raises(NoisecraftError, match="HTTP 404"):
        dl.ensure_files("mnist", tmp_path, base_url=url + "missing/")


# --------------------------------------------------------------------------------------------------
# Folder datasets


def _save(path: Path, size=(8, 8), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_folder_with_classes(tmp_path):
    for cls, n in (("dogs", 3), ("cats", 2)):
        for i in range(n):
            _save(tmp_path / cls / f"{i}.png", value=40 * i)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert ds.image_shape == (1, 8, 8) and len(ds) == 5
    with pytest.raises(NoisecraftError, match="no test split"):
        load_dataset(f"folder:{tmp_path}", split="test")


def test_folder_unlabelled_rgb(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.jpg", mode="RGB")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.labels is None and ds.class_names == [] and ds.image_shape == (3, 8, 8)


def test_folder_mixed_sizes(tmp_path):
    _save(tmp_path / "a.png", size=(8, 8))
    _save(tmp_path / "b.png", size=(12, 6))
    with pytest.raises(NoisecraftError, match="--image-size"):
        load_dataset(f"folder:{tmp_path}")
    ds = load_dataset(f"folder:{tmp_path}", image_size=4)
    assert ds.image_shape == (1, 4, 4) and len(ds) == 2


def test_folder_corrupt_png(tmp_path):
    _save(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(NoisecraftError, match="bad.png"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    with pytest.raises(NoisecraftError, match="bad.png"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_missing_and_empty(tmp_path):
    with pytest.raises(NoisecraftError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(NoisecraftError, match="holds no images"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(NoisecraftError, match="needs a path"):
        load_dataset("folder:")
