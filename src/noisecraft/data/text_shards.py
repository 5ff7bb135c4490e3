"""A caption-embedding cache that scales with a shard set: the text encoder's token embeddings of every caption a
training step may ask for, computed once, one file per shard.

    noisecraft encode --text-encoder runs/clip --data shards/ --out cache/          (or under torchrun)
    noisecraft encode runs/vae --text-encoder runs/clip --data shards/ --out cache/ (latents and captions at once)
    noisecraft train --data shards/ --text-encoder runs/clip --text-cache cache/ --out runs/txt

A streamed text run otherwise embeds each batch's captions with the frozen text encoder at every step (sources.py's
`_StreamTexts`). With the cache it looks them up instead, so the text encoder is never run while training:

    cache/
      shard-000000.text.safetensors   ...   one per image shard: "contexts" (M×L×D) and "texts" (the UTF-8 JSON list of
                                            the M captions those rows embed; row 0 is "", the empty caption)
      text.json                             written last, by rank 0, after every process has finished

Keys. A sample may carry several captions (its .json "captions" list; the one a step uses depends on the seed and
the epoch), and a labelled set without captions is captioned from its class's templates, drawn per step. So a file
holds, for the samples of its shard, every caption any step may ask for — each sample's captions, or the templates
of the classes present — once each, plus "" (a dropped caption for classifier-free guidance, an empty caption, an
unreadable sample). Training finds a row by (the shard of the sample id, the caption the step chose): the very
choice and random draws of the on-the-fly path, so a run with the cache equals one without it up to float rounding
(the encoder runs on batches of captions here, on one caption at a time on the fly), and resumes bit for bit.

Fingerprint. Like the latent cache (latent_shards.py, whose writing protocol shard_cache.py shares): each file's
metadata names its image shard (name, sha256) and the cache's key, and a rerun of `noisecraft encode` reuses every
file that still matches; text.json holds the shards' fingerprint (`manifest_fingerprint`), the digest of the text
encoder (sha256 over the folder `TextEncoder.save` writes: weights, tokenizer and max length for our CLIP, the
reference for a Hugging Face folder — what a run keeps in `text_encoder/` and its in-memory cache hashes too), L, D,
the dtype and where the captions come from. A cache made from other shards, with another encoder or tokenizer,
another max length, or for class captions when the shards have their own, is refused in one sentence.

Reading: `TextCache.rows(ids, texts)` reads only the rows it needs from the memory-mapped files of the last few
shards it touched, so memory stays flat in the dataset's size even for CLIP's 77×768 embeddings. A file that is
missing or damaged, or a caption not in its shard's file, makes the row invalid (logged once), counted with the
unreadable samples against --max-bad.
"""

from __future__ import annotations

import bisect
import json
import logging
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..errors import NoisecraftError, brief
from ..io.checkpoint import save_json
from .captions import class_captions
from .shard_cache import cache_file, read_cache_manifest, write_per_shard
from .shards import Manifest, manifest_fingerprint, source_name
from .stream import ShardStream, open_shards

logger = logging.getLogger(__name__)

MANIFEST = "text.json"
FORMAT = "noisecraft-text"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def text_file(shard_file: str) -> str:
    """shard-000012.tar -> shard-000012.text.safetensors"""
    return cache_file(shard_file, "text")


def text_encoder_digest(encoder) -> str:
    """sha256 over the folder `encoder.save` writes, hashed as the run's own `text_encoder/` folder is hashed: the
    same encoder, tokenizer and max length give the same digest here and in a run that attached it."""
    from .encoded import _folder_digest
    with tempfile.TemporaryDirectory() as tmp:
        encoder.save(tmp)
        return _folder_digest(Path(tmp))


def caption_source(manifest: Manifest) -> tuple[str, list[list[str]] | None]:
    """Where a text run's captions come from: ("captions", None) for a set with captions, else ("class captions
    of NAME", each class's templates) for a labelled set of a built-in dataset."""
    if manifest.captions:
        return "captions", None
    if not manifest.labels:
        raise NoisecraftError(f"The shards in {manifest.folder} have neither captions nor labels to caption; a "
                              "text-conditional run needs one of them (write the shards from a folder with "
                              "captions.jsonl).")
    name = source_name(manifest)
    return f"class captions of {name}", class_captions(name)


# --------------------------------------------------------------------------------------------------
# Writing


def shard_captions(stream: ShardStream, index: int, class_texts: list[list[str]] | None) -> list[str]:
    """Every text a step may embed for a sample of shard `index`: "" first, then each sample's captions (or its
    class's templates), once each, in order of first appearance."""
    seen = {"": None}
    for texts, label in stream.shard_texts(index):
        if texts is None:
            logger.warning("no captions read: %s", label)
            continue
        options = texts if class_texts is None else (class_texts[label] if label >= 0 else [])
        for text in options:
            seen.setdefault(text)
    return list(seen)


def _encode_shard(encoder, stream: ShardStream, index: int, class_texts, dtype: torch.dtype,
                  batch_size: int) -> dict:
    """contexts and texts of one shard's file: the embeddings through encoded.py's `encode_prompts`, the function
    the in-memory and streamed paths embed with."""
    from .encoded import encode_prompts
    texts = shard_captions(stream, index, class_texts)
    contexts = encode_prompts(encoder, texts, batch_size).to(dtype).contiguous()
    blob = torch.frombuffer(bytearray(json.dumps(texts).encode("utf-8")), dtype=torch.uint8)
    return {"contexts": contexts, "texts": blob}


def encode_text_shards(text_encoder, shards: str | Path, out: str | Path, *, dtype: str = "float32", rank: int = 0,
                       world_size: int = 1, barrier=lambda: None, batch_size: int = 64, device: str = "cpu",
                       progress=None) -> dict | None:
    """Write the caption-embedding cache of the shard set `shards` under `out` (see the module docstring) with
    `text_encoder` (a spec for `load_text_encoder`: a train-clip run, a saved encoder, a Hugging Face folder,
    "minilm"); process `rank` of `world_size` encodes its shards. Returns the manifest on rank 0 (None elsewhere)."""
    from ..models.text_encoders import load_text_encoder
    if dtype not in DTYPES:
        raise NoisecraftError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NoisecraftError(f"the batch size must be a positive integer, got {batch_size!r}.")
    out = Path(out).expanduser()
    manifest = open_shards(shards)
    texts_from, class_texts = caption_source(manifest)
    stream = ShardStream(manifest, 1, decode=False)
    encoder = load_text_encoder(text_encoder)
    key = {"encoder": text_encoder_digest(encoder), "max_length": int(encoder.max_length), "dim": int(encoder.dim),
           "dtype": dtype, "texts": texts_from}
    encoder = encoder.to(device).eval().requires_grad_(False)
    written = write_per_shard(manifest, out, "text", FORMAT, json.dumps(key, sort_keys=True),
                              lambda s: _encode_shard(encoder, stream, s, class_texts, DTYPES[dtype], batch_size),
                              manifest_name=MANIFEST, rank=rank, world_size=world_size, barrier=barrier,
                              progress=progress)
    if written is None:
        return None
    files = []
    for s, path in written:
        info = manifest.shards[s]
        with safe_open(str(path), framework="pt") as f:
            rows = f.get_slice("contexts").get_shape()[0]
        files.append({"file": path.name, "shard": info.file, "count": info.count, "texts": rows,
                      "bytes": path.stat().st_size})
    result = {"format": FORMAT, "version": VERSION, "shards": str(manifest.folder.resolve()),
              "shards_fingerprint": manifest_fingerprint(manifest), "text_encoder": str(text_encoder),
              **key, "count": manifest.count, "files": files}
    save_json(result, out / MANIFEST)
    return result


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class TextCache:
    """An opened caption-embedding cache: `check` it against a run, then look up rows by (sample id, caption)."""

    folder: Path
    raw: dict
    keep: int = 18           # shard files held open (memory-mapped): the stream's window + 2

    def __post_init__(self):
        self.files = [e["file"] for e in self.raw["files"]]
        self.ends = np.cumsum([e["count"] for e in self.raw["files"]]).tolist()
        self.shape = (int(self.raw["max_length"]), int(self.raw["dim"]))
        self.opened: OrderedDict[int, tuple] = OrderedDict()
        self._warned: set = set()

    @property
    def fingerprint(self) -> str:
        return self.raw["shards_fingerprint"]

    def check(self, shards_fingerprint: str, encoder: str, max_length: int, dim: int, texts: str) -> None:
        """Refuse, in one sentence, a cache made from other shards, with another encoder or for other captions."""
        r, where = self.raw, self.folder
        fix = "write it again with `noisecraft encode --text-encoder`, or train without --text-cache"
        if r["shards_fingerprint"] != shards_fingerprint:
            raise NoisecraftError(f"the text cache in {where} was made from other shards (fingerprint "
                                  f"{r['shards_fingerprint'][:12]}, not {shards_fingerprint[:12]}); {fix}.")
        if (r["max_length"], r["dim"]) != (max_length, dim):
            raise NoisecraftError(f"the text cache in {where} holds {r['max_length']}x{r['dim']} caption embeddings, "
                                  f"but this run's text encoder gives {max_length}x{dim}; {fix}.")
        if r["encoder"] != encoder:
            raise NoisecraftError(f"the text cache in {where} was made with another text encoder or tokenizer "
                                  f"(digest {r['encoder'][:12]}, not {encoder[:12]}); {fix}.")
        if r["texts"] != texts:
            raise NoisecraftError(f"the text cache in {where} embeds {r['texts']}, but this run trains on {texts}; "
                                  f"{fix}.")

    def _warn_once(self, key, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _open(self, s: int):
        """(memory-mapped file, {caption: row}) of shard s, or None when its file is unusable (logged once)."""
        if s in self.opened:
            self.opened.move_to_end(s)
            return self.opened[s]
        path = self.folder / self.files[s]
        try:
            f = safe_open(str(path), framework="pt")
            texts = json.loads(f.get_tensor("texts").numpy().tobytes().decode("utf-8"))
            shape = tuple(f.get_slice("contexts").get_shape())
            if not isinstance(texts, list) or shape != (len(texts), *self.shape):
                raise NoisecraftError(f"{path} holds tensors of the wrong shape")
        except (OSError, SafetensorError, ValueError, NoisecraftError) as e:
            self._warn_once(("file", s), "text cache file unusable (%s); its samples are skipped", brief(e, 160))
            return None
        self._warned.discard(("file", s))
        self.opened[s] = (f, {t: i for i, t in enumerate(texts)})
        while len(self.opened) > self.keep:
            self.opened.popitem(last=False)
        return self.opened[s]

    def rows(self, ids: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings (float32 n×L×D) of caption texts[i] of sample ids[i], and which were found (bool, n);
        rows not found are zeros."""
        n = len(texts)
        contexts = torch.zeros((n, *self.shape))
        found = torch.zeros(n, dtype=torch.bool)
        for i, (sample_id, text) in enumerate(zip(ids.tolist(), texts)):
            s = bisect.bisect_right(self.ends, sample_id)
            got = self._open(s)
            if got is None:
                continue
            f, table = got
            row = table.get(text)
            if row is None:
                self._warn_once(("text", s), "%s lacks a caption of its shard (%s); such samples are skipped",
                                self.files[s], brief(repr(text), 60))
                continue
            contexts[i] = f.get_slice("contexts")[row].float()
            found[i] = True
        return contexts, found


def open_text_cache(folder: str | Path, keep: int = 18) -> TextCache:
    """The text cache in `folder`, after checking its manifest (its files are checked by size)."""
    folder = Path(folder).expanduser()
    needed = ("shards_fingerprint", "encoder", "max_length", "dim", "dtype", "texts")
    fix = f"write it with `noisecraft encode --text-encoder SPEC --data SHARDS --out {folder}`"
    raw = read_cache_manifest(folder, MANIFEST, FORMAT, VERSION, needed, what="Text cache", fix=fix)
    return TextCache(folder, raw, keep)
