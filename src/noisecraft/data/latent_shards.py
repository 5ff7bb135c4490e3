"""A VAE latent cache that scales with a shard set: the posterior of every image, computed once, one file per shard.

    noisecraft encode runs/vae --data shards/ --out latents/            (or under torchrun, one shard per process)
    noisecraft train --data shards/ --latent runs/vae --latents latents/ --out runs/ldm

The in-memory cache of encoded.py holds the whole dataset's latents in one file, loaded whole. For a shard set the
cache is a folder beside it:

    latents/
      shard-000000.latents.safetensors   ...   one per image shard: "mean" and "std" (N×L×h×w) and "valid" (N,
                                               uint8) of that shard's samples in tar order, so row k is sample k
      latents.json                             written last, by rank 0, after every process has finished

Each file is written atomically (temporary name, rename) and carries in its safetensors metadata the image shard it
was made from (name and sha256) and the cache's key (the VAE's digest, the image shape, the dtype): a rerun of
`noisecraft encode` into the same folder reuses every file whose metadata still matches and encodes the rest, so an
interrupted job continues where it stopped. Process r of W encodes the shards s with s ≡ r (mod W); the files do not
depend on W. A sample whose image cannot be read is a row of zeros with valid 0; training gives it weight 0 and
counts it with the other unreadable samples.

`latents.json` holds what the trainer checks before it trusts the cache: the image shards' fingerprint
(`manifest_fingerprint`, the same one a run records), the digest of the VAE (sha256 over its config.json and
model.safetensors, hashed as encoded.py's `_folder_digest` hashes a run's `vae/` folder, which holds exactly those
two files), the image shape the images were cropped to, the latent shape, the scaling factor, the dtype and the
counts (samples, valid samples, per file with its byte size). A cache made from other shards, with another VAE or at
another image size is refused in one sentence, never silently used.

dtype: float32 by default, so that training from the cache equals encoding on the fly up to float rounding (the
convolutions run on other batch sizes). `--dtype float16` halves the disk (4×32×32 latents of 256² images: 16 KB a
sample instead of 32 KB): the relative rounding of μ and σ is 2^-11, far below the σ·ε noise every step adds for a
VAE whose σ is not tiny; σ below float16's normal range (6e-5) loses precision, so keep float32 for a VAE trained
with a very small KL weight.

Reading: `LatentCache.rows(ids)` gathers the rows of global sample ids (the ids the shard stream gives), so the
latents follow the pixel stream's order exactly; it keeps the files of the last few shards it touched in memory (the
stream reads a block of `window` shards at a time), so memory is flat in the dataset's size. A cache file that is
missing or damaged while training makes its rows invalid (logged once), like a missing image shard.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import NoisecraftError, brief
from ..io.checkpoint import load_weights, save_json
from .shard_cache import cache_file, read_cache_manifest, write_per_shard
from .shards import manifest_fingerprint
from .stream import ShardStream, open_shards

logger = logging.getLogger(__name__)

MANIFEST = "latents.json"
FORMAT = "noisecraft-latents"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}
VAE_FILES = ("config.json", "model.safetensors")


def latent_file(shard_file: str) -> str:
    """shard-000012.tar -> shard-000012.latents.safetensors"""
    return cache_file(shard_file, "latents")


def vae_digest(folder: str | Path) -> str:
    """sha256 over a VAE's config.json and model.safetensors (names and bytes, in the order and form of encoded.py's
    `_folder_digest`): a train-vae run and the copy a latent run keeps in `vae/` have the same digest."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in VAE_FILES:
        path = folder / name
        if not path.is_file():
            raise NoisecraftError(f"{folder} has no {name}; pass a `noisecraft train-vae` run folder.")
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Writing


def _encode_shard(vae, stream: ShardStream, index: int, dtype: torch.dtype, batch_size: int) -> dict:
    """mean, std, valid of one image shard's samples, in tar order (unreadable samples: zeros, valid 0)."""
    from ..models.vae_loading import encode_dataset
    means, stds, valid, pending = [], [], [], []

    def flush():
        if not pending:
            return
        rows = np.stack([p if p is not None else np.zeros((*stream.shape, stream.channels), np.uint8)
                         for p in pending])
        mean, std = encode_dataset(vae, torch.from_numpy(rows).permute(0, 3, 1, 2).contiguous(), batch_size)
        ok = torch.tensor([p is not None for p in pending])
        keep = ok.view(-1, *([1] * (mean.ndim - 1)))
        means.append(torch.where(keep, mean, 0.0))
        stds.append(torch.where(keep, std, 0.0))
        valid.append(ok)
        pending.clear()

    for pixels, why in stream.shard_pixels(index):
        if why is not None:
            logger.warning("not encoded: %s", why)
        pending.append(pixels)
        if len(pending) == batch_size:
            flush()
    flush()
    return {"mean": torch.cat(means).to(dtype), "std": torch.cat(stds).to(dtype),
            "valid": torch.cat(valid).to(torch.uint8)}


def encode_shards(vae_run: str | Path, shards: str | Path, out: str | Path, *, image_size: int | None = None,
                  dtype: str = "float32", rank: int = 0, world_size: int = 1, barrier=lambda: None,
                  batch_size: int = 64, device: str = "cpu", progress=None) -> dict | None:
    """Write the latent cache of the shard set `shards` under `out` (see the module docstring); process `rank` of
    `world_size` encodes its shards, `barrier()` waits for all of them. Returns the manifest on rank 0 (None
    elsewhere). progress(done, total, reused) is called after each of this process's shards."""
    from ..models.vae_loading import load_vae
    if dtype not in DTYPES:
        raise NoisecraftError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NoisecraftError(f"the batch size must be a positive integer, got {batch_size!r}.")
    vae_run, out = Path(vae_run), Path(out).expanduser()
    manifest = open_shards(shards)
    stream = ShardStream(manifest, 1, image_size=image_size)
    image_shape = (stream.channels, *stream.shape)
    vae, scaling_factor, _ = load_vae(vae_run, device)
    try:
        with torch.no_grad():
            latent_shape = tuple(int(s) for s in vae.encode(torch.zeros(1, *image_shape, device=device)).mean.shape[1:])
    except RuntimeError as e:
        raise NoisecraftError(f"the VAE in {vae_run} cannot encode the {'x'.join(map(str, image_shape))} images of "
                              f"{manifest.folder} ({brief(e, 120)}); use a VAE trained on images like these, or "
                              f"another --image-size.") from None
    key = {"vae": vae_digest(vae_run), "image_shape": list(image_shape), "dtype": dtype}
    key_text = json.dumps(key, sort_keys=True)
    written = write_per_shard(manifest, out, "latents", FORMAT, key_text,
                              lambda s: _encode_shard(vae, stream, s, DTYPES[dtype], batch_size),
                              manifest_name=MANIFEST, rank=rank, world_size=world_size, barrier=barrier,
                              progress=progress)
    if written is None:
        return None
    files, valid = [], 0
    for s, path in written:
        info = manifest.shards[s]
        with safe_open(str(path), framework="pt") as f:
            ok = int(f.get_tensor("valid").sum())
        files.append({"file": path.name, "shard": info.file, "count": info.count, "valid": ok,
                      "bytes": path.stat().st_size})
        valid += ok
    result = {"format": FORMAT, "version": VERSION, "shards": str(manifest.folder.resolve()),
              "shards_fingerprint": manifest_fingerprint(manifest), "vae_run": str(vae_run.resolve()),
              "vae": key["vae"], "image_shape": list(image_shape), "latent_shape": list(latent_shape),
              "scaling_factor": float(scaling_factor), "dtype": dtype, "count": manifest.count, "valid": valid,
              "files": files}
    save_json(result, out / MANIFEST)
    return result


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class LatentCache:
    """An opened latent cache: `check` it against a run, then gather rows by global sample id."""

    folder: Path
    raw: dict
    keep: int = 18           # shard files held in memory (the stream's window + 2)

    def __post_init__(self):
        self.files = [e["file"] for e in self.raw["files"]]
        self.counts = [e["count"] for e in self.raw["files"]]
        self.ends = np.cumsum(self.counts).tolist()
        self.latent_shape = tuple(self.raw["latent_shape"])
        self.loaded: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._warned: set[int] = set()

    @property
    def fingerprint(self) -> str:
        return self.raw["shards_fingerprint"]

    def check(self, shards_fingerprint: str, vae: str, image_shape, latent_shape) -> None:
        """Refuse, in one sentence, a cache made from other shards, with another VAE or at another size."""
        r, where = self.raw, self.folder
        fix = "write it again with `noisecraft encode`, or train without --latents"
        if r["shards_fingerprint"] != shards_fingerprint:
            raise NoisecraftError(f"the latent cache in {where} was made from other shards (fingerprint "
                                  f"{r['shards_fingerprint'][:12]}, not {shards_fingerprint[:12]}); {fix}.")
        if r["vae"] != vae:
            raise NoisecraftError(f"the latent cache in {where} was made with another VAE (digest {r['vae'][:12]}, "
                                  f"not {vae[:12]}); {fix}.")
        if tuple(r["image_shape"]) != tuple(image_shape) or tuple(r["latent_shape"]) != tuple(latent_shape):
            raise NoisecraftError(f"the latent cache in {where} holds {'x'.join(map(str, r['latent_shape']))} latents "
                                  f"of {'x'.join(map(str, r['image_shape']))} images, but this run trains on "
                                  f"{'x'.join(map(str, latent_shape))} latents of "
                                  f"{'x'.join(map(str, image_shape))} images; {fix}.")

    def _load(self, s: int):
        if s in self.loaded:
            self.loaded.move_to_end(s)
            return self.loaded[s]
        path = self.folder / self.files[s]
        n = self.counts[s]
        try:
            t = load_weights(path)
            mean, std, valid = t["mean"].float(), t["std"].float(), t["valid"].bool()
            if mean.shape != (n, *self.latent_shape) or std.shape != mean.shape or valid.shape != (n,):
                raise NoisecraftError(f"{path} holds tensors of the wrong shape")
        except (NoisecraftError, KeyError) as e:
            if s not in self._warned:
                self._warned.add(s)
                logger.warning("latent cache file unusable (%s); its %d samples are skipped", brief(e, 160), n)
            return None
        self._warned.discard(s)
        self.loaded[s] = (mean, std, valid)
        while len(self.loaded) > self.keep:
            self.loaded.popitem(last=False)
        return self.loaded[s]

    def rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 n×L×h×w and valid (bool, n) of the global sample ids; rows of unusable files are
        zeros with valid False."""
        n = len(ids)
        mean = torch.zeros((n, *self.latent_shape))
        std = torch.zeros((n, *self.latent_shape))
        valid = torch.zeros(n, dtype=torch.bool)
        for i, sample_id in enumerate(ids.tolist()):
            s = bisect.bisect_right(self.ends, sample_id)
            got = self._load(s)
            if got is None:
                continue
            k = sample_id - (self.ends[s - 1] if s else 0)
            mean[i], std[i], valid[i] = got[0][k], got[1][k], got[2][k]
        return mean, std, valid


def open_latent_cache(folder: str | Path, keep: int = 18) -> LatentCache:
    """The latent cache in `folder`, after checking its manifest (its files are checked by size)."""
    folder = Path(folder).expanduser()
    needed = ("shards_fingerprint", "vae", "image_shape", "latent_shape", "scaling_factor", "dtype")
    fix = f"write it with `noisecraft encode VAE_RUN --data SHARDS --out {folder}`"
    raw = read_cache_manifest(folder, MANIFEST, FORMAT, VERSION, needed, what="Latent cache", fix=fix)
    return LatentCache(folder, raw, keep)
