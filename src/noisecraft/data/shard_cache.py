"""What the per-shard caches of `noisecraft encode` share: one safetensors file per image shard, written by the
process that owns the shard, reused when its metadata still matches, vouched for by a manifest written last.

Both caches (VAE latents, latent_shards.py; caption embeddings, text_shards.py) follow the same protocol:

    1. rank 0 removes the cache's manifest (the files are about to change: nothing may vouch for them meanwhile);
    2. process r of W writes the files of the shards s ≡ r (mod W), atomically, each carrying in its metadata the
       image shard it was made from (name and sha256) and the cache's key; a file whose metadata already matches is
       kept, so an interrupted encode continues where it stopped and the files never depend on W;
    3. after every process is done, rank 0 checks every file's metadata again and writes the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import NoisecraftError
from ..io.checkpoint import load_json, save_weights
from .shards import Manifest

logger = logging.getLogger(__name__)


def cache_file(shard_file: str, kind: str) -> str:
    """shard-000012.tar, "latents" -> shard-000012.latents.safetensors"""
    return f"{shard_file.rsplit('.', 1)[0]}.{kind}.safetensors"


def file_metadata(path: Path) -> dict | None:
    """The metadata of a safetensors file, or None when it is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError, ValueError):
        return None


def write_per_shard(manifest: Manifest, out: Path, kind: str, fmt: str, key_text: str, compute, *,
                    manifest_name: str, rank: int = 0, world_size: int = 1, barrier=lambda: None,
                    progress=None) -> list[tuple[int, Path]] | None:
    """Steps 1-3 of the module docstring for one cache: compute(s) gives the tensors of image shard s.
    Returns [(shard index, file path)] for every shard on rank 0 once all are written and checked (None
    elsewhere); progress(done, total, reused) is called after each of this process's shards."""
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / manifest_name).unlink(missing_ok=True)
    barrier()

    def meta(s: int) -> dict:
        info = manifest.shards[s]
        return {"format": fmt, "shard": info.file, "shard_sha256": info.sha256, "key": key_text}

    mine = list(range(rank, len(manifest.shards), world_size))
    for done, s in enumerate(mine, 1):
        path = out / cache_file(manifest.shards[s].file, kind)
        reused = path.is_file() and file_metadata(path) == meta(s)
        if not reused:
            save_weights(compute(s), path, metadata=meta(s))
        if progress is not None:
            progress(done, len(mine), reused)
    barrier()
    if rank != 0:
        return None
    files = []
    for s, info in enumerate(manifest.shards):
        path = out / cache_file(info.file, kind)
        if file_metadata(path) != meta(s):
            raise NoisecraftError(f"{path} was not written by this encode (another process changed the folder); "
                                  "run `noisecraft encode` again.")
        files.append((s, path))
    return files


def read_cache_manifest(folder: Path, manifest_name: str, fmt: str, version: int, needed: tuple[str, ...], *,
                        what: str, fix: str) -> dict:
    """The checked manifest of a per-shard cache in `folder`: one sentence (what is wrong, `fix`) when it is missing,
    of another format or version, or lacks a field; a warning for each listed file that is missing or has another
    size (its samples are skipped, counted by --max-bad)."""
    path = folder / manifest_name
    if not path.is_file():
        why = "does not exist" if not folder.exists() else f"has no {manifest_name} (its encoding did not finish)"
        raise NoisecraftError(f"{what} {folder} {why}; {fix}.")
    raw = load_json(path)
    if not isinstance(raw, dict) or raw.get("format") != fmt or raw.get("version") != version:
        raise NoisecraftError(f"{path} is not a version-{version} noisecraft {what.lower()} manifest; {fix}.")
    if any(k not in raw for k in needed + ("files",)) or not isinstance(raw["files"], list) or not raw["files"]:
        raise NoisecraftError(f"{path} lacks some of {', '.join(needed + ('files',))}; {fix}.")
    if not all(isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("count"), int)
               and isinstance(e.get("bytes"), int) for e in raw["files"]):
        raise NoisecraftError(f"{path} has a malformed entry in \"files\" (needs file, count, bytes); {fix}.")
    for e in raw["files"]:
        file = folder / e["file"]
        if not file.is_file() or file.stat().st_size != e["bytes"]:
            logger.warning("%s is missing or differs from %s; its samples will be skipped", file, manifest_name)
    return raw
