"""Where the diffusion trainer's batches come from: a dataset held in memory (the default), or a shard set streamed
from disk (`noisecraft train --data shards/`).

Both are batch sources with one method the trainer calls once per step:

    source.batch(step, generator, drop, shard) -> StepBatch(x0, cond, valid)

`shard` is this process's slice of the global batch (`Distributed.shard`), `drop` the label/caption dropout, and every
random number of the step's data (latent noise, caption choice, dropout) is drawn from `generator` for the WHOLE global
batch, in the same order on both paths, whatever the data holds. So the trainer's generator advances the same way in
every process, on every restart and whether or not a sample was readable: resume stays exact and W processes equal one.

In memory (`MemorySource`): step k gathers `EpochOrder`'s indices through `TrainingBatches` (batches.py), with the
cached VAE latents and text embeddings of encoded.py. Streamed (`StreamSource`): step k is global batch k of a
`ShardStream` (stream.py) started at sample k·batch_size — the order is a function of (seed, step) too, so no loader
state is checkpointed: a resumed run opens the stream at its step and reads on from the same sample. Rows whose sample
could not be read come back with valid=False; the trainer gives them weight 0 (and counts them).

What streaming does on the fly, for now: a latent run encodes each streamed batch with the frozen VAE (one encoder
forward per image per step) unless it was given a latent cache (`noisecraft encode`, latent_shards.py; `train
--latents`): then the posteriors are looked up by sample id, no image is decoded, and z = μ + σ·ε takes ε from the
generator exactly as on the fly. A text run embeds each batch's captions with the frozen text encoder, one caption at
a time (a caption's embedding then never depends on what else was in its batch, so resume is exact) behind a cache
of recently seen captions bounded in bytes (class-template captions are embedded once; unique captions once per
visit), unless it was given a caption-embedding cache (`noisecraft encode --text-encoder`, text_shards.py; `train
--text-cache`): then the same captions are chosen with the same draws and their embeddings are looked up.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import NoisecraftError
from .batches import TrainingBatches
from .datasets import ImageDataset
from .encoded import _folder_digest, build_batches, encode_prompts
from .latent_shards import LatentCache, open_latent_cache, vae_digest
from .order import EpochOrder
from .shards import Manifest, manifest_fingerprint, source_name
from .stream import ShardLoader, ShardStream, bad_limit, open_shards
from .text_shards import TextCache, caption_source, open_text_cache

DEFAULT_MAX_BAD = 100
TEXT_CACHE_BYTES = 64 * 2**20


@dataclass
class StepBatch:
    """One step's data for this process: x0 and cond for its rows of the global batch; valid (bool, per row) is None
    when every row is usable (in memory), else False where the sample could not be read."""

    x0: torch.Tensor
    cond: torch.Tensor | None
    valid: torch.Tensor | None = None


def default_workers() -> int:
    """Data-loading processes when none are asked for: one core is left to training, at most 2 workers (2 cores: 1
    worker; 1 core: decode in the training process). benchmarks/stream_data.py measured them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, min(2, cores - 1))


@dataclass
class ShardDataset:
    """A shard set as the trainer sees it instead of an ImageDataset: what it holds (name, image shape, classes,
    count), and how to stream it (image_size for ShardStream, DataLoader workers, the bad-sample limit)."""

    manifest: Manifest
    image_shape: tuple[int, int, int]
    image_size: int | None
    workers: int = 0
    max_bad: float = DEFAULT_MAX_BAD
    window: int = 16
    latents: LatentCache | None = None     # the posteriors of every image, from `noisecraft encode` (None: encode now)
    text_cache: TextCache | None = None    # the captions' embeddings, from `noisecraft encode --text-encoder`
    labels = None          # no label tensor in memory: `has_labels` says whether the samples carry them

    @property
    def name(self) -> str:
        return source_name(self.manifest)

    @property
    def folder(self) -> Path:
        return self.manifest.folder

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.manifest.class_names)

    @property
    def has_labels(self) -> bool:
        return self.manifest.labels

    @property
    def fingerprint(self) -> str:
        return manifest_fingerprint(self.manifest)

    def __len__(self) -> int:
        return self.manifest.count

    def __repr__(self) -> str:
        return (f"ShardDataset(folder={str(self.folder)!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"shards={len(self.manifest.shards)})")


def open_shard_dataset(folder, image_size: int | None = None, *, workers: int | None = None,
                       max_bad: float = DEFAULT_MAX_BAD, verify: str = "size", latents=None,
                       text_cache=None) -> ShardDataset:
    """The shard set in `folder` for training: images centre-cropped and resized to image_size² (None: the stored
    size, which must then be one size), decoded by `workers` processes (None: `default_workers()`); `latents`,
    `text_cache`: the folders of its latent and caption-embedding caches (`noisecraft encode`), checked against the
    run when training starts."""
    manifest = open_shards(folder, verify)
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise NoisecraftError(f"--workers must be an integer >= 0, got {workers!r}.")
    if image_size is None:
        if len(manifest.sizes) > 1:
            raise NoisecraftError(f"The shards in {manifest.folder} hold images of {len(manifest.sizes)} sizes; pass "
                                  "--image-size to centre-crop and resize them all to one square.")
        w, h = manifest.sizes[0]
        shape = (manifest.channels, h, w)
        image_size = h if h == w else None      # a square of the stored size: cropping and resizing change nothing
    else:
        shape = (manifest.channels, image_size, image_size)
    data = ShardDataset(manifest, shape, image_size, workers, max_bad)
    if latents is not None:
        data.latents = open_latent_cache(latents, keep=data.window + 2)
    if text_cache is not None:
        data.text_cache = open_text_cache(text_cache, keep=data.window + 2)
    return data


# --------------------------------------------------------------------------------------------------
# In memory


class MemorySource:
    """An ImageDataset in memory: step k's examples are `order.indices(k)`, gathered by `batches`."""

    def __init__(self, batches: TrainingBatches, order: EpochOrder):
        self.batches, self.order = batches, order
        self.bad = 0

    def batch(self, step: int, generator: torch.Generator, drop: float, shard: slice) -> StepBatch:
        x0, cond = self.batches.batch(self.order.indices(step), generator, drop, shard=shard)
        return StepBatch(x0, cond)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Streamed: x0 and cond of a ShardBatch, drawing from the generator as batches.py does


class _StreamPixels:
    def __call__(self, batch, generator: torch.Generator, n: int, shard: slice) -> torch.Tensor:
        return batch.pixels()


class _StreamLatents:
    """z = s·(μ + σ·ε) of the frozen VAE posterior of each streamed image, encoded now (ε: the whole batch's)."""

    def __init__(self, vae, scaling_factor: float, latent_shape):
        self.vae, self.scaling_factor, self.latent_shape = vae, float(scaling_factor), tuple(latent_shape)

    def __call__(self, batch, generator: torch.Generator, n: int, shard: slice) -> torch.Tensor:
        from ..models.vae_loading import encode_dataset
        eps = torch.randn((n, *self.latent_shape), generator=generator)[shard]
        mean, std = encode_dataset(self.vae, batch.images)
        return (mean + std * eps) * self.scaling_factor


class _CachedLatents:
    """z = s·(μ + σ·ε) with μ, σ the cached posterior of each streamed sample, found by its id (ε as on the fly). A
    row the cache marks unreadable becomes an invalid row of the batch, counted in `bad` (more than max_bad: stop;
    None: count only, the limit is applied to the total over processes)."""

    needs_pixels = False

    def __init__(self, cache: LatentCache, scaling_factor: float, max_bad: int | None):
        self.cache, self.scaling_factor, self.max_bad = cache, float(scaling_factor), max_bad
        self.bad = 0

    def __call__(self, batch, generator: torch.Generator, n: int, shard: slice) -> torch.Tensor:
        eps = torch.randn((n, *self.cache.latent_shape), generator=generator)[shard]
        mean, std, ok = self.cache.rows(batch.ids)
        self.bad += int((batch.valid & ~ok).sum())
        if self.max_bad is not None and self.bad > self.max_bad:
            raise NoisecraftError(f"Stopped after {self.bad} samples without a usable latent in {self.cache.folder}, "
                                  f"more than the limit of {self.max_bad}; encode the shards again with "
                                  "`noisecraft encode`, or raise the limit.")
        batch.valid = batch.valid & ok
        return (mean + std * eps) * self.scaling_factor


class _StreamLabels:
    """The class label, or the null label `num_classes` when dropped (or when the sample was unreadable)."""

    def __init__(self, num_classes: int):
        self.null = num_classes

    def __call__(self, batch, generator: torch.Generator, drop: float, n: int, shard: slice) -> torch.Tensor:
        dropped = (torch.rand(n, generator=generator) < drop)[shard]
        return torch.where(dropped | (batch.labels < 0), torch.full_like(batch.labels, self.null), batch.labels)


class _StreamTexts:
    """Token embeddings of each sample's caption ("" when dropped): the shard's own caption, or for a labelled set of
    a built-in dataset one of its class's template captions, drawn uniformly as `Captions.sample` does."""

    def __init__(self, encoder, class_texts: list[list[str]] | None, budget: int = TEXT_CACHE_BYTES):
        self.encoder, self.class_texts, self.budget = encoder, class_texts, budget
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cached_bytes = 0

    def texts(self, batch, generator: torch.Generator, drop: float, n: int, shard: slice) -> list[str]:
        if self.class_texts is not None:
            u = torch.rand(n, generator=generator)[shard]
            texts = []
            for label, x in zip(batch.labels.tolist(), u.tolist()):
                options = self.class_texts[label] if label >= 0 else [""]
                texts.append(options[min(int(x * len(options)), len(options) - 1)])
        else:
            texts = list(batch.captions)
        dropped = (torch.rand(n, generator=generator) < drop)[shard].tolist()
        return ["" if d else t for t, d in zip(texts, dropped)]

    def embed(self, text: str) -> torch.Tensor:
        if text in self.cache:
            self.cache.move_to_end(text)
            return self.cache[text]
        with torch.no_grad():
            context = encode_prompts(self.encoder, [text])[0]
        self.cache[text] = context
        self.cached_bytes += context.numel() * context.element_size()
        while self.cached_bytes > self.budget and len(self.cache) > 1:
            old = self.cache.popitem(last=False)[1]
            self.cached_bytes -= old.numel() * old.element_size()
        return context

    def __call__(self, batch, generator: torch.Generator, drop: float, n: int, shard: slice) -> torch.Tensor:
        return torch.stack([self.embed(t) for t in self.texts(batch, generator, drop, n, shard)])


class _CachedTexts(_StreamTexts):
    """The captions `_StreamTexts` chooses, with the same random draws, embedded by a lookup in the text cache
    (`noisecraft encode --text-encoder`) instead of the text encoder. A caption the cache lacks makes its row
    invalid, counted in `bad`."""

    def __init__(self, cache: TextCache, class_texts: list[list[str]] | None):
        super().__init__(None, class_texts, budget=0)
        self.cache, self.bad = cache, 0

    def __call__(self, batch, generator: torch.Generator, drop: float, n: int, shard: slice) -> torch.Tensor:
        contexts, found = self.cache.rows(batch.ids, self.texts(batch, generator, drop, n, shard))
        self.bad += int((batch.valid & ~found).sum())
        batch.valid = batch.valid & found
        return contexts


class StreamSource:
    """A shard set streamed for one process: global batch `step` of a ShardStream (this rank's rows of it) as x0 and
    cond. The loader (with its worker processes) is opened at the first step asked for and reopened whenever a step
    is asked for out of turn, so a resumed trainer needs nothing but its step.

    The bad-data limit (`--max-bad`) applies to the total over processes: `bad` counts this process's unusable
    samples (unreadable ones, and those a cache has no row for) and the trainer calls `check_total` with the sum
    over ranks at every step. On one process the loader and the latent cache also stop by themselves, naming the
    last bad sample; under torchrun they only count, so that no rank stops without the others."""

    def __init__(self, data: ShardDataset, batch_size: int, seed: int, rank: int, world_size: int, images,
                 condition=None):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.images, self.condition = images, condition
        self.limit = bad_limit(data.max_bad, len(data))
        self.bad = 0                  # unusable samples met by this process (the trainer counts its rows)
        self._closed_bad = 0          # ... by its loaders closed so far
        self._loader = self._batches = None
        self._next = None

    def _open(self, step: int) -> None:
        self.close()
        d = self.data
        stream = ShardStream(d.manifest, self.batch_size, image_size=d.image_size, channels=d.image_shape[0],
                             seed=self.seed, rank=self.rank, world_size=self.world_size,
                             start=step * self.batch_size, window=d.window,
                             decode=getattr(self.images, "needs_pixels", True))
        self._loader = ShardLoader(stream, num_workers=d.workers, max_bad=self.limit if self.world_size == 1 else None)
        self._batches, self._next = iter(self._loader), step

    def batch(self, step: int, generator: torch.Generator, drop: float, shard: slice) -> StepBatch:
        if self._batches is None or step != self._next:
            self._open(step)
        got = next(self._batches)
        self._next = step + 1
        if got.position != step * self.batch_size or len(got.ids) != shard.stop - shard.start:
            raise NoisecraftError(f"the shard stream gave samples {got.position}.. ({len(got.ids)} of them) for step "
                                  f"{step}; please report this bug.")
        n = self.batch_size
        x0 = self.images(got, generator, n, shard)
        cond = None if self.condition is None else self.condition(got, generator, drop, n, shard)
        self.bad = (self._closed_bad + self._loader.bad + getattr(self.images, "bad", 0)
                    + getattr(self.condition, "bad", 0))
        return StepBatch(x0, cond, got.valid)

    def check_total(self, total: int) -> None:
        """Stop, in the same sentence on every process, once `total` unusable samples (summed over processes) are
        more than the limit."""
        if total > self.limit:
            over = f" over {self.world_size} processes" if self.world_size > 1 else ""
            raise NoisecraftError(
                f"Stopped after {total} unusable samples of {self.data.folder}{over} (images that could not be read, "
                f"or rows missing from a cache), more than the limit of {self.limit}; repair or rewrite the shards "
                "(`noisecraft shard`) or the caches (`noisecraft encode`), or raise --max-bad.")

    def close(self) -> None:
        """Stop the loader's worker processes (a later batch() opens it again)."""
        if self._batches is not None:
            self._batches.close()
        if self._loader is not None:
            self._closed_bad += self._loader.bad
        self._loader = self._batches = self._next = None


def _stream_source(config: RunConfig, data: ShardDataset, run_dir: Path, rank: int, world_size: int) -> StreamSource:
    from ..components import TEXT_DIR, VAE_DIR, load_text_component, load_vae_component
    if data.latents is not None and config.latent is None:
        raise NoisecraftError("--latents gives VAE latents, but this run trains on pixels; add --latent VAE_RUN "
                              "(the VAE the cache was made with), or drop --latents.")
    if data.text_cache is not None and config.text is None:
        raise NoisecraftError("--text-cache gives caption embeddings, but this run is not text-conditional; add "
                              "--text-encoder SPEC (the encoder the cache was made with), or drop --text-cache.")
    if data.latents is not None:
        data.latents.check(data.fingerprint, vae_digest(run_dir / VAE_DIR), data.image_shape,
                           config.latent.latent_shape)
        limit = bad_limit(data.max_bad, len(data)) if world_size == 1 else None    # torchrun: the trainer's total
        images = _CachedLatents(data.latents, config.latent.scaling_factor, limit)
    elif config.latent is not None:
        vae, scaling_factor = load_vae_component(run_dir)
        images = _StreamLatents(vae, scaling_factor, config.latent.latent_shape)
    else:
        images = _StreamPixels()
    if config.text is not None:
        texts_from, class_texts = caption_source(data.manifest)
        if data.text_cache is not None:
            data.text_cache.check(data.fingerprint, _folder_digest(run_dir / TEXT_DIR), config.text.max_length,
                                  config.text.dim, texts_from)
            condition = _CachedTexts(data.text_cache, class_texts)
        else:
            condition = _StreamTexts(load_text_component(run_dir), class_texts)
    elif config.data.conditional:
        condition = _StreamLabels(config.model.num_classes)
    else:
        condition = None
    return StreamSource(data, config.train.batch_size, config.train.seed, rank, world_size, images, condition)


def build_source(config: RunConfig, dataset: ImageDataset | ShardDataset, run_dir: str | Path, *, rank: int = 0,
                 world_size: int = 1, batches: TrainingBatches | None = None):
    """The batch source of a diffusion run: streamed for a ShardDataset, else in memory (with `batches`, or the
    run's cached latents and embeddings from encoded.py)."""
    if isinstance(dataset, ShardDataset):
        return _stream_source(config, dataset, Path(run_dir), rank, world_size)
    batches = batches if batches is not None else build_batches(config, dataset, run_dir)
    return MemorySource(batches, EpochOrder(len(dataset), config.train.batch_size, config.train.seed))
