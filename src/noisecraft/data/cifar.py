"""CIFAR-10 (Krizhevsky, 2009): 60,000 32×32 colour pictures in ten classes, from either of two layouts.

* The canonical python-pickle release: `cifar-10-python.tar.gz`, or its unpacked `cifar-10-batches-py/` folder
  (data_batch_1..5, test_batch, batches.meta). Each batch is a pickled dict whose b"data" is a uint8 N×3072 numpy
  array (per image the 1024 red, then green, then blue values, rows top to bottom) and whose b"labels" is a list
  of N class indices. Pickles can run code, so they are read with an unpickler that builds nothing but dicts,
  lists, strings, numbers and numpy arrays: any other global the file names is refused before it is looked up.
* A lossy JPEG copy: `cifar10-jpeg/train.tar.gz` and `test.tar.gz` holding SPLIT/CLASS/NNNN.jpg (or the folders
  they unpack to). The JPEGs are read straight from the archive (nothing is extracted) and decoded once; the
  decoded arrays are cached as an .npz under ~/.cache/noisecraft/decoded, keyed by the archive's SHA-256, so the
  next load takes a fraction of a second.

Both give uint8 images N×3×32×32 and int64 labels 0..9 in the usual class order (the sorted class names).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
import struct
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import NoisecraftError, brief
from ..io.checkpoint import atomic_write

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32

CANONICAL_FOLDER = "cifar-10-batches-py"
CANONICAL_ARCHIVE = "cifar-10-python.tar.gz"
JPEG_FOLDER = "cifar10-jpeg"
META_FILE = "batches.meta"
BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

# The published checksums of the canonical release (also quoted in the shared data folder's PROVENANCE.md). They
# only decide whether a warning says the files differ from it: a faithful re-pickle loads just the same.
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

# A canonical batch is about 31 MB; anything far larger is not one (and is not read into memory).
MAX_BATCH_BYTES = 256 << 20
# A 32×32 JPEG is about 1 KB; a member this large is not one of the pictures.
MAX_PICTURE_BYTES = 1 << 20
PICTURE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class CifarSplit:
    """One split as numpy arrays: images uint8 N×3×32×32, labels int64 N, and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str   # "canonical" (the pickle release) or "jpeg" (the lossy copy)


# --------------------------------------------------------------------------------------------------
# Finding the files


def find_cifar10(data_dir: Path, prefer: str | None = None) -> tuple[str, Path]:
    """Where CIFAR-10 lives under `data_dir` (or its `cifar10/` sub-folder): ("batches", folder),
    ("archive", cifar-10-python.tar.gz) or ("jpeg", cifar10-jpeg folder). The canonical release wins over the
    JPEG copy when both are present; `prefer="jpeg"` asks for the JPEG copy only."""
    data_dir = Path(data_dir)
    roots = [data_dir, data_dir / "cifar10"]
    if prefer != "jpeg":
        for root in roots:
            if (root / CANONICAL_FOLDER).is_dir():
                return "batches", root / CANONICAL_FOLDER
            if (root / CANONICAL_ARCHIVE).is_file():
                return "archive", root / CANONICAL_ARCHIVE
    for root in roots:
        folder = root / JPEG_FOLDER
        if folder.is_dir() and any((folder / f"{s}.tar.gz").is_file() or (folder / s).is_dir() for s in BATCH_FILES):
            return "jpeg", folder
    if prefer == "jpeg":
        raise NoisecraftError(
            f"The CIFAR-10 JPEG copy was not found in {data_dir}; put its train.tar.gz and test.tar.gz in "
            f"{data_dir / JPEG_FOLDER}, or pass --data-dir pointing at a folder with a '{JPEG_FOLDER}' sub-folder."
        )
    raise NoisecraftError(
        f"CIFAR-10 was not found in {data_dir} (it is never downloaded automatically); put the canonical "
        f"{CANONICAL_ARCHIVE} (or the {CANONICAL_FOLDER} folder it unpacks to) there, or the JPEG copy's "
        f"train.tar.gz and test.tar.gz in {data_dir / JPEG_FOLDER}, or pass --data-dir pointing at such a folder."
    )


def load_cifar10(split: str, data_dir: Path, prefer: str | None = None, cache_dir: Path | None = None) -> CifarSplit:
    """The `split` ("train" or "test") of CIFAR-10 found under `data_dir` (see `find_cifar10`)."""
    kind, path = find_cifar10(data_dir, prefer)
    if kind == "jpeg":
        return load_jpeg_copy(path, split, cache_dir)
    return load_canonical(path, split)


# --------------------------------------------------------------------------------------------------
# The canonical pickle batches


def _numpy_reconstruct():
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 spelling, then numpy 1
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("this numpy has no multiarray._reconstruct")


# The only globals a CIFAR-10 batch refers to: how numpy rebuilds a pickled array (numpy 1 writes numpy.core,
# numpy 2 writes numpy._core). Everything else a file asks for is refused without being imported.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that can build only plain containers and numpy arrays (see `_ALLOWED_GLOBALS`)."""

    def find_class(self, module, name):
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise _ForbiddenGlobal(module, name)
        return make()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


# What a damaged pickle can make the unpickler (and numpy's array rebuilding) raise.
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                  MemoryError, OverflowError, RecursionError, UnicodeDecodeError, struct.error)


def unpickle_batch(data: bytes, source: str):
    """Unpickle one CIFAR file's bytes with the restricted unpickler (dict keys stay bytes, as in Python 2)."""
    fix = "replace it with a copy of the canonical CIFAR-10 release"
    try:
        return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _ForbiddenGlobal as err:
        raise NoisecraftError(
            f"{source} asks to build the Python object {err.what}, which a CIFAR-10 file never holds, so it was "
            f"refused without running it (the file may be malicious); {fix}."
        ) from None
    except _PICKLE_ERRORS as err:
        raise NoisecraftError(f"{source} is not a readable pickle ({type(err).__name__}: {brief(err)}); {fix}.") \
            from None


def _plain_keys(obj, source: str, what: str) -> dict:
    if not isinstance(obj, dict):
        raise NoisecraftError(
            f"{source} holds a {type(obj).__name__}, not the dict of a CIFAR-10 {what}; replace it with a copy of "
            "the canonical CIFAR-10 release."
        )
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def parse_batch(obj, source: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch and return its images (uint8 N×3×32×32) and labels (int64 N)."""
    fix = "replace it with a copy of the canonical CIFAR-10 release"
    batch = _plain_keys(obj, source, "batch")
    if "data" not in batch or "labels" not in batch:
        missing = " and ".join(repr(k) for k in ("data", "labels") if k not in batch)
        hint = " (fine_labels: that is CIFAR-100)" if "fine_labels" in batch else ""
        raise NoisecraftError(f"{source} has no {missing} entry{hint}; {fix}.")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        got = (f"a {data.dtype} array of shape {'×'.join(map(str, data.shape))}" if isinstance(data, np.ndarray)
               else f"a {type(data).__name__}")
        raise NoisecraftError(f"{source} holds {got} as its data, not uint8 N×{PIXELS} pixels; {fix}.")
    if len(data) == 0:
        raise NoisecraftError(f"{source} holds no images; {fix}.")
    if isinstance(labels, (list, tuple)) and not all(type(v) is int for v in labels):
        raise NoisecraftError(f"{source} has labels that are not all integers; {fix}.")
    array = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
    if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise NoisecraftError(f"{source} has labels that are not a list of integers; {fix}.")
    if len(array) != len(data):
        raise NoisecraftError(f"{source} holds {len(data)} images but {len(array)} labels; {fix}.")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise NoisecraftError(f"{source} has label {bad}, outside 0..{num_classes - 1}; {fix}.")
    return data.reshape(len(data), *IMAGE_SHAPE), array.astype(np.int64)


def parse_meta(obj, source: str) -> list[str]:
    """The ten class names of an unpickled batches.meta."""
    meta = _plain_keys(obj, source, "batches.meta")
    names = meta.get("label_names")
    if (not isinstance(names, list) or len(names) != len(CIFAR10_CLASSES)
            or not all(isinstance(n, (bytes, str)) and n for n in names)):
        raise NoisecraftError(
            f"{source} does not list the {len(CIFAR10_CLASSES)} class names of CIFAR-10 under 'label_names'; "
            "replace it with a copy of the canonical CIFAR-10 release."
        )
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _read_batch_files(path: Path, wanted: list[str]) -> tuple[dict[str, bytes], str]:
    """The bytes of the `wanted` files (batches.meta optional) from a batches folder or the release archive, and a
    note of the first file that differs from the published checksums ("" when all match)."""
    found, note = {}, ""
    if path.is_dir():
        for name in wanted:
            file = path / name
            if not file.is_file():
                continue
            if file.stat().st_size > MAX_BATCH_BYTES:
                raise NoisecraftError(f"CIFAR-10 file {file} is far larger than a CIFAR-10 batch; replace it.")
            try:
                found[name] = file.read_bytes()
            except OSError as err:
                raise NoisecraftError(f"Cannot read CIFAR-10 file {file} ({err.strerror or err}); check its "
                                      "permissions.") from None
        for name in wanted:
            if name in BATCH_MD5 and name in found and _md5(found[name]) != BATCH_MD5[name]:
                note = note or f"{name} has md5 {_md5(found[name])}, not {BATCH_MD5[name]}"
        return found, note
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
        if digest.hexdigest() != ARCHIVE_MD5:
            note = f"{path.name} has md5 {digest.hexdigest()}, not {ARCHIVE_MD5}"
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) != 2 or parts[0] != CANONICAL_FOLDER or parts[1] not in wanted:
                    continue
                if member.size > MAX_BATCH_BYTES:
                    raise NoisecraftError(f"{member.name} in {path} is far larger than a CIFAR-10 batch; replace "
                                          "the archive with the canonical release.")
                found[parts[1]] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise NoisecraftError(
            f"Cannot read the CIFAR-10 archive {path} ({type(err).__name__}: {brief(err)}); replace it with the "
            "canonical cifar-10-python.tar.gz."
        ) from None
    return found, note


def load_canonical(path: Path, split: str) -> CifarSplit:
    """One split of the python-pickle release, from its `cifar-10-batches-py` folder or `cifar-10-python.tar.gz`."""
    path = Path(path)
    names = BATCH_FILES[split]
    found, note = _read_batch_files(path, names + [META_FILE])
    where = (lambda n: f"CIFAR-10 file {path / n}") if path.is_dir() else \
        (lambda n: f"CIFAR-10 file {CANONICAL_FOLDER}/{n} in {path}")
    missing = [n for n in names if n not in found]
    if missing:
        inside = f"the folder {path}" if path.is_dir() else f"the archive {path}"
        raise NoisecraftError(f"{inside} lacks {', '.join(missing)}; put the complete canonical CIFAR-10 release "
                              "there.")
    class_names = (parse_meta(unpickle_batch(found[META_FILE], where(META_FILE)), where(META_FILE))
                   if META_FILE in found else list(CIFAR10_CLASSES))
    parts = [parse_batch(unpickle_batch(found.pop(n), where(n)), where(n), len(class_names)) for n in names]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    if note:
        warnings.warn(f"The CIFAR-10 files in {path} are not the canonical release ({note}); they load, but "
                      "numbers measured on them need not match published CIFAR-10 results.", stacklevel=3)
    return CifarSplit(np.ascontiguousarray(images), labels, class_names, "canonical")


# --------------------------------------------------------------------------------------------------
# The JPEG copy


def decoded_cache_dir() -> Path:
    """Where decoded JPEG-copy arrays are cached: ~/.cache/noisecraft/decoded (never beside the shared data)."""
    return Path.home() / ".cache" / "noisecraft" / "decoded"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode_picture(data: bytes, where: str) -> np.ndarray:
    """One 32×32 picture file's bytes as uint8 32×32×3, or a one-sentence NoisecraftError."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (32, 32):  # checked from the header, before any pixels are decoded
                raise NoisecraftError(f"{where} is {im.size[0]}×{im.size[1]}, not a 32×32 CIFAR-10 picture; "
                                      "replace the archive with a good copy.")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except NoisecraftError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError,
            ArithmeticError, MemoryError, Image.DecompressionBombError) as err:
        raise NoisecraftError(f"Cannot decode {where} ({type(err).__name__}: {brief(err)}); replace the archive "
                              "with a good copy.") from None


def _pictures(source: Path, split: str):
    """(class folder, file name, bytes) of every picture SPLIT/CLASS/NAME in a tar archive or an unpacked folder."""
    if source.is_dir():
        for file in sorted(source.glob("*/*")):
            if file.is_file() and file.suffix.lower() in PICTURE_EXTENSIONS and not file.name.startswith("."):
                if file.stat().st_size > MAX_PICTURE_BYTES:
                    raise NoisecraftError(f"{file} is far larger than a 32×32 picture; remove it.")
                yield file.parent.name, file.name, file.read_bytes(), str(file)
        return
    with tarfile.open(source, "r:*") as archive:
        for member in archive:
            parts = PurePosixPath(member.name).parts
            parts = parts[1:] if parts[:1] == (".",) else parts
            if (not member.isfile() or len(parts) != 3 or parts[0] != split or any(p.startswith(".") for p in parts)
                    or PurePosixPath(parts[2]).suffix.lower() not in PICTURE_EXTENSIONS):
                continue
            where = f"{member.name} in {source}"
            if member.size > MAX_PICTURE_BYTES:
                raise NoisecraftError(f"{where} is far larger than a 32×32 picture; replace the archive.")
            yield parts[1], parts[2], archive.extractfile(member).read(), where


def decode_jpeg_split(source: Path, split: str, classes: list[str] | None = None) -> CifarSplit:
    """Decode every picture of `split` from a tar archive (SPLIT/CLASS/NAME.jpg members) or a folder (CLASS/NAME.jpg),
    ordered by class, then file name; labels follow the sorted class names, which must equal `classes`."""
    classes = list(CIFAR10_CLASSES if classes is None else classes)
    entries = []
    try:
        for folder, name, data, where in _pictures(Path(source), split):
            entries.append((folder, name, _decode_picture(data, where)))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise NoisecraftError(f"Cannot read {source} ({type(err).__name__}: {brief(err)}); replace it with a good "
                              "copy of the CIFAR-10 JPEG archive.") from None
    found = sorted({folder for folder, _, _ in entries})
    if found != sorted(classes):
        detail = f"class folders {', '.join(found)}" if found else "no pictures"
        raise NoisecraftError(f"{source} holds {detail} under {split}/, not the {len(classes)} CIFAR-10 classes "
                              f"({', '.join(classes)}); replace it with a good copy.")
    index = {c: i for i, c in enumerate(sorted(classes))}
    entries.sort(key=lambda e: (index[e[0]], e[1]))
    images = np.stack([e[2] for e in entries]).transpose(0, 3, 1, 2)
    labels = np.array([index[e[0]] for e in entries], dtype=np.int64)
    return CifarSplit(np.ascontiguousarray(images), labels, sorted(classes), "jpeg")


def _read_cache(path: Path) -> CifarSplit | None:
    try:
        with np.load(path, allow_pickle=False) as saved:
            images, labels, names = saved["images"], saved["labels"], [str(n) for n in saved["class_names"]]
    except (OSError, ValueError, KeyError, EOFError, zlib.error):
        return None    # unreadable: decode again and overwrite it
    if (images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or labels.shape != (len(images),)
            or labels.dtype != np.int64):
        return None
    return CifarSplit(images, labels, names, "jpeg")


def load_jpeg_copy(folder: Path, split: str, cache_dir: Path | None = None) -> CifarSplit:
    """One split of the JPEG copy in `folder` (SPLIT.tar.gz, or the SPLIT/ folder it unpacks to).

    An archive is decoded once; the arrays are cached in `cache_dir` (default `decoded_cache_dir()`) under a name
    holding the archive's SHA-256, written atomically, so a changed archive is decoded afresh and an unwritable
    cache only costs the decoding time."""
    folder = Path(folder)
    archive = folder / f"{split}.tar.gz"
    if not archive.is_file():
        if (folder / split).is_dir():
            return decode_jpeg_split(folder / split, split)
        raise NoisecraftError(f"The CIFAR-10 JPEG copy in {folder} lacks {split}.tar.gz; put it there.")
    try:
        key = _file_sha256(archive)[:16]
    except OSError as err:
        raise NoisecraftError(f"Cannot read {archive} ({err.strerror or err}); check its permissions.") from None
    cache = Path(cache_dir if cache_dir is not None else decoded_cache_dir()) / f"cifar10-jpeg-{split}-{key}.npz"
    if cache.is_file():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    decoded = decode_jpeg_split(archive, split)
    try:
        atomic_write(cache, lambda tmp: np.savez(tmp, images=decoded.images, labels=decoded.labels,
                                                 class_names=np.array(decoded.class_names)), durable=False)
    except OSError:
        pass    # a read-only home: the next load decodes again
    return decoded
