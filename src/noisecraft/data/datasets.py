"""In-memory image datasets: scikit-learn digits, MNIST, Fashion-MNIST, CIFAR-10 and any folder of images.

Everything is held as one uint8 N×C×H×W tensor, so a training batch is a single indexing op.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NoisecraftError, brief
from ..memory import physical_memory
from .cifar import find_cifar10, load_cifar10
from .download import SOURCES, ensure_files

# "cifar10" is the canonical pickle release when present, else the lossy JPEG copy, whose datasets are named
# "cifar10-jpeg" (so that runs, cached classifiers and scores never mix the two); "cifar10-jpeg" asks for the copy.
DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar10-jpeg")  # plus "folder:PATH"
CIFAR_NAMES = {"cifar10": None, "cifar-10": None, "cifar10-jpeg": "jpeg", "cifar-10-jpeg": "jpeg"}
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGITS_TRAIN, DIGITS_TEST, DIGITS_SEED = 1500, 297, 0


@dataclass(repr=False)
class ImageDataset:
    """Images as uint8 N×C×H×W in memory, with optional int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    name: str
    files: list[str] | None = None  # folder datasets: each image's path relative to the folder (for captions)

    def __post_init__(self) -> None:
        # Programming errors, not user errors: the loaders below always build valid datasets.
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise ValueError(
                f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images at `indices` as float32 in [-1, 1] (x / 127.5 - 1), and their labels (or None)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        x = self.images[idx].to(torch.float32) / 127.5 - 1.0
        y = self.labels[idx] if self.labels is not None else None
        return x, y

    def subset(self, n: int) -> ImageDataset:
        """The first `n` items (all of them if there are fewer), copied so the full set can be freed."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        labels = self.labels[:n].clone() if self.labels is not None else None
        files = list(self.files[:n]) if self.files is not None else None
        return ImageDataset(self.images[:n].clone(), labels, list(self.class_names), self.name, files)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Data folder: the explicit argument, else $NOISECRAFT_DATA, else ~/.cache/noisecraft."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("NOISECRAFT_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "noisecraft"


def load_dataset(
    name: str, split: str = "train", data_dir: str | Path | None = None, download: bool = True,
    image_size: int | None = None,
) -> ImageDataset:
    """Load a dataset by name: "digits", "mnist", "fashion-mnist", "cifar10", "cifar10-jpeg" or "folder:PATH".

    `split` is "train" or "test". `image_size`, when given, resizes every image to a square of that
    side (bilinear; non-square folder images are centre-cropped first). MNIST-style files are read
    from `<data_dir>/<name>/` and downloaded there if missing and `download` is true. CIFAR-10 is never
    downloaded: it is read from `<data_dir>` (see `noisecraft.data.cifar.find_cifar10`). A folder
    dataset has no test split: `split="test"` raises NoisecraftError rather than silently returning
    the training images, so that test metrics are never computed on training data by accident.
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise NoisecraftError(
            f"Image size must be a positive integer, got {image_size!r}; pass e.g. --image-size 32."
        )
    if split not in SPLITS:
        raise NoisecraftError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if not isinstance(name, str):
        raise NoisecraftError(
            f"The dataset name must be a string such as 'mnist' or 'folder:PATH', got {name!r}."
        )

    if name.startswith("folder:"):
        if split == "test":
            raise NoisecraftError(
                f"Folder dataset {name!r} has no test split; use split 'train', or put test images "
                "in a separate folder and load that as its own 'folder:PATH' dataset."
            )
        return _load_folder(name[len("folder:"):], image_size)

    key = name.strip().lower().replace("_", "-")
    if key == "digits":
        return _load_digits(split, image_size)
    if key in SOURCES:
        return _load_idx_dataset(key, split, resolve_data_dir(data_dir), download, image_size)
    if key in CIFAR_NAMES:
        return _load_cifar(split, resolve_data_dir(data_dir), CIFAR_NAMES[key], image_size)
    raise NoisecraftError(
        f"Unknown dataset {name!r}; use one of {', '.join(DATASET_NAMES)}, "
        "or folder:PATH for a folder of images."
    )


def dataset_name_for(name: str, data_dir: str | Path | None = None) -> str:
    """The name `load_dataset(name, data_dir=...)` gives the dataset it loads, found without loading it: "cifar10"
    is "cifar10-jpeg" when only the lossy JPEG copy is there (caches keyed by it then never mix the two). Other
    names, and names of datasets that are not there, come back unchanged."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in CIFAR_NAMES:
        return name
    try:
        kind, _ = find_cifar10(resolve_data_dir(data_dir), CIFAR_NAMES[key])
    except NoisecraftError:
        return name
    return "cifar10-jpeg" if kind == "jpeg" else "cifar10"


# --------------------------------------------------------------------------------------------------
# Memory


def check_memory(n: int, channels: int, size: int, bytes_per_value: int, what: str) -> None:
    """Refuse, before allocating anything, to build n images of channels×size×size values of `bytes_per_value`
    bytes (the largest intermediate) when they would not fit in this machine's memory."""
    need = n * channels * size * size * bytes_per_value
    have = physical_memory()
    if have is not None and need > have:
        raise NoisecraftError(
            f"{what} would need {need / 2**30:,.1f} GiB for {n} images of {channels}×{size}×{size}, more "
            f"than this machine's {have / 2**30:,.1f} GiB of memory; pass a smaller --image-size."
        )


# --------------------------------------------------------------------------------------------------
# Resizing


def _resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear resize of uint8 N×C×H×W to N×C×size×size, in chunks to bound float memory."""
    if images.shape[-2:] == (size, size):
        return images
    # Antialiasing only matters when shrinking; without it downscaled digits alias badly.
    shrink = size < max(images.shape[-2:])
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float32)
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[start:start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --------------------------------------------------------------------------------------------------
# scikit-learn digits


def _load_digits(split: str, image_size: int | None) -> ImageDataset:
    from sklearn.datasets import (
        load_digits,  # bundled with scikit-learn, so no download
    )

    digits = load_digits()
    if image_size is not None:
        check_memory(len(digits.images), 1, image_size, 4, f"digits at --image-size {image_size}")
    # 0..16 -> 0..255 in float; round once, after upscaling, to avoid double quantisation.
    x = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    size = image_size or 16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    images = x.round_().clamp_(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target.astype(np.int64))

    # numpy's legacy RandomState guarantees the same stream across numpy versions.
    order = torch.from_numpy(np.random.RandomState(DIGITS_SEED).permutation(len(images)))
    idx = order[:DIGITS_TRAIN] if split == "train" else order[-DIGITS_TEST:]
    return ImageDataset(images[idx].contiguous(), labels[idx].contiguous(), list(DIGIT_CLASSES), "digits")


# --------------------------------------------------------------------------------------------------
# MNIST-style gzip IDX files


# Deflate expands data by at most ~1032:1, so a gzip file of n bytes cannot hold more than this many times n.
_MAX_DEFLATE_RATIO = 1100
_CHUNK = 1 << 22


def _gunzip_prefix(stream, n: int) -> bytes:
    """Up to `n` decompressed bytes from `stream`, read in chunks: memory follows what is really in the file,
    never what a (possibly hostile) header claims."""
    out = bytearray()
    while len(out) < n:
        block = stream.read(min(_CHUNK, n - len(out)))
        if not block:
            break
        out += block
    return bytes(out)


def parse_idx(data: bytes, *, ndim: int, source: str = "IDX file") -> np.ndarray:
    """Parse IDX bytes (gzip-compressed or raw) holding unsigned bytes with `ndim` dimensions.

    Checks the magic number (0x0000 08 <ndim>), the dimension count and the exact payload size, so a
    truncated or foreign file gives a NoisecraftError instead of garbage images. The declared size is
    checked against the bytes the file can hold before anything is allocated or decompressed, so a
    header claiming 2^31 × 60000 × 60000 items fails at once, and a gzip file is decompressed only as far
    as its header allows, so a decompression bomb cannot fill the memory. The `source` text (e.g.
    "MNIST file /x/train-images-idx3-ubyte.gz") starts every message.
    """
    fix = "delete it and run again to re-download"
    header = 4 + 4 * ndim
    expected_magic = 0x0800 + ndim
    gzipped = data[:2] == b"\x1f\x8b"  # sniff gzip by content, so already-gunzipped copies also work
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if gzipped else None

    def gunzip(n: int) -> bytes:
        try:
            return _gunzip_prefix(stream, n)
        except (OSError, EOFError, zlib.error) as err:
            raise NoisecraftError(f"{source} is not a valid gzip file ({brief(err)}); {fix}.") from None

    head = gunzip(header) if gzipped else data[:header]
    if len(head) < 4:
        raise NoisecraftError(f"{source} is truncated (only {len(head)} bytes, no IDX header); {fix}.")
    magic = int.from_bytes(head[:4], "big")
    if magic != expected_magic:
        raise NoisecraftError(
            f"{source} has IDX magic number 0x{magic:08x} but expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); {fix}."
        )
    if len(head) < header:
        raise NoisecraftError(
            f"{source} is truncated (header needs {header} bytes, got {len(head)}); {fix}."
        )
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims, dtype=object))
    shape = "×".join(map(str, dims))
    if gzipped:
        if expected > _MAX_DEFLATE_RATIO * len(data):
            raise NoisecraftError(
                f"{source} is truncated (expected {expected} bytes of {shape} data, more than its "
                f"{len(data)} compressed bytes can hold); {fix}."
            )
        # One byte more than declared reveals trailing data; a stream that holds no more than that is read to
        # its end, where gzip checks its CRC, so a flipped byte is caught too.
        body = gunzip(expected + 1)
    else:
        body = memoryview(data)[header:]
    got = len(body)
    if got != expected:
        what = "is truncated" if got < expected else "has trailing bytes"
        more = " or more" if gzipped and got > expected else ""
        raise NoisecraftError(
            f"{source} {what} (expected {expected} bytes of {shape} data, got {got}{more}); {fix}."
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _load_idx_dataset(
    key: str, split: str, data_dir: Path, download: bool, image_size: int | None,
) -> ImageDataset:
    source = SOURCES[key]
    prefix = "train" if split == "train" else "t10k"
    image_file, label_file = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
    # Fetch all four files on first use: one folder then always holds a complete dataset.
    folder = ensure_files(key, data_dir, download=download)

    def read(file_name: str, ndim: int) -> np.ndarray:
        path = folder / file_name
        try:
            data = path.read_bytes()
        except OSError as err:
            raise NoisecraftError(
                f"Cannot read {source.title} file {path} ({err.strerror or err}); "
                "check its permissions or delete it to re-download."
            ) from None
        return parse_idx(data, ndim=ndim, source=f"{source.title} file {path}")

    pixels = read(image_file, 3)
    targets = read(label_file, 1)
    if len(pixels) != len(targets):
        raise NoisecraftError(
            f"{source.title} files in {folder} disagree: {image_file} holds {len(pixels)} images but "
            f"{label_file} holds {len(targets)} labels; delete both and run again to re-download."
        )
    if pixels.size == 0:
        raise NoisecraftError(
            f"{source.title} file {folder / image_file} holds no pixels (shape "
            f"{'×'.join(map(str, pixels.shape))}); delete it and run again to re-download."
        )
    classes = FASHION_CLASSES if key == "fashion-mnist" else DIGIT_CLASSES
    if int(targets.max()) >= len(classes):
        raise NoisecraftError(
            f"{source.title} file {folder / label_file} has label {int(targets.max())} but only "
            f"{len(classes)} classes exist; delete it and run again to re-download."
        )
    # .copy(): frombuffer views are read-only and torch refuses to wrap them without a warning.
    images = torch.from_numpy(pixels.copy()).unsqueeze(1)
    labels = torch.from_numpy(targets.astype(np.int64))
    if image_size is not None:
        check_memory(len(images), 1, image_size, 4, f"{source.title} at --image-size {image_size}")
        images = _resize(images, image_size)
    return ImageDataset(images, labels, list(classes), key)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 (the readers live in .cifar)


def _load_cifar(split: str, data_dir: Path, prefer: str | None, image_size: int | None) -> ImageDataset:
    found = load_cifar10(split, data_dir, prefer)
    images, labels = torch.from_numpy(found.images), torch.from_numpy(found.labels)
    if image_size is not None:
        check_memory(len(images), 3, image_size, 4, f"CIFAR-10 at --image-size {image_size}")
        images = _resize(images, image_size)
    name = "cifar10" if found.source == "canonical" else "cifar10-jpeg"
    return ImageDataset(images, labels, list(found.class_names), name)


# --------------------------------------------------------------------------------------------------
# Folder of images


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted, skipping hidden names like macOS '._x.png'."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


# What Pillow's decoders raise on hostile bytes (its own fuzzing sees all of these). They are caught only around
# Image.open and load(); our conversion code runs outside that try, so its bugs still show as tracebacks.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError,
                  ArithmeticError, MemoryError)


def _decode(path: Path, before_load=None):
    """Open and fully decode one image file; `before_load(im)` sees the header (size, mode) before the pixels are
    allocated. Every way the file can be broken ends in a one-sentence NoisecraftError."""
    from PIL import Image

    im = None
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that, then decodes anyway; an image that
            # large in a training folder is a mistake or a decompression bomb, so it is refused as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            if before_load is not None:
                before_load(im)
            im.load()  # decode now, inside the try, so a corrupt body is caught here
        return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        if im is not None:
            im.close()
        raise NoisecraftError(
            f"Image file {path} declares more pixels than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS} "
            "(a possible decompression bomb); shrink it or remove it from the folder."
        ) from None
    except NoisecraftError:
        if im is not None:
            im.close()
        raise
    except _DECODE_ERRORS as err:
        if im is not None:
            im.close()
        raise NoisecraftError(
            f"Cannot read image file {path} ({type(err).__name__}: {brief(err)}); delete or replace it."
        ) from None


def _open_image(path: Path, before_load=None):
    """Open one image as "L" or "RGB" (transparency flattened onto black), or raise NoisecraftError."""
    from PIL import Image

    im = original = _decode(path, before_load)
    try:
        mode, bands = im.mode, im.getbands()
        if mode == "P":  # a palette may be grey or colour: look at the actual colours
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            rgb = np.asarray(im)[..., :3]
            grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
            bands = im.getbands()
        else:
            grey = bands[0] in ("L", "1", "I", "F") and len(bands) <= 2
        if "A" in bands:
            # Fully transparent pixels carry arbitrary colours; compositing onto black is predictable.
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            background.alpha_composite(rgba)
            im = background
        elif mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16-bit / float greys: scale to 0..255 instead of letting PIL clip them.
            arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
            top = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        return im.convert("L" if grey else "RGB")
    finally:
        original.close()


def _square(im, size: int):
    """Centre-crop to the largest square, then bilinear-resize, so nothing is stretched."""
    from PIL import Image

    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im if side == size else im.resize((size, size), Image.Resampling.BILINEAR)


class _FolderBudget:
    """Adds up, from each header before its pixels are decoded, the memory a folder's pictures will hold, and
    refuses the folder when that passes half the machine's memory (the final stack copies everything once)."""

    def __init__(self, root: Path, image_size: int | None):
        self.root, self.image_size = root, image_size
        memory = physical_memory()
        self.left = memory // 2 if memory is not None else None
        self.total = 0

    def take(self, im) -> None:
        w, h = im.size
        kept = 3 * (self.image_size ** 2 if self.image_size is not None else w * h)
        self.total += kept
        if self.left is not None and (self.total > self.left or 4 * w * h > self.left):
            raise NoisecraftError(
                f"Images in {self.root} would need more than {self.left / 2**30:,.1f} GiB of memory (the "
                f"last one read, {getattr(im, 'filename', '?')}, is {w}×{h}); pass --image-size N to shrink "
                "them, or use fewer."
            )


def _load_folder(path_text: str, image_size: int | None) -> ImageDataset:
    if not path_text.strip():
        raise NoisecraftError(
            "Dataset 'folder:' needs a path; pass it as folder:PATH, e.g. folder:./my_images."
        )
    root = Path(path_text).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise NoisecraftError(
            f"Image folder {root} {what}; pass folder:PATH with an existing folder of images."
        )

    class_dirs = sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _image_files(d)
    )
    if class_dirs:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                 and not p.name.startswith(".")]
        if loose:
            raise NoisecraftError(
                f"Image folder {root} mixes {len(loose)} loose image(s) (e.g. {loose[0].name}) with class "
                "sub-folders; move them into a sub-folder or out of the folder."
            )
        files, label_list = [], []
        for label, d in enumerate(class_dirs):
            these = _image_files(d)
            files += these
            label_list += [label] * len(these)
        class_names = [d.name for d in class_dirs]
        labels = torch.tensor(label_list, dtype=torch.int64)
    else:
        files, class_names, labels = _image_files(root), [], None
    if not files:
        raise NoisecraftError(
            f"Image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some, "
            "directly or in one sub-folder per class."
        )

    if image_size is not None:
        check_memory(len(files), 3, image_size, 2, f"Image folder {root} at --image-size {image_size}")
    budget = _FolderBudget(root, image_size)
    pictures = []
    for p in files:  # resized one by one, so only one full-size picture is held at a time
        im = _open_image(p, budget.take)
        pictures.append(_square(im, image_size) if image_size is not None else im)
    mode = "L" if all(im.mode == "L" for im in pictures) else "RGB"
    pictures = [im.convert(mode) for im in pictures]
    if image_size is None:
        sizes = {im.size for im in pictures}
        if len(sizes) > 1:
            (w1, h1), (w2, h2) = sorted(sizes)[:2]
            raise NoisecraftError(
                f"Images in {root} have {len(sizes)} different sizes (e.g. {w1}×{h1} and {w2}×{h2}); "
                "pass --image-size N to centre-crop and resize them all to N×N."
            )
    arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in pictures])
    if arrays.ndim == 3:  # grayscale: N×H×W -> N×1×H×W
        images = torch.from_numpy(arrays).unsqueeze(1)
    else:
        images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    relative = [p.relative_to(root).as_posix() for p in files]
    return ImageDataset(images, labels, class_names, f"folder:{path_text}", relative)
