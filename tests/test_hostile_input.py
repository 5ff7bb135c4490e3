"""Hostile and broken input (issue 7): property tests over the dataset loaders, the run configs and the command line.

The promise under test: every case ends either in success (when the input happens to be valid) or in one clear
sentence — a NoisecraftError whose message is one line ending in a full stop, or, on the command line, exit status 2
with a last stderr line "noisecraft: error: ..." (or argparse's "noisecraft CMD: error: ...") and no traceback —
never another exception, never a huge allocation, and never a changed, created or deleted file among the inputs.

Hypothesis runs derandomized (the same cases on every machine). Each property counts the cases it ran; run

    python -m pytest tests/test_hostile_input.py -q -s

to see the counts printed by the last test.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import struct
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image, features

from noisecraft.cli import main
from noisecraft.config import RunConfig, load_run_config, make_run_config
from noisecraft.data.datasets import IMAGE_EXTENSIONS, load_dataset, parse_idx
from noisecraft.errors import NoisecraftError
from noisecraft.models.unet import UNet

CASES: collections.Counter = collections.Counter()   # hypothesis examples run, per property
VALID: collections.Counter = collections.Counter()   # ... of which the input turned out to be valid


# A deeper, random search when hunting bugs: NOISECRAFT_HOSTILE_SCALE=10 NOISECRAFT_HOSTILE_RANDOM=1.
SCALE = int(os.environ.get("NOISECRAFT_HOSTILE_SCALE", "1"))
RANDOM = os.environ.get("NOISECRAFT_HOSTILE_RANDOM") == "1"


def hostile(max_examples: int):
    """Derandomized hypothesis settings: the same cases everywhere, no example database, no deadline."""
    return settings(max_examples=max_examples * SCALE, deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def check_sentence(err: BaseException) -> str:
    """A user error: NoisecraftError, one line, one sentence ending in a full stop."""
    assert type(err) is NoisecraftError, f"{type(err).__name__}: {err}"
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    assert message.endswith("."), repr(message)
    assert len(message) < 1000, repr(message)
    return message


def outcome(fn, *args, **kwargs):
    """fn's result, or None after a clean one-sentence NoisecraftError; any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except NoisecraftError as err:
        check_sentence(err)
        return None


def snapshot(*folders: Path) -> dict:
    """Every file and folder under `folders`: path -> SHA-256 of the contents ("dir" for folders)."""
    state = {}
    for folder in folders:
        folder = Path(folder)
        for p in sorted(folder.rglob("*")):
            key = str(p)
            state[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return state


@contextlib.contextmanager
def untouched(*folders: Path):
    """Assert that nothing under `folders` is created, changed or deleted inside the block."""
    before = snapshot(*folders)
    yield
    after = snapshot(*folders)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files changed on disk: {changed[:5]}"


# ==================================================================================================
# 1. IDX files (MNIST-style)


def idx_bytes(magic_prefix: bytes, dtype: int, dims: list[int], payload: bytes) -> bytes:
    return magic_prefix + bytes([dtype, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def gzip_members(data: bytes, cut: int) -> bytes:
    """The same bytes as two concatenated gzip members (valid gzip that gzip.decompress joins)."""
    return gzip.compress(data[:cut]) + gzip.compress(data[cut:])


DIM = st.one_of(st.integers(0, 12), st.sampled_from([28, 60000, 2 ** 31, 2 ** 32 - 1, 10 ** 9]),
                st.integers(0, 2 ** 32 - 1))


@st.composite
def idx_files(draw):
    """(bytes, declared dims, ndim in the header): headers with every field possibly wrong, damaged payloads."""
    if draw(st.integers(0, 3)) == 0:   # a well-formed file of 1 or 3 dimensions, before the damage below
        ndim, prefix, dtype = draw(st.sampled_from([1, 3])), b"\0\0", 0x08
        dims = draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim))
        shown_ndim, size = ndim, math.prod(dims)
    else:
        ndim = draw(st.sampled_from([1, 3, 1, 3, 0, 2, 4, 255]))
        shown_ndim = min(ndim, 4)  # the header says ndim; at most 4 dimensions are written (a truncated header)
        prefix = draw(st.sampled_from([b"\0\0", b"\0\0", b"\0\0", b"\x1f\x8b", b"\xff\xfe", b"\0\1"]))
        dtype = draw(st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]))
        dims = draw(st.lists(DIM, min_size=shown_ndim, max_size=shown_ndim))
        declared = math.prod(dims)
        size = declared if declared <= 4096 and draw(st.booleans()) else draw(st.integers(0, 5000))
    payload = random.Random(draw(st.integers(0, 2 ** 16))).randbytes(size)
    data = prefix + bytes([dtype, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload
    damage = draw(st.sampled_from(["none", "none", "gzip", "gzip", "gzip", "cut", "append", "gzip-cut",
                                   "gzip-members", "gzip-twice", "random", "flip"]))
    if damage == "gzip":
        data = gzip.compress(data)
    elif damage == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif damage == "append":
        data = data + draw(st.binary(min_size=1, max_size=16))
    elif damage == "gzip-cut":
        packed = gzip.compress(data)
        data = packed[:draw(st.integers(0, len(packed)))]
    elif damage == "gzip-members":
        data = gzip_members(data, draw(st.integers(0, len(data))))
    elif damage == "gzip-twice":
        data = gzip.compress(gzip.compress(data))
    elif damage == "random":
        data = draw(st.binary(max_size=64))
    elif damage == "flip":
        packed = bytearray(gzip.compress(data))
        packed[draw(st.integers(0, len(packed) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(packed)
    return data, dims, ndim


@hostile(300)
@given(case=idx_files(), want=st.sampled_from([1, 3]))
def test_parse_idx_hostile_headers_fail_fast_and_cleanly(case, want):
    CASES["parse_idx: hostile IDX bytes"] += 1
    data, dims, ndim = case
    huge = math.prod(dims) > 10 ** 7
    if huge:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        array = outcome(parse_idx, data, ndim=want, source="test file")
        VALID["parse_idx: hostile IDX bytes"] += array is not None
    finally:
        if huge:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    # A header declaring 2^31 × 60000 × 60000 items is refused from its size alone: nothing close to the
    # declared size is ever allocated or decompressed.
    if huge:
        assert peak < 32 * 2 ** 20 + 4 * len(data), f"{peak} bytes allocated for a {len(data)}-byte file"
    assert time.perf_counter() - start < 5.0
    if array is not None:
        assert array.dtype == np.uint8 and array.ndim == want
        assert array.size == math.prod(array.shape)


@hostile(40)
@given(declared=st.sampled_from([(12, 28, 28), (1, 1, 1), (2 ** 31, 60000, 60000), (60000, 28, 28)]),
       inflated=st.sampled_from([10 ** 6, 3 * 10 ** 7]), wrapper=st.sampled_from(["gzip", "members"]))
def test_gzip_bomb_is_never_inflated_past_the_declared_size(declared, inflated, wrapper):
    """A small gzip file that inflates to far more than its header declares stops at the declared size."""
    CASES["parse_idx: gzip bombs"] += 1
    header = idx_bytes(b"\0\0", 8, list(declared), b"")
    data = gzip.compress(header) + _bomb(inflated) if wrapper == "members" else _bomb(inflated, header)
    tracemalloc.start()
    try:
        array = outcome(parse_idx, data, ndim=3, source="bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = math.prod(declared)
    if array is None:
        assert peak < 2 * min(expected, inflated) + 16 * 2 ** 20, peak
    else:  # the header happened to declare exactly what the stream holds
        assert array.shape == declared and expected == inflated


_BOMBS: dict = {}


def _bomb(n: int, header: bytes = b"") -> bytes:
    """`header` followed by n zero bytes, gzip-compressed in one member (about 1000:1), cached."""
    key = (n, header)
    if key not in _BOMBS:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        block, parts = bytes(2 ** 20), [packer.compress(header)]
        for start in range(0, n, len(block)):
            parts.append(packer.compress(block[:min(len(block), n - start)]))
        parts.append(packer.flush())
        _BOMBS[key] = b"".join(parts)
    return _BOMBS[key]


def _valid_idx_pair(n: int = 6, side: int = 28, seed: int = 0) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    images = idx_bytes(b"\0\0", 8, [n, side, side], rng.integers(0, 256, n * side * side, dtype=np.uint8).tobytes())
    labels = idx_bytes(b"\0\0", 8, [n], rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    return gzip.compress(images), gzip.compress(labels)


@hostile(120)
@given(case=idx_files(), which=st.sampled_from(["images", "labels", "both"]),
       name=st.sampled_from(["mnist", "fashion-mnist"]), split=st.sampled_from(["train", "test"]),
       image_size=st.sampled_from([None, None, 8, 3]))
def test_idx_loader_with_hostile_files_in_place(case, which, name, split, image_size):
    """load_dataset(..., download=False) over a data folder holding one or two hostile files: a dataset or a
    clean error, and the folder is left exactly as it was (no deletion, no re-download, no temp file)."""
    CASES["load_dataset: hostile IDX files in the data folder"] += 1
    data, _, _ = case
    good_images, good_labels = _valid_idx_pair()
    prefix = "train" if split == "train" else "t10k"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        folder.mkdir()
        for p in ("train", "t10k"):
            (folder / f"{p}-images-idx3-ubyte.gz").write_bytes(good_images)
            (folder / f"{p}-labels-idx1-ubyte.gz").write_bytes(good_labels)
        if which in ("images", "both"):
            (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(data)
        if which in ("labels", "both"):
            (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(data)
        with untouched(Path(tmp)):
            ds = outcome(load_dataset, name, split=split, data_dir=tmp, download=False, image_size=image_size)
        VALID["load_dataset: hostile IDX files in the data folder"] += ds is not None
        if ds is not None:
            assert ds.images.dtype == torch.uint8 and ds.images.ndim == 4 and ds.images.shape[1] == 1
            assert len(ds) == len(ds.labels) > 0 and int(ds.labels.max()) < ds.num_classes
            if image_size is not None:
                assert ds.images.shape[2:] == (image_size, image_size)


def test_idx_header_with_huge_dimensions_fails_before_allocating(tmp_path):
    """The example of the issue: a header claiming 2^31 × 60000 × 60000 items, raw and gzipped."""
    header = idx_bytes(b"\0\0", 8, [2 ** 31, 60000, 60000], bytes(100))
    for data in (header, gzip.compress(header)):
        tracemalloc.start()
        try:
            with pytest.raises(NoisecraftError, match=rf"truncated \(expected {2 ** 31 * 60000 ** 2} bytes") as err:
                parse_idx(data, ndim=3, source="MNIST file x")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        check_sentence(err.value)
        assert peak < 2 ** 20


# ==================================================================================================
# 2. Image folders


def _image_bytes(fmt: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        base = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        im = base.convert(mode) if mode != "P" else base.convert("RGB").quantize(8)
        if mode == "P" and rng.random() < 0.5:
            im.info["transparency"] = 0
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _png_header(w: int, h: int, color: int = 0) -> bytes:
    """A PNG whose IHDR declares w×h but whose data is a few bytes (decompression-bomb territory)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def _gif_header(w: int, h: int) -> bytes:
    """A GIF whose screen and first frame declare w×h (at most 65535²) with almost no data."""
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0)
            + b"\x08\x02\x4c\x01\x00;")


FORMATS = {"PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"], "JPEG": ["L", "RGB", "CMYK"],
           "BMP": ["1", "L", "P", "RGB"], "GIF": ["L", "P"]}
if features.check("webp"):
    FORMATS["WEBP"] = ["RGB", "RGBA"]
EXTENSION = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp"}
MUST_FAIL = {"random", "empty", "text", "bomb", "wrong-magic"}


@st.composite
def image_files(draw):
    """(relative path, bytes, kind): valid images of every mode, and broken files named like images."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "truncated", "flipped", "random", "empty", "text",
                                 "bomb", "wrong-magic"]))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    size = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    data = _image_bytes(fmt, mode, size, draw(st.integers(0, 1000)))
    if kind == "truncated":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "flipped":
        flipped = bytearray(data)
        flipped[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(flipped)
    elif kind == "random":
        data = b"\x01" + draw(st.binary(max_size=40))  # no image format starts with 0x01
    elif kind == "empty":
        data = b""
    elif kind == "text":
        data = b"this is not a picture\n" * draw(st.integers(1, 3))
    elif kind == "bomb":
        fmt = draw(st.sampled_from(["PNG", "GIF"]))
        w, h = draw(st.sampled_from([(20000, 20000), (60000, 60000), (100000, 1000), (2 ** 31 - 1, 2 ** 31 - 1)]))
        data = _png_header(w, h, draw(st.sampled_from([0, 2]))) if fmt == "PNG" else _gif_header(min(w, 65535),
                                                                                                  min(h, 65535))
    elif kind == "wrong-magic":
        data = b"\x00\x00\x00\x00" + data[4:]
    folder = draw(st.sampled_from(["", "", "a", "b", "a/deep", "b/deeper/still"]))
    ext = EXTENSION[fmt] if draw(st.integers(0, 4)) else draw(st.sampled_from(IMAGE_EXTENSIONS)).upper()
    name = f"{folder}/{draw(st.integers(0, 99))}{ext}".lstrip("/")
    return name, data, kind


@st.composite
def junk_entries(draw):
    """Things a loader must ignore or refuse cleanly: hidden files, non-images, folders named like images."""
    kind = draw(st.sampled_from(["hidden", "notes", "dir-named-png", "empty-dir", "macos-resource"]))
    folder = draw(st.sampled_from(["", "a", "c"]))
    return kind, folder


@hostile(120)
@given(files=st.lists(image_files(), min_size=1, max_size=5, unique_by=lambda f: f[0].lower()),
       junk=st.lists(junk_entries(), max_size=3), image_size=st.sampled_from([None, None, 8, 5]))
def test_folder_loader_with_hostile_images(files, junk, image_size):
    CASES["load_dataset folder: hostile image files"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for name, data, _ in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        for i, (kind, folder) in enumerate(junk):
            where = root / folder
            where.mkdir(parents=True, exist_ok=True)
            if kind == "hidden":
                (where / f".hidden{i}.png").write_bytes(b"junk")
            elif kind == "notes":
                (where / f"notes{i}.txt").write_text("not an image")
            elif kind == "dir-named-png":
                (where / f"folder{i}.png").mkdir(exist_ok=True)
            elif kind == "empty-dir":
                (where / f"empty{i}").mkdir(exist_ok=True)
            else:
                (where / f"._{i}.jpg").write_bytes(b"\0\5\26\7")
        with untouched(Path(tmp)):
            ds = outcome(load_dataset, f"folder:{root}", image_size=image_size)
        VALID["load_dataset folder: hostile image files"] += ds is not None
        if ds is not None:
            kinds = {kind for _, _, kind in files}
            assert not kinds & MUST_FAIL, f"a broken file was loaded: {sorted(kinds)}"
            assert ds.images.dtype == torch.uint8 and ds.images.ndim == 4 and ds.images.shape[1] in (1, 3)
            assert len(ds) == len(files) == len(ds.files)
            if image_size is not None:
                assert ds.images.shape[2:] == (image_size, image_size)
            if ds.labels is not None:
                assert len(ds.labels) == len(ds) and int(ds.labels.max()) < ds.num_classes


def test_decompression_bomb_png_is_one_sentence(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    with pytest.raises(NoisecraftError, match=r"bomb\.png declares more pixels than Pillow's safety limit") as err:
        load_dataset(f"folder:{tmp_path}")
    check_sentence(err.value)


# ==================================================================================================
# 3. Run configs


TINY_MODEL = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,))


@pytest.fixture(scope="module")
def valid_config() -> dict:
    """config.json of a tiny digits run, as `noisecraft train` writes it."""
    digits = load_dataset("digits").subset(64)
    return make_run_config(digits, model=TINY_MODEL, train=dict(steps=2, batch_size=8)).to_dict()


NUMBERS = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 4, 7, 8, 16, 2 ** 31, 10 ** 9, 10 ** 18, -10 ** 9, 0.5, -0.0, 1e308, 1e-320,
                     float("nan"), float("inf"), -float("inf"), True, False, 2.0]),
    st.integers(-3, 40))
JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=2)),
    max_leaves=5)
LISTS = st.one_of(st.lists(st.integers(-1, 5), max_size=5), st.lists(NUMBERS, max_size=3), st.just([]),
                  st.just([1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]), st.just([10 ** 6]))
VALUES = st.one_of(NUMBERS, NUMBERS, LISTS, JUNK, st.sampled_from(["", "1", "8", "cosine", "linear", "eps", "v",
                                                                   "x0", "nan", "additive", "hybrid", "vlb"]))


PLAUSIBLE = {
    "base_channels": st.sampled_from([4, 8, 12, 16, 24]), "num_res_blocks": st.integers(1, 2),
    "channel_mults": st.lists(st.integers(1, 3), min_size=1, max_size=4),
    "attention_levels": st.lists(st.integers(0, 3), max_size=3, unique=True),
    "num_heads": st.one_of(st.none(), st.integers(1, 4), st.lists(st.integers(1, 4), min_size=1, max_size=4)),
    "head_dim": st.sampled_from([2, 4, 8, 32]), "groups": st.sampled_from([1, 2, 4, 8]),
    "dropout": st.sampled_from([0.0, 0.5]), "time_conditioning": st.sampled_from(["scale_shift", "additive"]),
    "linear_projection": st.booleans(), "num_classes": st.sampled_from([0, 0, 1, 3]),
    "context_dim": st.sampled_from([None, None, 4]), "transformer_depth": st.integers(1, 2),
    "out_channels": st.sampled_from([None, 1, 2]), "norm_eps": st.sampled_from([1e-5, 1e-6, 1.0]),
}


def _dict_paths(doc, prefix=()):
    """Key paths to the objects (dicts) inside a JSON document, the document itself included."""
    if isinstance(doc, dict):
        yield prefix
        for key, value in doc.items():
            yield from _dict_paths(value, prefix + (key,))


@st.composite
def mutations(draw, base: dict):
    """A deep copy of `base` after 1 to 4 hostile edits: values replaced by junk or near-valid values, keys
    deleted or invented, sections removed, replaced or added; sometimes the whole document is junk."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "set", "set", "delete", "unknown", "section", "add-section",
                                   "whole", "tweak", "tweak", "tweak"]))
        if op == "tweak" and isinstance(doc, dict) and isinstance(doc.get("model"), dict):
            # plausible model settings, so that many configs stay valid and their networks get built and run
            key = draw(st.sampled_from(sorted(PLAUSIBLE)))
            doc["model"][key] = draw(PLAUSIBLE[key])
            continue
        sections = sorted(_dict_paths(doc))     # every object in the document, nested ones included
        if op in ("set", "delete", "unknown") and sections:
            section = doc
            for key in draw(st.sampled_from(sections)):
                section = section[key]
            if op == "unknown":
                section[draw(st.sampled_from(["extra", "Base_Channels", "", "model"]))] = draw(VALUES)
            elif section:
                key = draw(st.sampled_from(sorted(section)))
                if op == "delete":
                    del section[key]
                else:
                    section[key] = draw(VALUES)
        elif op == "section" and isinstance(doc, dict) and doc:
            key = draw(st.sampled_from(sorted(doc)))
            if draw(st.booleans()):
                del doc[key]
            else:
                doc[key] = draw(JUNK)
        elif op == "add-section" and isinstance(doc, dict):
            name = draw(st.sampled_from(["latent", "text", "bogus", "version"]))
            doc[name] = draw(st.one_of(JUNK, st.fixed_dictionaries(
                {"scaling_factor": NUMBERS, "latent_shape": LISTS}), st.fixed_dictionaries(
                {"max_length": NUMBERS, "dim": NUMBERS}), NUMBERS))
        elif op == "whole":
            doc = draw(JUNK)
    return doc


def config_bytes(draw, base: dict) -> bytes:
    """config.json contents: a hostile mutation as JSON (NaN and Infinity included), or bytes that are not JSON."""
    form = draw(st.sampled_from(["json"] * 6 + ["cut", "binary", "latin1", "empty"]))
    text = json.dumps(draw(mutations(base)))
    if form == "cut":
        return text.encode()[:draw(st.integers(0, len(text)))]
    if form == "binary":
        return draw(st.binary(max_size=64))
    if form == "latin1":
        return ("{\"model\": \"" + "\xe9\xff" + "\"}").encode("latin-1")
    if form == "empty":
        return b""
    return text.encode()


def exercise_run_config(config: RunConfig) -> None:
    """A config that loaded must describe a model that builds and runs (when it is small enough to try)."""
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()
    config.diffusion.make_schedule()
    c, h, w = config.model_shape
    if config.model.parameter_count() > 400_000 or h * w > 48 * 48:
        return
    model = UNet(config.model)
    x = torch.zeros(2, config.model.in_channels, h, w)
    cond = None
    if config.model.context_dim is not None:
        cond = torch.zeros(2, 3, config.model.context_dim)
    elif config.model.num_classes:
        cond = torch.tensor([0, config.model.num_classes])
    with torch.no_grad():
        y = model(x, torch.tensor([1.0, 500.0]), cond)
    assert y.shape == (2, config.model.out_channels, h, w) and torch.isfinite(y).all()


@hostile(200)
@given(data=st.data())
def test_run_config_hostile_mutations(valid_config, data):
    CASES["load_run_config + UNet: hostile config.json"] += 1
    raw = config_bytes(data.draw, valid_config)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(raw)
        with untouched(Path(tmp)):
            config = outcome(load_run_config, tmp)
            if config is not None:
                VALID["load_run_config + UNet: hostile config.json"] += 1
                outcome(exercise_run_config, config)


@hostile(80)
@given(tweaks=st.lists(st.sampled_from(sorted(PLAUSIBLE)), min_size=1, max_size=5, unique=True), data=st.data())
def test_every_model_config_that_validates_builds_and_runs(valid_config, tweaks, data):
    """Plausible model settings in every combination: validation either refuses them in one sentence, or the
    U-Net builds and runs on the config's own shape (no shape error deep inside the network)."""
    CASES["UNetConfig: plausible settings, validated -> builds"] += 1
    doc = json.loads(json.dumps(valid_config))
    for key in tweaks:
        doc["model"][key] = data.draw(PLAUSIBLE[key])
    if doc["model"].get("context_dim") is not None:
        doc["text"] = {"max_length": 3, "dim": doc["model"]["context_dim"]}
    config = outcome(RunConfig.from_dict, doc)
    if config is not None:
        VALID["UNetConfig: plausible settings, validated -> builds"] += 1
        exercise_run_config(config)


@hostile(60)
@given(field=st.sampled_from(["base_channels", "num_res_blocks", "channel_mults", "context_dim", "num_classes",
                              "transformer_depth", "head_dim", "in_channels", "out_channels"]),
       value=st.sampled_from([10 ** 9, 10 ** 6, 2 ** 20, 10 ** 18, [10 ** 6], [1] * 40, [2 ** 16, 2 ** 16]]))
def test_absurd_model_sizes_fail_before_allocating(valid_config, field, value):
    """base_channels = 10^9 and friends: a clear sentence from the settings alone, before any weight exists."""
    CASES["UNetConfig: absurd sizes"] += 1
    doc = json.loads(json.dumps(valid_config))
    doc["model"][field] = value
    if field == "context_dim":
        doc["model"]["attention_levels"], doc["text"] = [0, 1], {"max_length": 4, "dim": value}
    tracemalloc.start()
    start = time.perf_counter()
    try:
        config = outcome(RunConfig.from_dict, doc)
        if config is not None:
            config = outcome(UNet, config.model) if config.model.parameter_count() < 10 ** 7 else config
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5.0 and peak < 64 * 2 ** 20


# --------------------------------------------------------------------------------------------------
# The other run kinds: autoencoder (train-vae), CLIP (train-clip), variational diffusion (train-vdm)


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory) -> dict[str, Path]:
    """One-step tiny runs of train-vae, train-clip and train-vdm on 32 digits."""
    from noisecraft.data.captions import captions_for
    from noisecraft.models.vae import VAEConfig
    from noisecraft.training.clip_trainer import default_text_config, train_clip
    from noisecraft.training.vae_trainer import VAETrainConfig, train_vae
    from noisecraft.training.vdm_trainer import train_vdm

    root = tmp_path_factory.mktemp("runs")
    digits = load_dataset("digits").subset(32)
    train_vae(VAEConfig(block_out_channels=(8, 8), latent_channels=2, mid_attention=False),
              VAETrainConfig(steps=1, batch_size=8, scale_images=16, eval_images=8), digits, root / "vae",
              test_dataset=digits.subset(8), progress=False)
    train_vdm(digits, root / "vdm", steps=1, batch_size=8, fourier=(), progress=False, schedule_features=8,
              unet=dict(base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_levels=()))
    train_clip(digits, captions_for(digits), root / "clip", steps=1, batch_size=8, embed_dim=8, image_widths=(8,),
               text_config=default_text_config(width=16, layers=1, heads=2, max_length=8), progress=False)
    return {"vae": root / "vae", "vdm": root / "vdm", "clip": root / "clip"}


def _load_vae(run):
    from noisecraft.models.vae_loading import load_vae
    vae, scale, config = load_vae(run)
    assert math.isfinite(scale) and scale > 0
    c, h, w = config["data"]["image_shape"]        # what `viz latents` and latent training read
    f = vae.config.downsample_factor
    if h % f == 0 and w % f == 0 and c == vae.config.in_channels and h * w <= 64 * 64:
        with torch.no_grad():
            assert vae.decode(vae.encode(torch.zeros(1, c, h, w)).mode()).shape == (1, c, h, w)
    return True


def _load_vdm(run):
    from noisecraft.training.vdm_trainer import load_vdm
    model, config = load_vdm(run)
    c, h, w = model.config.image_shape
    if h * w <= 32 * 32:
        with torch.no_grad():
            terms = model.loss(torch.zeros(1, c, h, w, dtype=torch.uint8), torch.Generator().manual_seed(0))
        assert terms.total.shape == (1,)
    return True


def _load_clip(run):
    from noisecraft.training.clip_trainer import load_clip
    model, tokenizer = load_clip(run)
    assert model.encode_text(tokenizer(["a seven"], max_length=model.text_config.max_length)).shape[0] == 1
    return True


def _load_text_encoder(run):
    from noisecraft.models.text_encoders import load_text_encoder
    encoder = load_text_encoder(run)
    embeddings, _ = encoder(["a seven"])
    assert embeddings.shape[-1] == encoder.dim
    return True


# (run kind, the config file mutated) -> the loader that reads it
LOADERS = {("vae", "config.json"): _load_vae, ("vdm", "config.json"): _load_vdm,
           ("clip", "config.json"): _load_clip, ("clip", "text_encoder/text_encoder.json"): _load_text_encoder}


@hostile(150)
@given(which=st.sampled_from(sorted(LOADERS)), data=st.data())
def test_other_run_configs_hostile_mutations(other_runs, which, data):
    CASES["load_vae / load_vdm / load_clip: hostile config files"] += 1
    kind, target = which
    loader = LOADERS[which]
    original = other_runs[kind]
    base = json.loads((original / target).read_text())
    raw = config_bytes(data.draw, base)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / kind
        shutil.copytree(original, run)
        (run / target).write_bytes(raw)
        with untouched(run):
            VALID["load_vae / load_vdm / load_clip: hostile config files"] += outcome(loader, run) is not None


# ==================================================================================================
# 4. The command line


TINY = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-levels", "1"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A tiny 2-step digits run that every CLI case may point at; it must never change."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--dataset", "digits", "--out", str(out), "--steps", "2", "--batch-size", "8", *TINY,
                 "--sample-every", "0"]) == 0
    return out


ARGPARSE_ERROR = re.compile(r"^noisecraft( [\w-]+)*: error: ")


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """main(argv) -> (exit status, stderr); argparse's SystemExit becomes its status."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def assert_clean_cli_error(status, err: str, argv) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert status == 2, f"{argv}: status {status}, stderr {lines[-3:]}"
    assert lines, f"{argv}: no message"
    last = lines[-1]
    assert last.startswith("noisecraft: error: ") or ARGPARSE_ERROR.match(last), f"{argv}: {last!r}"
    if last.startswith("noisecraft: error: "):
        assert last.endswith("."), last
    return last


# Each flag's hostile values. Every one of them is invalid and refused before any real work starts, so no
# generated case can start a long job; the rest of each command line is tiny and writes into a temporary folder.
BAD_COUNT = ["-1", "0", "x", "nan", "1.5", "", "0x10", "1e3"]
BAD_FLOAT = ["nan", "inf", "-inf", "x", "", "-1"]
BAD_NAME = ["bogus", " ", "DDIM!!", "-"]


def bad_paths(tmp: Path, run: Path) -> list[str]:
    """Paths that are not what a command wants: missing, a file for a folder, an empty folder, the run's insides."""
    return [str(tmp / "missing"), str(tmp / "a-file.txt"), str(tmp / "empty-dir"), str(run / "config.json"),
            str(run / "state"), str(tmp / "missing" / "deeper"), str(tmp / "corrupt-run")]


def cli_table(tmp: Path, run: Path) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """command -> (tiny base argv, {flag: hostile values}); flag "" is the positional slot."""
    out, grid = str(tmp / "new-run"), str(tmp / "g.png")
    paths = bad_paths(tmp, run)
    common_train = {"--steps": BAD_COUNT + ["-99999999999"], "--batch-size": BAD_COUNT + ["99999999999"],
                    "--image-size": BAD_COUNT + ["100000", "10000000000"], "--lr": BAD_FLOAT,
                    "--minutes": BAD_FLOAT, "--device": BAD_NAME, "--dataset": BAD_NAME + ["folder:", "folder:" +
                                                                                           paths[0]]}
    return {
        "train": (["train", "--dataset", "digits", "--out", out, "--steps", "1", "--batch-size", "4", *TINY,
                   "--sample-every", "0"],
                  {**common_train, "--base-channels": BAD_COUNT + ["1000000000", "7"],
                   "--channel-mults": ["-1", "0", "1,0", "1,-2"], "--num-res-blocks": BAD_COUNT + ["100000"],
                   "--dropout": BAD_FLOAT + ["1", "2"], "--ema-decay": BAD_FLOAT + ["2"],
                   "--label-dropout": BAD_FLOAT + ["2"], "--min-snr-gamma": BAD_FLOAT,
                   "--warmup-steps": ["-1", "x", "nan"], "--schedule": BAD_NAME, "--prediction": BAD_NAME,
                   "--loss": BAD_NAME + ["hybrid"], "--timestep-sampling": BAD_NAME,
                   "--vlb-weight": BAD_FLOAT, "--seed": ["-1", "x"], "--sample-every": ["-1", "x"],
                   "--checkpoint-every": ["-1", "x"], "--log-every": ["-1", "x"],
                   "--latent": paths, "--text-encoder": paths + [str(run)],
                   "--attention-levels": ["9", "-1"], "--out": [str(run), str(run / "config.json")]}),
        "resume": (["train", "--resume", str(run)],
                   {"--steps": BAD_COUNT, "--minutes": BAD_FLOAT, "--image-size": BAD_COUNT + ["7", "100000"],
                    "--device": BAD_NAME, "--resume": paths}),
        "sample": (["sample", str(run), "--n", "2", "--steps", "1", "--grid", grid],
                   {"--n": BAD_COUNT, "--steps": BAD_COUNT + ["100000", "99999999999"], "--sampler": BAD_NAME,
                    "--batch-size": BAD_COUNT, "--eta": ["nan", "x", "-1"], "--spacing": BAD_NAME,
                    "--variance": BAD_NAME, "--dtype": BAD_NAME, "--label": ["0", "-1", "x"],
                    "--prompt": ["a cat"], "--guide": ["bogus", "x:", ":y", "noisecraft.guidance.objectives:nothing",
                                                       paths[0] + ".py:f"],
                    "--device": BAD_NAME, "--model": paths + [str(run / "model.safetensors")],
                    "": paths + [str(run / "model.safetensors")], "--guide-mode": BAD_NAME,
                    "--grid": [str(run), str(tmp / "a-file.txt" / "g.png")], "--negative-label": ["x"]}),
        "txt2img": (["txt2img", str(run), "a cat", "--n", "1", "--steps", "1", "--grid", grid],
                    {"--n": BAD_COUNT, "--steps": BAD_COUNT, "": paths, "--sampler": BAD_NAME}),
        "img2img": (["img2img", str(run), "--input", str(tmp / "in.png"), "--steps", "1", "--grid", grid],
                    {"--input": paths + [str(tmp / "junk.png")], "--strength": BAD_FLOAT + ["0", "2"],
                     "--steps": BAD_COUNT, "--n": ["0", "x"], "": paths}),
        "inpaint": (["inpaint", str(run), "--input", str(tmp / "in.png"), "--mask", str(tmp / "in.png"), "--steps",
                     "1", "--grid", grid],
                    {"--input": paths + [str(tmp / "junk.png")], "--mask": paths + [str(tmp / "junk.png")],
                     "--steps": BAD_COUNT, "": paths}),
        "interpolate": (["interpolate", str(run), "--n", "2", "--steps", "1", "--grid", grid],
                        {"--n": ["x", "nan", ""], "--steps": BAD_COUNT, "--seeds": ["x"], "": paths,
                         "--sampler": BAD_NAME}),
        "viz-forward": (["viz", "forward", "--dataset", "digits", "--out", str(tmp / "f.png")],
                        {"--index": ["-1", "100000", "x"], "--t": ["-1", "1000", "x"], "--T": ["0", "-5", "x", "1"],
                         "--schedule": BAD_NAME, "--image-size": BAD_COUNT, "--dataset": BAD_NAME}),
        "viz-reverse": (["viz", "reverse", str(run), "--steps", "1", "--n", "1", "--out", str(tmp / "r.png")],
                        {"--steps": BAD_COUNT, "--save-every": ["0", "-1", "x"], "--sampler": BAD_NAME,
                         "--label": ["0", "x"], "": paths}),
        "viz-latents": (["viz", "latents", str(tmp / "in.png"), "--out", str(tmp / "l.png")],
                        {"--vae": paths + [str(run)], "": paths + [str(tmp / "junk.png")]}),
        "train-vae": (["train-vae", "--dataset", "digits", "--out", out, "--steps", "1", "--batch-size", "4",
                       "--channels", "8,8"],
                      {**common_train, "--channels": ["a", "1,,2", "", "-8", "1000000000", "8,x"],
                       "--latent-channels": BAD_COUNT, "--layers-per-block": BAD_COUNT + ["1000000"],
                       "--norm-groups": BAD_COUNT + ["3"], "--kl-weight": BAD_FLOAT, "--gan-weight": BAD_FLOAT,
                       "--gan-start": ["-1", "x"], "--out": [str(run)]}),
        "train-clip": (["train-clip", "--dataset", "digits", "--out", out, "--steps", "1", "--batch-size", "4",
                        "--width", "16", "--layers", "1", "--heads", "2"],
                       {**common_train, "--batch-size": BAD_COUNT + ["1"], "--width": BAD_COUNT + ["1000000000"],
                        "--heads": BAD_COUNT + ["3"], "--layers": BAD_COUNT + ["100000"],
                        "--max-length": BAD_COUNT + ["100000000"], "--embed-dim": BAD_COUNT,
                        "--out": [str(run)]}),
        "train-vdm": (["train-vdm", "--dataset", "digits", "--out", out, "--steps", "1", "--batch-size", "4",
                       "--base-channels", "8", "--channel-mults", "1", "--attention-levels", "none",
                       "--fourier", ""],
                      {**common_train, "--fourier": ["a", "99", "-1", "1,x"], "--channel-mults": ["a", "-1", "0"],
                       "--base-channels": BAD_COUNT + ["1000000000"], "--attention-levels": ["a", "7"],
                       "--ema-decay": BAD_FLOAT + ["2"], "--warmup-steps": ["-1", "x"],
                       "--checkpoint-every": ["-1", "x"], "--resume": ["yes"], "--out": [str(run)]}),
        "eval-vdm": (["eval-vdm", str(run), "--n", "1"],
                     {"": paths, "--n": BAD_COUNT, "--split": BAD_NAME, "--batch-size": BAD_COUNT}),
        # (no --nll in the base: `eval --nll --ode --rtol nan` writes the --nll figure into the run before it
        # checks --rtol; reported)
        "eval": (["eval", str(run), "--n", "1", "--nll-steps", "1"],
                 {"": paths, "--n": ["0", "x", "nan"], "--split": BAD_NAME, "--batch-size": BAD_COUNT,
                  "--nll": ["+--nll --n=0", "+--nll --n=x", "+--nll --nll-steps=x"],
                  "--rtol": ["+--ode --rtol=nan", "+--ode --rtol=-1", "+--ode --rtol=inf", "+--ode --rtol=x"]}),
        "convert": (["convert", str(tmp / "missing-source"), str(tmp / "converted")],
                    {"": paths + [str(run), str(run / "model.safetensors")], "--to": BAD_NAME,
                     "--dtype": BAD_NAME, "--config": paths}),
        "train-classifier": (["train-classifier", "--dataset", "bogus", "--out", str(tmp / "cls")],
                             {"--steps": BAD_COUNT, "--dataset": BAD_NAME + ["folder:" + paths[0]]}),
    }


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag` set to `value` (replacing a present value; "" flag: the first positional after the
    command); a value starting with "+" is a list of words appended as they are."""
    argv = list(argv)
    if flag == "":
        position = 2 if argv[0] == "viz" else 1
        argv[position] = value
        return argv
    if value.startswith("+"):     # "+--ode --rtol=nan": extra words, appended as they are
        return argv + value[1:].split(" ")
    words = [f"{flag}={value}"]
    if flag in argv:
        i = argv.index(flag)
        return argv[:i] + words + argv[i + 2:]
    return argv + words


@st.composite
def cli_cases(draw, table):
    command = draw(st.sampled_from(sorted(table)))
    argv, flags = table[command]
    chosen = draw(st.lists(st.sampled_from(sorted(flags)), min_size=1, max_size=3, unique=True))
    for flag in chosen:
        argv = set_flag(argv, flag, draw(st.sampled_from(flags[flag])))
    return command, argv


def prepare_cli_folder(tmp: Path) -> None:
    """The inputs the commands read: an image, a junk .png, a file, an empty folder, a run with junk in it."""
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp / "in.png")
    (tmp / "junk.png").write_bytes(b"not a png")
    (tmp / "a-file.txt").write_text("just a file")
    (tmp / "empty-dir").mkdir()
    (tmp / "corrupt-run").mkdir()
    (tmp / "corrupt-run" / "config.json").write_text('{"model": [1, 2')
    (tmp / "corrupt-run" / "model.safetensors").write_bytes(b"\0" * 7)


@hostile(160)
@given(data=st.data())
def test_cli_hostile_arguments(cli_run, capsys, monkeypatch, data):
    """Each case sets one to three flags of a command to hostile values: exit status 2, one clean error line,
    no traceback; the existing run and the input files stay byte-identical."""
    CASES["noisecraft CLI: hostile arguments"] += 1
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        prepare_cli_folder(tmp)
        monkeypatch.chdir(tmp)   # an empty path means the current folder: keep that inside the temp folder too
        command, argv = data.draw(cli_cases(cli_table(tmp, cli_run)))
        inputs = sorted(p for p in tmp.iterdir())
        with untouched(cli_run, *[p for p in inputs if p.is_dir()]):
            before = {p: p.read_bytes() for p in inputs if p.is_file()}
            status, err = run_cli(capsys, argv)
            assert_clean_cli_error(status, err, argv)
            assert {p: p.read_bytes() for p in inputs if p.is_file()} == before
        # A failed `train` leaves no half-made run behind.
        assert not (tmp / "new-run" / "config.json").exists()


@hostile(40)
@given(data=st.data())
def test_cli_on_run_with_hostile_config(cli_run, capsys, monkeypatch, data):
    """`sample`, `viz reverse`, `eval` and `train --resume` on a copy of the run whose config.json is hostile:
    success on a valid config, else status 2 and one line; the run directory is never touched."""
    CASES["noisecraft CLI: run with hostile config.json"] += 1
    base = json.loads((cli_run / "config.json").read_text())
    raw = config_bytes(data.draw, base)
    command = data.draw(st.sampled_from(["sample", "viz", "eval", "resume"]))
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        monkeypatch.chdir(tmp)
        run = tmp / "run"
        shutil.copytree(cli_run, run)
        (run / "config.json").write_bytes(raw)
        argv = {"sample": ["sample", run, "--n", "1", "--steps", "1", "--grid", tmp / "g.png"],
                "viz": ["viz", "reverse", run, "--steps", "1", "--n", "1", "--out", tmp / "r.png"],
                "eval": ["eval", run, "--nll", "--n", "1", "--nll-steps", "1", "--batch-size", "1", "--n", "0"],
                # resume with an invalid budget: the config is read (and must fail cleanly or pass) first
                "resume": ["train", "--resume", run, "--steps", "0"]}[command]
        with untouched(run):
            status, err = run_cli(capsys, argv)
            VALID["noisecraft CLI: run with hostile config.json"] += status == 0
            if status != 0:
                assert_clean_cli_error(status, err, argv)


def test_cli_translates_os_errors_into_one_line(cli_run, capsys, tmp_path, monkeypatch):
    """main()'s last resort: an OSError anywhere (here: a folder where the grid file goes) is one line naming it."""
    (tmp_path / "g.png").mkdir()
    status, err = run_cli(capsys, ["sample", cli_run, "--n", "1", "--steps", "1", "--grid", tmp_path / "g.png"])
    last = assert_clean_cli_error(status, err, "grid into a folder")
    assert "g.png" in last


# Cases that used to end in a traceback or be accepted silently (found by the properties above and fixed):
# each must now be one clear line, and must not touch the run.
ONCE_BAD = [
    ["train", "--dataset", "digits", "--steps", "1", "--channel-mults", "1,,2"],
    ["train", "--dataset", "digits", "--steps", "1", "--channel-mults", "a"],
    ["train", "--dataset", "digits", "--steps", "1", "--attention-levels", "a"],
    ["train", "--dataset", "digits", "--steps", "1", "--attention-levels", "1.5"],
    ["viz", "schedules", "--T", "1000000000000"],
    ["sample", "RUN", "--n", "1", "--steps", "1", "--height", "100000", "--width", "100000"],
    ["sample", "RUN", "--n", "1", "--steps", "1", "--height", "0"],
    ["sample", "RUN", "--n", "1", "--steps", "1", "--guidance", "nan"],
    ["sample", "RUN", "--n", "1", "--steps", "1", "--grid-n", "-1"],
    ["sample", "RUN", "--n", "1", "--steps", "1", "--save-every", "-1"],
    ["sample", "RUN", "--n", "-1", "--steps", "1"],
    ["img2img", "RUN", "--input", "RUN/samples", "--n", "-1"],
    ["eval", "RUN", "--nll", "--n", "-1"],
    ["eval", "RUN", "--fid", "--samples", "0"],
    ["eval", "RUN", "--nll", "--ode", "--rtol", "nan"],
    ["train", "--resume", "RUN", "--lr", "0.1", "--steps", "3"],
    ["train", "--resume", "RUN", "--batch-size", "4", "--steps", "3"],
]


@pytest.mark.parametrize("argv", ONCE_BAD, ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_once_bad_cases_are_one_clear_line(cli_run, capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("RUN", str(cli_run)) for a in argv]
    if argv[0] in ("train", "viz") and "--resume" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    elif argv[0] in ("sample", "img2img"):
        argv += ["--grid", str(tmp_path / "g.png")]
    with untouched(cli_run):
        status, err = run_cli(capsys, argv)
        assert_clean_cli_error(status, err, argv)
    assert not (tmp_path / "g.png").exists()


def test_deeply_nested_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(NoisecraftError) as err:
        load_run_config(tmp_path)
    check_sentence(err.value)


def test_text_encoder_weight_mismatch_is_one_line(other_runs, tmp_path):
    from noisecraft.models.text_encoders import load_text_encoder
    run = tmp_path / "clip"
    shutil.copytree(other_runs["clip"], run)
    info = json.loads((run / "text_encoder" / "text_encoder.json").read_text())
    info["config"]["intermediate_size"] = 8
    (run / "text_encoder" / "text_encoder.json").write_text(json.dumps(info))
    with pytest.raises(NoisecraftError) as err:
        load_text_encoder(run)
    check_sentence(err.value)


# ==================================================================================================
# The count


def test_zz_report_how_many_cases_ran():
    """Printed with -s: the number of generated cases each property ran (the last test of the module)."""
    total = sum(CASES.values())
    width = max(map(len, CASES), default=0)
    print(f"\nhostile-input cases run: {total} ({sum(VALID.values())} of them valid input)")
    for name, n in sorted(CASES.items()):
        print(f"  {name:<{width}}  {n:4d} cases, {VALID[name]:4d} valid")
    assert all(n >= 10 for n in CASES.values()), CASES
