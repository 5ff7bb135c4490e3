"""Streaming a shard set (see `shards.py`) into training batches, with an order that is a pure function of the seed.

    manifest = open_shards("shards/")                                   # checks every shard's size (or sha256)
    stream = ShardStream(manifest, batch_size=128, image_size=32, seed=0, rank=r, world_size=W, start=step * 128)
    for batch in ShardLoader(stream, num_workers=2, max_bad=100):      # endless unless `end` is given
        batch.images, batch.labels, batch.captions, batch.valid      # this rank's slice of one global batch

The order. Epoch e visits every sample of the manifest once: the shards are permuted with a generator seeded by
(seed, e), cut into consecutive blocks of `window` shards, and the samples of each block are permuted together with a
generator seeded by (seed, e, block). Epochs follow each other as one stream of positions: position g is the
(g mod P)-th sample of epoch g div P, where P = (N div B)·B drops the incomplete last batch of every epoch, as
`EpochOrder` does. Global batch k is positions kB ... kB+B-1. All of it depends on the manifest, the seed, the batch
size and the window only — not on the number of processes, workers or restarts.

The granularity is one sample. `start=s` begins at position s and yields exactly the tail of the stream that
`start=0` yields (the trainer passes step·B, so a run killed at any step resumes at the same sample); nothing before s
is decoded or even read: the position of a sample in a shard comes from an index of the tar headers.

Ranks and workers. Rank r of W gets a contiguous slice of every global batch (the slice `Distributed.shard` gives:
sizes differ by at most one), so the W slices of a batch are disjoint, together they are the batch, and a global batch
is the same on any number of processes — which is what lets a run on W processes equal one on one process, and resume
on another W. A DataLoader worker w of n makes the batches j ≡ w (mod n), counted from `start`; the DataLoader takes
them from its workers in turn, so the loader yields them in order, whatever n is. Reading is random access inside a
block (one pread per sample), so each rank reads only its own samples (and the headers, for the index), from the few
shards of the current block; each worker keeps at most `window` + 2 shard files open.

Bad data. A sample that cannot be used is left out of its batch (its row of `images` is zeros, `valid` is False),
and the batches around it do not move: an image that does not decode, a label that is not an integer or not a class,
a sample with no image, the samples past the point where a shard is truncated or damaged, the samples of a shard that
is missing (checked again each epoch, so a shard that comes back is read again). Each is counted and logged once per
distinct message (one line through `logging`), and when a rank has skipped more than `max_bad` samples the loader
stops with one sentence. An empty or missing caption in a set with captions does not skip the image: it gets the
caption "" (the unconditional prompt that caption dropout trains anyway), and is counted and logged separately
(`ShardLoader.empty_captions`, at most 20 lines). Whatever goes wrong inside a worker comes back to the loader as
that one sentence, never as a worker's traceback.

Why plain `tarfile` and not the `webdataset` package: webdataset streams each shard from its first byte and shuffles
with a buffer, so its order depends on the buffer's random state, resuming means replaying (decoding or at least
reading) everything before the resume point, and worker/rank splitting is by whole shards, so the batch a step sees
depends on the number of processes. Exact resume on any number of processes needs random access, which an index of
the tar headers gives (`tar_index.py`: a hundred lines over the standard library), with no dependency, our own
one-sentence errors, and damaged shards read up to the damage. The shards themselves stay plain WebDataset shards,
which the webdataset package (or any tar reader) can read as well.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import traceback
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import NoisecraftError, brief
from .datasets import _open_image, _square
from .shards import Manifest, file_sha256, read_manifest
from .tar_index import IMAGE_EXTS, index_tar

logger = logging.getLogger(__name__)
VERIFY = ("none", "size", "sha256")
_CAPTION_WARNINGS = 20


def _seed(*parts) -> int:
    """A 63-bit seed from any parts, the same on every machine and Python (no hash() randomisation)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def epoch_order(counts, seed: int, epoch: int, window: int | None = 16) -> torch.Tensor:
    """The global sample ids (shard by shard in manifest order, then tar order) of epoch `epoch`, in visiting order.
    window=None mixes all shards at once: a uniform permutation of the whole set."""
    counts = torch.as_tensor(list(counts), dtype=torch.long)
    base = torch.cumsum(counts, 0) - counts
    shards = torch.randperm(len(counts), generator=torch.Generator().manual_seed(_seed(seed, epoch, "shards")))
    width = len(counts) if window is None else window
    parts = []
    for b, first in enumerate(range(0, len(counts), width)):
        ids = torch.cat([torch.arange(base[s], base[s] + counts[s]) for s in shards[first:first + width].tolist()])
        g = torch.Generator().manual_seed(_seed(seed, epoch, "block", b))
        parts.append(ids[torch.randperm(len(ids), generator=g)])
    return torch.cat(parts)


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous part of n items, sizes differing by at most one (the same as `Distributed.shard`)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def open_shards(folder, verify: str = "size") -> Manifest:
    """The manifest of a shard folder, after checking each shard against it: "size" (a stat per shard, the default),
    "sha256" (reads everything) or "none". A shard that is missing or differs is logged (one line each) and read
    anyway: its unreadable samples are then skipped and counted like any bad data."""
    if verify not in VERIFY:
        raise NoisecraftError(f"verify must be one of {', '.join(VERIFY)}, got {verify!r}.")
    manifest = read_manifest(folder)
    missing = 0
    for i, info in enumerate(manifest.shards):
        path = manifest.path(i)
        if verify == "none":
            break
        if not path.is_file():
            missing += 1
            logger.warning("%s is missing; its %d samples will be skipped", path, info.count)
        elif (size := path.stat().st_size) != info.bytes:
            logger.warning("%s has %d bytes but the manifest says %d (truncated or rewritten); its unreadable "
                           "samples will be skipped", path, size, info.bytes)
        elif verify == "sha256" and file_sha256(path) != info.sha256:
            logger.warning("%s does not match its sha256 in the manifest; its unreadable samples will be skipped",
                           path)
    if missing == len(manifest.shards):
        raise NoisecraftError(f"None of the {missing} shards listed in {manifest.folder / 'manifest.json'} exist; "
                              "check the folder or write the shards again.")
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading one sample: a per-process index of tar headers and a few open files


class _Bad(Exception):
    """A sample that cannot be used; the message names it and why."""


class _Member(io.BytesIO):
    """Image bytes that name themselves in Pillow's messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


class _Reader:
    """Random access to the samples of a shard set, for one process (files are never shared across a fork)."""

    def __init__(self, manifest: Manifest, window: int):
        self.manifest, self.keep = manifest, window + 2
        self.ends = np.cumsum([s.count for s in manifest.shards]).tolist()
        self.files: OrderedDict = OrderedDict()
        self.indexes: OrderedDict = OrderedDict()
        self.broken: dict[int, tuple[int, str]] = {}

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def _open(self, s: int, epoch: int):
        if s in self.broken and self.broken[s][0] == epoch:
            raise _Bad(self.broken[s][1])
        if s in self.files:
            self.files.move_to_end(s)
            self.indexes.move_to_end(s)
            return self.files[s], self.indexes[s][1]
        name, path = self.manifest.shards[s].file, self.manifest.path(s)
        try:
            f = open(path, "rb")  # noqa: SIM115 (kept open for the next samples, closed by eviction)
            stat = os.fstat(f.fileno())
        except OSError as e:
            self.broken[s] = (epoch, f"{name} cannot be opened ({e.strerror or e}); its samples are skipped")
            raise _Bad(self.broken[s][1]) from None
        self.broken.pop(s, None)
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)     # a rewritten file is indexed again
        if s not in self.indexes or self.indexes[s][0] != identity:
            entries, problem = index_tar(f, stat.st_size)
            want = self.manifest.shards[s].count
            if problem is None and len(entries) < want:
                problem = f"holds {len(entries)} of its {want} samples"
            self.indexes[s] = (identity, (entries[:want], problem and f"{name} {problem}; the rest of it is skipped"))
        self.indexes.move_to_end(s)
        self.files[s] = f
        while len(self.files) > self.keep:
            self.files.popitem(last=False)[1].close()
        while len(self.indexes) > 4 * self.keep:       # never one of an open file: those were used more recently
            self.indexes.popitem(last=False)
        return f, self.indexes[s][1]

    def read(self, sample_id: int, epoch: int) -> tuple[str, dict[str, bytes]]:
        """(name for messages, {extension: bytes}) of one sample, or _Bad."""
        s = bisect.bisect_right(self.ends, sample_id)
        k = sample_id - (self.ends[s - 1] if s else 0)
        f, (entries, problem) = self._open(s, epoch)
        name = f"{self.manifest.shards[s].file} sample {k}"
        if k >= len(entries):
            raise _Bad(problem or f"{name} is missing")
        e = entries[k]
        try:
            data = os.pread(f.fileno(), e.end - e.start, e.start)    # leaves the file position alone
        except OSError as err:
            raise _Bad(f"{name} cannot be read ({err.strerror or err})") from None
        if len(data) != e.end - e.start:
            raise _Bad(f"{self.manifest.shards[s].file} shrank while being read; {name} is skipped")
        return name, {ext: data[off - e.start:off - e.start + n] for ext, (off, n) in e.members.items()}


# --------------------------------------------------------------------------------------------------
# Batches


@dataclass
class ShardBatch:
    """This rank's slice of one global batch. `position` is the stream position of the global batch's first sample
    (step·batch_size for a stream started at a step); rows of samples that could not be read are zeros with
    valid False, label -1 and caption ""; `events` are (kind, message) pairs for the loader: "bad" or "caption"."""

    position: int
    epoch: int
    images: torch.Tensor        # uint8 n×C×H×W
    labels: torch.Tensor        # int64 (n,), -1 where none
    captions: list[str]
    ids: torch.Tensor           # int64 (n,), the global sample ids
    valid: torch.Tensor         # bool (n,)
    events: list[tuple[str, str]]

    def pixels(self) -> torch.Tensor:
        """The images as float32 in [-1, 1], as `ImageDataset.batch` gives them."""
        return self.images.to(torch.float32) / 127.5 - 1.0


@dataclass
class _Failure:
    message: str
    details: str | None = None


class ShardStream(IterableDataset):
    """Global batches of a shard set for one rank, in the order the module docstring defines; iterate it through a
    `ShardLoader`, which counts bad data and turns failures into one sentence.

    image_size: centre-crop to a square and resize to image_size² (the folder dataset's `_square`: a folder and its
    shards give the same pixels); None keeps the stored size, which must then be one size. channels: 1 or 3 (default:
    the manifest's). start, end: stream positions (samples, see above; end=None: endless). window: shards mixed per
    block (None: all, a uniform permutation of the set). decode=False reads every sample and checks that it has an
    image, but decodes no pixels (`images` is then n×C×0×0): for a run whose latents come from a cache (see
    latent_shards.py), where the labels, captions and sample ids are all it needs."""

    def __init__(self, shards, batch_size: int, *, image_size: int | None = None, channels: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0, end: int | None = None,
                 window: int | None = 16, verify: str = "size", decode: bool = True):
        super().__init__()
        self.decode = bool(decode)
        self.manifest = shards if isinstance(shards, Manifest) else open_shards(shards, verify)
        m = self.manifest
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("start", start, 0),
                                 ("window", 1 if window is None else window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise NoisecraftError(f"{name} must be an integer >= {low}, got {value!r}.")
        if not 0 <= rank < world_size:
            raise NoisecraftError(f"rank must be in 0..{world_size - 1}, got {rank!r}.")
        if batch_size > m.count:
            raise NoisecraftError(f"A batch of {batch_size} is more than the {m.count} samples in {m.folder}; "
                                  "use a smaller batch size.")
        if end is not None and end < start:
            raise NoisecraftError(f"end ({end}) comes before start ({start}).")
        if image_size is None and len(m.sizes) > 1 and self.decode:
            raise NoisecraftError(f"The shards in {m.folder} hold images of {len(m.sizes)} sizes; pass an image size "
                                  "to centre-crop and resize them all to one square.")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise NoisecraftError(f"Image size must be a positive integer, got {image_size!r}.")
        self.channels = m.channels if channels is None else channels
        if self.channels not in (1, 3):
            raise NoisecraftError(f"channels must be 1 or 3, got {channels!r}.")
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.rank, self.world_size, self.start, self.end = rank, world_size, start, end
        self.window = len(m.shards) if window is None else window
        self.shape = (image_size, image_size) if image_size is not None else m.sizes[0][::-1]   # (H, W)
        self.counts = [s.count for s in m.shards]
        self.samples_per_epoch = (m.count // batch_size) * batch_size
        self._orders: OrderedDict = OrderedDict()

    @property
    def steps_per_epoch(self) -> int:
        return self.samples_per_epoch // self.batch_size

    def epoch_ids(self, epoch: int) -> torch.Tensor:
        """Every sample id of epoch `epoch` in visiting order (the dropped tail included), computed once."""
        if epoch not in self._orders:
            self._orders[epoch] = epoch_order(self.counts, self.seed, epoch, self.window)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def ids_at(self, first: int, n: int) -> torch.Tensor:
        """The sample ids at stream positions first ... first+n-1."""
        parts, p = [], first
        while p < first + n:
            epoch, offset = divmod(p, self.samples_per_epoch)
            take = min(first + n - p, self.samples_per_epoch - offset)
            parts.append(self.epoch_ids(epoch)[offset:offset + take])
            p += take
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def batch_ids(self, step: int, rank: int | None = None) -> torch.Tensor:
        """Sample ids of `rank`'s slice (default: this stream's rank) of global batch `step` (positions step·B ...)."""
        ids = self.ids_at(step * self.batch_size, self.batch_size)
        return ids[rank_slice(len(ids), self.rank if rank is None else rank, self.world_size)]

    def shard_pixels(self, index: int):
        """The samples of shard `index` in tar order, as training decodes them (crop, resize, channels): one
        (uint8 H×W×C array, None) per readable sample, (None, why) per unreadable one. For `noisecraft encode`."""
        base = sum(self.counts[:index])
        reader = _Reader(self.manifest, 1)
        try:
            for k in range(self.counts[index]):
                try:
                    pixels = self._sample(reader, base + k, 0)[0]
                except _Bad as bad:
                    yield None, str(bad)
                    continue
                yield pixels.reshape(*self.shape, self.channels), None
        finally:
            reader.close()

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = _Reader(self.manifest, self.window)
        try:
            j = worker
            while self.end is None or self.start + j * self.batch_size < self.end:
                yield self._batch(reader, self.start + j * self.batch_size)
                j += workers
        except NoisecraftError as e:
            yield _Failure(str(e))
        except Exception as e:  # noqa: BLE001 (a bug or the unforeseen: one sentence here, the traceback in the log)
            yield _Failure(f"Reading {self.manifest.folder} failed in a data-loading process with {type(e).__name__}: "
                           f"{brief(e)}; please report it with the traceback from the debug log.",
                           traceback.format_exc())
        finally:
            reader.close()

    def _batch(self, reader: _Reader, first: int) -> ShardBatch:
        n = self.batch_size if self.end is None else min(self.batch_size, self.end - first)
        epoch = first // self.samples_per_epoch
        all_ids = self.ids_at(first, n)
        mine = rank_slice(n, self.rank, self.world_size)
        ids = all_ids[mine]
        positions = range(first + mine.start, first + mine.stop)
        k = len(ids)
        shape = self.shape if self.decode else (0, 0)
        images = np.zeros((k, *shape, self.channels), dtype=np.uint8)     # filled as H×W×C, Pillow's layout
        labels, valid, captions, events = [-1] * k, [False] * k, [""] * k, []
        for i, (sample_id, p) in enumerate(zip(ids.tolist(), positions)):
            try:
                pixels, labels[i], captions[i], note = self._sample(reader, sample_id, p // self.samples_per_epoch)
            except _Bad as bad:
                events.append(("bad", str(bad)))
                continue
            if pixels is not None:
                images[i] = pixels.reshape(images.shape[1:])
            valid[i] = True
            if note:
                events.append(("caption", note))
        return ShardBatch(first, epoch, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                          torch.tensor(labels, dtype=torch.long), captions, ids, torch.tensor(valid), events)

    def _sample(self, reader: _Reader, sample_id: int, epoch: int):
        name, members = reader.read(sample_id, epoch)
        label = self._label(name, members)
        caption, note = self._caption(name, members, sample_id, epoch)
        image = next((ext for ext in members if ext in IMAGE_EXTS), None)
        if image is None:
            raise _Bad(f"{name} has no image")
        if not self.decode:
            return None, label, caption, note
        try:
            im = _open_image(_Member(members[image], f"{name} ({image})"))
        except NoisecraftError as e:
            raise _Bad(f"{name} is not a readable image ({brief(str(e).split('; ')[0], 160)})") from None
        im = im.convert("L" if self.channels == 1 else "RGB")
        if self.image_size is not None:
            im = _square(im, self.image_size)
        elif im.size != self.shape[::-1]:
            raise _Bad(f"{name} is {im.size[0]}x{im.size[1]}, not {self.shape[1]}x{self.shape[0]} like the set")
        return np.asarray(im, dtype=np.uint8), label, caption, note

    def _label(self, name: str, members: dict) -> int:
        """The sample's class label (-1 in a set without labels), or _Bad."""
        m = self.manifest
        if "cls" not in members:
            if m.labels:
                raise _Bad(f"{name} has no label (.cls)")
            return -1
        try:
            label = int(members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise _Bad(f"{name} has a label that is not an integer ({brief(repr(members['cls']), 40)})") from None
        if m.class_names and not 0 <= label < len(m.class_names):
            raise _Bad(f"{name} has label {label}, but the set has {len(m.class_names)} classes")
        return label

    def _caption(self, name: str, members: dict, sample_id: int, epoch: int) -> tuple[str, str | None]:
        """The sample's caption (one of several, chosen by (seed, epoch, sample)), and a note when it is empty."""
        if not self.manifest.captions:
            return "", None
        texts, note = _caption_options(name, members)
        if not texts:
            return "", note
        return texts[_seed(self.seed, epoch, sample_id, "caption") % len(texts)] if len(texts) > 1 else texts[0], None

    def shard_texts(self, index: int):
        """Every caption each sample of shard `index` may be given (all of them: the one a step uses depends on the
        seed and epoch) and its label (-1: none), in tar order, without decoding an image: one (captions, label)
        per sample, or (None, why) for a sample that cannot be read. For the text cache of `noisecraft encode`."""
        base = sum(self.counts[:index])
        reader = _Reader(self.manifest, 1)
        try:
            for k in range(self.counts[index]):
                try:
                    name, members = reader.read(base + k, 0)
                    label = self._label(name, members)
                except _Bad as bad:
                    yield None, str(bad)
                    continue
                texts = _caption_options(name, members)[0] if self.manifest.captions else []
                yield texts, label
        finally:
            reader.close()


def _caption_options(name: str, members: dict) -> tuple[list[str], str | None]:
    """The non-empty captions of a sample (its .json "captions" list, else its .txt), and a note when there is none."""
    texts = []
    try:
        if "json" in members:
            extra = json.loads(members["json"].decode("utf-8")).get("captions")
            if isinstance(extra, list):
                texts = [t for t in extra if isinstance(t, str) and t.strip()]
        if not texts and "txt" in members:
            texts = [members["txt"].decode("utf-8")]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return [], f"{name} has a caption that is not UTF-8 text; it gets the empty caption"
    texts = [t for t in texts if t.strip()]
    return texts, None if texts else f"{name} has an empty caption; it gets the empty caption"


# --------------------------------------------------------------------------------------------------
# The loader


def bad_limit(max_bad: float, count: int) -> int:
    """The number of unusable samples allowed: max_bad itself (a count), or that fraction of `count` samples."""
    if isinstance(max_bad, float) and 0 < max_bad < 1:
        return int(max_bad * count)
    if isinstance(max_bad, bool) or not isinstance(max_bad, int) or max_bad < 0:
        raise NoisecraftError(f"max_bad must be a count >= 0 or a fraction in (0, 1), got {max_bad!r}.")
    return max_bad


class ShardLoader:
    """Iterates a ShardStream in this process (num_workers=0) or through a DataLoader with worker processes, in the
    same order either way; logs and counts bad data, and stops with one NoisecraftError after more than `max_bad`
    skipped samples (an int, or a float in (0, 1): that fraction of the set's samples; None: count, never stop —
    for a caller that applies the limit to a total over processes, as the trainer does under torchrun)."""

    def __init__(self, stream: ShardStream, num_workers: int = 0, max_bad: float | None = 100,
                 prefetch_factor: int = 2):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise NoisecraftError(f"The number of data workers must be an integer >= 0, got {num_workers!r}.")
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.max_bad = None if max_bad is None else bad_limit(max_bad, stream.manifest.count)
        self.bad = self.empty_captions = 0
        self._logged: set[str] = set()

    def __iter__(self):
        if self.num_workers == 0:
            source = iter(self.stream)
        else:
            # its own generator: a DataLoader otherwise draws its workers' base seed from torch's global RNG, which
            # training checkpoints (dropout), so opening a loader would change the run
            source = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                     prefetch_factor=self.prefetch_factor, generator=torch.Generator()))
        try:
            yield from self._checked(source)
        finally:    # stop the workers now, not when an exception that still references this frame is collected
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _checked(self, source):
        where = self.stream.manifest.folder
        while True:
            try:
                item = next(source)
            except StopIteration:
                return
            except Exception as e:  # the DataLoader's own failures: a worker killed, a lost pipe
                logger.debug("data loader failure", exc_info=True)
                raise NoisecraftError(f"A data-loading worker for {where} stopped ({type(e).__name__}: "
                                      f"{brief(e, 160)}); use fewer workers, or 0 to read in this process.") from None
            if isinstance(item, _Failure):
                if item.details:
                    logger.debug("%s", item.details)
                raise NoisecraftError(item.message)
            self._account(item)
            yield item

    def _account(self, batch: ShardBatch) -> None:
        for kind, message in batch.events:
            if kind == "caption":
                self.empty_captions += 1
                if self.empty_captions <= _CAPTION_WARNINGS:
                    logger.warning("%s", message)
                    if self.empty_captions == _CAPTION_WARNINGS:
                        logger.warning("further empty captions are counted without a message")
                continue
            self.bad += 1
            if message not in self._logged:
                self._logged.add(message)
                logger.warning("skipped: %s (%d skipped so far)", message, self.bad)
            if self.max_bad is not None and self.bad > self.max_bad:
                raise NoisecraftError(
                    f"Stopped after skipping {self.bad} unreadable samples of {self.stream.manifest.folder}, more than "
                    f"the limit of {self.max_bad} (the last: {message}); repair or rewrite the shards with "
                    "`noisecraft shard`, or raise the limit.")
