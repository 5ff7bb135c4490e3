"""Writing a dataset as WebDataset-style tar shards, and the manifest that describes them.

A shard set is a folder:

    shards/
      shard-000000.tar   shard-000001.tar   ...      POSIX (ustar) tar files
      manifest.json                                   written last: a folder without it is unfinished

Each tar holds samples in the WebDataset layout: the members of one sample share a key (the name up to the first dot)
and follow each other. A sample is `KEY.cls` (the class label as decimal text, when the source has classes),
`KEY.txt` (its caption, when it has one), `KEY.json` (for folders: {"file": the source file, "captions": [...] when
there are several}) and last the image `KEY.png|jpg|webp`. Putting the image last means a sample whose image is
complete is complete, which is how a reader tells a whole sample from the tail of a truncated shard. Keys are the
sample's running number over the whole set (`000000123`), members have mtime 0 and no owner, so the same source and
seed give byte-identical shards (and the same checksums).

The samples are shuffled (seeded) before they are cut into shards, so every shard is a random draw from the dataset
and a reader that mixes a few shards at a time still sees a well-mixed stream; a folder with one sub-folder per class
would otherwise give one-class shards.

`manifest.json` lists every shard (file, sample count, byte size, sha256), the total, the class names, whether there
are captions, the channels a reader should produce (1 when every image is greyscale, else 3) and a histogram of the
stored image sizes. Each shard is written under a temporary name and renamed when complete, and the manifest is
written (atomically) only after the last shard, so an interrupted run never leaves a manifest that lies.

Sources: a built-in dataset by name (digits, mnist, fashion-mnist, cifar10 — whatever `load_dataset` knows), or a
folder of images: loose images, or one sub-folder per class (labels as the folder dataset gives them), with an
optional captions.jsonl / captions.csv in the format `data/captions.py` reads. Unlike the in-memory folder dataset,
the writer holds one image at a time, so a folder of any size can be sharded. A source image that cannot be decoded
is skipped and counted in the manifest ("skipped"), an image without a caption is written without `.txt` and counted
("uncaptioned"); a caption line naming no image is an error, as for the folder dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NoisecraftError, brief
from ..io.checkpoint import atomic_write, load_json, remove_temp_files, save_json
from .captions import CAPTION_FILES, _clean_file_name, _read_csv, _read_jsonl
from .datasets import DATASET_NAMES, IMAGE_EXTENSIONS, _image_files, _open_image, _square, load_dataset

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "noisecraft-shards"
MANIFEST_VERSION = 1
SHARD_PATTERN = re.compile(r"shard-\d{6}\.tar")
BUILTIN_NAMES = tuple(dict.fromkeys((*DATASET_NAMES, "cifar10")))
FORMATS = ("png", "jpg", "webp")
# What the writer may copy unchanged from a folder: the file's bytes already are one of the shard formats.
_KEEP = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


# --------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class ShardInfo:
    file: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A shard set as its manifest describes it; `folder` is where the shards are."""

    folder: Path
    shards: tuple[ShardInfo, ...]
    count: int
    class_names: list[str]
    labels: bool
    captions: bool
    channels: int
    image_sizes: dict[str, int]      # "WxH" -> number of stored images of that size
    source: str
    raw: dict

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The distinct stored image sizes as (width, height)."""
        return [tuple(int(v) for v in key.split("x")) for key in self.image_sizes]

    def path(self, index: int) -> Path:
        return self.folder / self.shards[index].file


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of a shard folder, checked field by field; anything wrong is one sentence naming the fix."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise NoisecraftError(f"Shard folder {folder} {what}; write one with `noisecraft shard SRC --out {folder}`.")
    if not path.is_file():
        unfinished = any(SHARD_PATTERN.fullmatch(p.name) for p in folder.iterdir())
        why = "its writing did not finish" if unfinished else "it holds no shard set"
        raise NoisecraftError(f"Shard folder {folder} has no {MANIFEST} ({why}); write it with "
                              f"`noisecraft shard SRC --out {folder} --overwrite`.")
    raw = load_json(path)
    fix = f"rewrite the shards with `noisecraft shard SRC --out {folder} --overwrite`"

    def bad(what: str) -> NoisecraftError:
        return NoisecraftError(f"{path} {what}; {fix}.")

    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise bad(f"is not a noisecraft shard manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    if raw.get("version") != MANIFEST_VERSION:
        raise bad(f"has version {raw.get('version')!r}, but this noisecraft reads version {MANIFEST_VERSION}")
    entries = raw.get("shards")
    if not isinstance(entries, list) or not entries:
        raise bad("lists no shards")
    shards = []
    for i, e in enumerate(entries):
        ok = (isinstance(e, dict) and isinstance(e.get("file"), str) and SHARD_PATTERN.fullmatch(e["file"])
              and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) and e[k] >= 0
                      for k in ("count", "bytes"))
              and isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]))
        if not ok:
            raise bad(f"has a malformed entry {i} in \"shards\" (needs file shard-NNNNNN.tar, count, bytes, sha256)")
        shards.append(ShardInfo(e["file"], e["count"], e["bytes"], e["sha256"]))
    if len({s.file for s in shards}) != len(shards):
        raise bad("lists a shard file twice")
    count = raw.get("count")
    if count != sum(s.count for s in shards) or count == 0:
        raise bad(f"says count {count!r}, but its shards hold {sum(s.count for s in shards)} samples")
    names, channels, sizes = raw.get("class_names"), raw.get("channels"), raw.get("image_sizes")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad("has no list of \"class_names\"")
    if channels not in (1, 3):
        raise bad(f"says channels {channels!r} (1 or 3 expected)")
    if not (isinstance(sizes, dict) and sizes and all(re.fullmatch(r"[1-9]\d*x[1-9]\d*", k) for k in sizes)):
        raise bad("has no \"image_sizes\" histogram of WxH entries")
    return Manifest(folder, tuple(shards), count, list(names), bool(raw.get("labels")), bool(raw.get("captions")),
                    channels, dict(sizes), str(raw.get("source", "")), raw)


def source_name(manifest: Manifest) -> str:
    """The dataset a shard set was written from: 'mnist' for 'mnist:train', 'folder:PATH' for a folder (what a run
    trained on it is named, and which class captions a labelled set gets)."""
    source = manifest.source
    if source.startswith("folder:") or ":" not in source:
        return source or f"shards:{manifest.folder}"
    return source.rsplit(":", 1)[0]


def manifest_fingerprint(manifest: Manifest) -> str:
    """sha256 over the shard list (file names, sample counts, sha256 of each shard): the identity of a shard set,
    unchanged when the folder moves, changed by any rewritten shard."""
    listing = [[s.file, s.count, s.sha256] for s in manifest.shards]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Entry:
    """One source sample: an in-memory image (built-ins) or a file (folders), with its label and captions."""

    label: int | None
    captions: list[str]
    pixels: torch.Tensor | None = None      # C×H×W uint8
    path: Path | None = None
    name: str = ""                          # folders: the file relative to the folder


def resolve_source(text: str) -> tuple[str, str | Path]:
    """("builtin", key) for a built-in dataset name, ("folder", path) for a folder; one sentence otherwise.

    A bare known name (`mnist`) means the built-in set; write `./mnist` for a folder of that name."""
    text = str(text)
    if text.startswith("folder:"):
        text = text[len("folder:"):]
    elif "/" not in text and os.sep not in text:
        key = text.strip().lower().replace("_", "-")
        key = key.replace("cifar-10", "cifar10")
        if key in BUILTIN_NAMES:
            return "builtin", key
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path
    if path.exists():
        raise NoisecraftError(f"Source {text} is a file, not a folder of images; pass a folder or one of "
                              f"{', '.join(BUILTIN_NAMES)}.")
    raise NoisecraftError(f"Source {text!r} is neither an existing folder nor a built-in dataset; pass a folder of "
                          f"images or one of {', '.join(BUILTIN_NAMES)}.")


def _builtin_entries(key: str, split: str, data_dir, download: bool, image_size: int | None):
    ds = load_dataset(key, split=split, data_dir=data_dir, download=download, image_size=image_size)
    labels = ds.labels.tolist() if ds.labels is not None else [None] * len(ds)
    entries = [_Entry(labels[i], [], pixels=ds.images[i]) for i in range(len(ds))]
    return entries, list(ds.class_names), f"{ds.name}:{split}"


def _folder_caption_map(root: Path, names: set[str]) -> dict[str, list[str]] | None:
    found = [root / f for f in CAPTION_FILES if (root / f).is_file()]
    if not found:
        return None
    if len(found) > 1:
        raise NoisecraftError(f"Image folder {root} holds both captions.jsonl and captions.csv; keep only one.")
    path = found[0]
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    by_file: dict[str, list[str]] = {}
    for number, file, caption in rows:
        key = _clean_file_name(file)
        if key not in names:
            raise NoisecraftError(f"{path} line {number} names {file!r}, which is not an image in {root}; fix the "
                                  "name (relative to the folder) or remove the line.")
        if caption.strip() and caption not in by_file.setdefault(key, []):
            by_file[key].append(caption)
    return by_file


def _folder_entries(root: Path):
    """The images of a folder (loose, or one sub-folder per class) with labels and captions; no pixels yet."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _image_files(d))
    if class_dirs:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                 and not p.name.startswith(".")]
        if loose:
            raise NoisecraftError(f"Image folder {root} mixes {len(loose)} loose image(s) (e.g. {loose[0].name}) "
                                  "with class sub-folders; move them into a sub-folder or out of the folder.")
        files = [(p, label) for label, d in enumerate(class_dirs) for p in _image_files(d)]
        class_names = [d.name for d in class_dirs]
    else:
        files, class_names = [(p, None) for p in _image_files(root)], []
    if not files:
        raise NoisecraftError(f"Image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some, "
                              "directly or in one sub-folder per class.")
    names = [p.relative_to(root).as_posix() for p, _ in files]
    captions = _folder_caption_map(root, set(names))
    entries = [_Entry(label, (captions or {}).get(name, []), path=p, name=name)
               for (p, label), name in zip(files, names)]
    return entries, class_names, captions is not None


# --------------------------------------------------------------------------------------------------
# Encoding one sample


def _encode(im, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpg", "webp") else {}
    im.save(buf, format=_PIL_FORMAT[fmt], **options)
    return buf.getvalue()


def _image_bytes(entry: _Entry, fmt: str | None, quality: int, image_size: int | None):
    """(bytes, extension, mode, (width, height)) of the stored image; NoisecraftError if the source is unreadable."""
    from PIL import Image

    if entry.pixels is not None:
        arr = entry.pixels.numpy()
        im = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
        return _encode(im, fmt or "png", quality), fmt or "png", im.mode, im.size
    im = _open_image(entry.path)               # decodes fully: a broken file is caught here, not by a reader
    if image_size is not None:
        im = _square(im, image_size)
    if fmt is None and image_size is None:
        data = entry.path.read_bytes()
        with Image.open(io.BytesIO(data)) as original:
            kept = _KEEP.get(original.format or "")
        if kept is not None:
            return data, kept, im.mode, im.size
    return _encode(im, fmt or "png", quality), fmt or "png", im.mode, im.size


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------------------
# Writing


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NoisecraftError(f"--out {out} is a file; pass a folder for the shards.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise NoisecraftError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite "
                                  "to replace the shards in it.")
        # The manifest goes first: from here on the folder never describes shards it does not hold.
        (out / MANIFEST).unlink(missing_ok=True)
        for p in out.iterdir():
            if p.is_file() and (SHARD_PATTERN.fullmatch(p.name) or re.fullmatch(r"\.shard-\d{6}\.\w{8}\.tar", p.name)):
                p.unlink()
        remove_temp_files(out / MANIFEST)
    out.mkdir(parents=True, exist_ok=True)


def write_shards(source: str | Path, out: str | Path, *, shard_size: int = 1000, split: str = "train",
                 image_size: int | None = None, image_format: str | None = None, quality: int = 95,
                 seed: int = 0, shuffle: bool = True, overwrite: bool = False, data_dir=None, download: bool = True,
                 progress=None) -> Manifest:
    """Write `source` (a built-in dataset name or a folder, see `resolve_source`) as shards of `shard_size` samples
    into the folder `out`, and return the manifest.

    image_size: centre-crop to a square and resize to image_size² before storing (built-ins: as `load_dataset` does).
    image_format: png, jpg or webp; None keeps a folder image's own bytes when it already is one of these (and is
    not resized), and writes PNG otherwise. quality: for jpg and webp. The samples are shuffled with `seed` first
    unless shuffle=False. progress(shards_done, shards_total, samples_done) is called after each shard.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise NoisecraftError(f"--shard-size must be a positive integer, got {shard_size!r}.")
    if image_format is not None and image_format not in FORMATS:
        raise NoisecraftError(f"--format must be one of {', '.join(FORMATS)}, got {image_format!r}.")
    if not 1 <= int(quality) <= 100:
        raise NoisecraftError(f"--quality must be between 1 and 100, got {quality}.")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise NoisecraftError(f"--image-size must be a positive integer, got {image_size!r}.")
    kind, where = resolve_source(source)
    out = Path(out).expanduser()
    if kind == "builtin":
        entries, class_names, source_name = _builtin_entries(where, split, data_dir, download, image_size)
        has_captions = False
    else:
        if split != "train":
            raise NoisecraftError(f"Folder {where} has no {split} split; shard the test images from their own "
                                  "folder (with --split train, the default).")
        entries, class_names, has_captions = _folder_entries(where)
        source_name = f"folder:{where.resolve()}"
    if kind == "folder" and out.resolve().is_relative_to(where.resolve()):
        raise NoisecraftError(f"--out {out} lies inside the source folder {where}; write the shards elsewhere.")
    _prepare_out(out, overwrite)

    order = (torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle
             else list(range(len(entries))))
    tally, shards = _Tally(), []
    n_shards = (len(order) + shard_size - 1) // shard_size
    for s in range(n_shards):
        chunk = [entries[i] for i in order[s * shard_size:(s + 1) * shard_size]]
        before = tally.written
        path = atomic_write(out / shard_name(len(shards)),
                            lambda tmp, chunk=chunk: _write_tar(tmp, chunk, tally, has_captions, image_format, quality,
                                                                image_size))
        if tally.written == before:          # every source image of this slice was unreadable
            path.unlink()
        else:
            shards.append({"file": path.name, "count": tally.written - before, "bytes": path.stat().st_size,
                           "sha256": file_sha256(path)})
        if progress is not None:
            progress(s + 1, n_shards, tally.written)
    if not shards:
        raise NoisecraftError(f"None of the {len(entries)} images of {source} could be read (e.g. "
                              f"{tally.skipped[0]}); check the files.")
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": source_name, "count": tally.written,
        "shards": shards, "class_names": class_names, "labels": any(e.label is not None for e in entries),
        "captions": has_captions, "uncaptioned": tally.uncaptioned,
        "channels": 1 if set(tally.modes) == {"L"} else 3, "modes": dict(tally.modes),
        "image_sizes": dict(tally.sizes.most_common()), "image_formats": dict(tally.formats.most_common()),
        "shuffled": shuffle, "seed": seed, "skipped": len(tally.skipped), "skipped_examples": tally.skipped[:20],
    }
    save_json(manifest, out / MANIFEST)
    return read_manifest(out)


@dataclass
class _Tally:
    """What the writer counts over all shards, for the manifest."""

    written: int = 0
    uncaptioned: int = 0
    skipped: list = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)


def _write_tar(tmp: Path, chunk: list[_Entry], tally: _Tally, has_captions: bool, image_format, quality: int,
               image_size) -> None:
    """One shard: for each readable entry its .cls, .txt, .json, then the image (last: see the module docstring)."""
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for entry in chunk:
            try:
                data, ext, mode, size = _image_bytes(entry, image_format, quality, image_size)
            except NoisecraftError as err:
                tally.skipped.append(f"{entry.name}: {brief(err, 160)}")
                continue
            key = f"{tally.written:09d}"
            if entry.label is not None:
                _add(tar, f"{key}.cls", str(entry.label).encode())
            if entry.captions:
                _add(tar, f"{key}.txt", entry.captions[0].encode("utf-8"))
            elif has_captions:
                tally.uncaptioned += 1
            if entry.path is not None:
                meta = {"file": entry.name, **({"captions": entry.captions} if len(entry.captions) > 1 else {})}
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
            _add(tar, f"{key}.{ext}", data)
            tally.sizes[f"{size[0]}x{size[1]}"] += 1
            tally.modes[mode] += 1
            tally.formats[ext] += 1
            tally.written += 1


def summary_lines(manifest: Manifest) -> list[str]:
    """What the command prints about a written shard set."""
    sizes = ", ".join(f"{k} ×{v}" for k, v in list(manifest.image_sizes.items())[:4])
    more = f" and {len(manifest.image_sizes) - 4} more sizes" if len(manifest.image_sizes) > 4 else ""
    total = sum(s.bytes for s in manifest.shards)
    lines = [(f"wrote {len(manifest.shards)} shard(s), {manifest.count} images ({sizes}{more}), "
              f"{total / 2**20:,.1f} MiB, to {manifest.folder}/ (manifest {manifest.folder / MANIFEST})")]
    parts = []
    if manifest.labels:
        parts.append(f"{len(manifest.class_names)} classes" if manifest.class_names else "labels")
    if manifest.captions:
        parts.append("captions" + (f" ({manifest.raw['uncaptioned']} image(s) without one)"
                                   if manifest.raw.get("uncaptioned") else ""))
    if parts:
        lines.append("with " + " and ".join(parts))
    if manifest.raw.get("skipped"):
        lines.append(f"skipped {manifest.raw['skipped']} unreadable source image(s), e.g. "
                     f"{manifest.raw['skipped_examples'][0]}")
    return lines

