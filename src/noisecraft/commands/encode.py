"""`noisecraft encode`: what the frozen networks of a latent or text-conditional run compute from a shard set, computed
once into caches beside it, for `noisecraft train --data SHARDS ... --latents DIR --text-cache DIR`: the VAE
posteriors of its images (data/latent_shards.py) and/or the text encoder's embeddings of its captions
(data/text_shards.py). Both may go into one folder (their files and manifests have different names).

    noisecraft encode runs/vae --data shards/ --out cache/                            # latents
    noisecraft encode --text-encoder runs/clip --data shards/ --out cache/            # caption embeddings
    noisecraft encode runs/vae --text-encoder runs/clip --data shards/ --out cache/   # both
    torchrun --nproc-per-node 4 -m noisecraft encode runs/vae --data shards/ --out cache/ --device cuda
"""

from __future__ import annotations

from ..errors import NoisecraftError
from .arg_types import positive_int


def _progress(args, distributed, say, what: str):
    """A progress callback for one cache: a line every tenth of this process's shards."""
    def progress(done: int, total: int, reused: bool) -> None:
        if not args.quiet and (done == total or done % max(1, total // 10) == 0):
            say(f"  {what}: {done}/{total} shards{' (reused)' if reused else ''}"
                f"{' on process 0' if distributed.active else ''}", flush=True)
    return progress


def _report_latents(manifest: dict, out: str) -> str:
    shape = "x".join(map(str, manifest["latent_shape"]))
    size = sum(f["bytes"] for f in manifest["files"]) / 2**20
    bad = manifest["count"] - manifest["valid"]
    return (f"encoded {manifest['count']} images of {manifest['shards']} into {len(manifest['files'])} files of "
            f"{shape} {manifest['dtype']} latents ({size:.1f} MiB){f', {bad} unreadable' if bad else ''} -> {out}")


def _report_texts(manifest: dict, out: str) -> str:
    size = sum(f["bytes"] for f in manifest["files"]) / 2**20
    rows = sum(f["texts"] for f in manifest["files"])
    return (f"embedded the {manifest['texts']} of {manifest['count']} samples of {manifest['shards']} ({rows} "
            f"{manifest['max_length']}x{manifest['dim']} {manifest['dtype']} embeddings in {len(manifest['files'])} "
            f"files, {size:.1f} MiB) -> {out}")


def cmd_encode(args) -> int:
    from ..data.latent_shards import encode_shards
    from ..data.text_shards import encode_text_shards
    from ..training.distributed import close_distributed, init_distributed

    if args.vae_run is None and args.text_encoder is None:
        raise NoisecraftError("say what to encode: a VAE run (noisecraft encode VAE_RUN ...) for latents, "
                              "--text-encoder SPEC for caption embeddings, or both.")
    distributed = init_distributed(args.device)
    say = print if distributed.is_main else (lambda *a, **k: None)
    common = dict(dtype=args.dtype, rank=distributed.rank, world_size=distributed.world_size,
                  barrier=distributed.barrier, batch_size=args.batch_size, device=str(distributed.device))
    reports = []
    try:
        if args.vae_run is not None:
            manifest = encode_shards(args.vae_run, args.data, args.out, image_size=args.image_size,
                                     progress=_progress(args, distributed, say, "latents"), **common)
            reports.append(manifest and _report_latents(manifest, args.out))
        if args.text_encoder is not None:
            manifest = encode_text_shards(args.text_encoder, args.data, args.out,
                                          progress=_progress(args, distributed, say, "captions"), **common)
            reports.append(manifest and _report_texts(manifest, args.out))
    finally:
        close_distributed(distributed)
    for line in reports:
        if line:
            say(line)
    return 0


def add_parsers(sub) -> None:
    """Register `encode` on the sub-parsers of the noisecraft command line."""
    e = sub.add_parser("encode", help="cache the VAE latents and/or the caption embeddings of a shard set (one file "
                                      "per shard), for training with --latents / --text-cache; parallel under "
                                      "torchrun")
    e.add_argument("vae_run", metavar="VAE_RUN", nargs="?", default=None,
                   help="a noisecraft train-vae run folder: cache its latents of the images (optional with "
                        "--text-encoder)")
    e.add_argument("--text-encoder", default=None, metavar="SPEC",
                   help="cache this text encoder's embeddings of the captions (or, for a labelled set without "
                        "captions, of its class captions): the --text-encoder given to train (a train-clip run, a "
                        "Hugging Face folder, or 'minilm')")
    e.add_argument("--data", required=True, metavar="SHARDS", help="the shard folder (noisecraft shard)")
    e.add_argument("--out", required=True, metavar="DIR",
                   help="the cache folder (may be the shard folder itself, and may hold both caches); files already "
                        "there for the same shards and VAE or text encoder are reused, so an interrupted encode "
                        "continues")
    e.add_argument("--image-size", type=positive_int, default=None,
                   help="latents: centre-crop and resize to this square first, as train --image-size does (default: "
                        "the stored size)")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="how latents and embeddings are stored (default float32; float16 halves the disk)")
    e.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per VAE forward, captions per text-encoder forward (default 64)")
    e.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: one GPU per process)")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    e.set_defaults(func=cmd_encode)
