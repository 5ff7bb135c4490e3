"""`noisecraft encode`: the VAE posteriors of a shard set, computed once into a latent cache beside it, for `noisecraft
train --data SHARDS --latent VAE_RUN --latents DIR` (data/latent_shards.py).

    noisecraft encode runs/vae --data shards/ --out latents/
    torchrun --nproc-per-node 4 -m noisecraft encode runs/vae --data shards/ --out latents/ --device cuda
"""

from __future__ import annotations

from .arg_types import positive_int


def cmd_encode(args) -> int:
    from ..data.latent_shards import encode_shards
    from ..training.distributed import close_distributed, init_distributed

    distributed = init_distributed(args.device)
    say = print if distributed.is_main else (lambda *a, **k: None)

    def progress(done: int, total: int, reused: bool) -> None:
        if not args.quiet and (done == total or done % max(1, total // 10) == 0):
            say(f"  {done}/{total} shards{' (reused)' if reused else ''}"
                f"{' on process 0' if distributed.active else ''}", flush=True)

    try:
        manifest = encode_shards(args.vae_run, args.data, args.out, image_size=args.image_size, dtype=args.dtype,
                                 rank=distributed.rank, world_size=distributed.world_size,
                                 barrier=distributed.barrier, batch_size=args.batch_size,
                                 device=str(distributed.device), progress=progress)
    finally:
        close_distributed(distributed)
    if manifest is not None:
        shape = "x".join(map(str, manifest["latent_shape"]))
        size = sum(f["bytes"] for f in manifest["files"]) / 2**20
        bad = manifest["count"] - manifest["valid"]
        say(f"encoded {manifest['count']} images of {manifest['shards']} into {len(manifest['files'])} files of "
            f"{shape} {manifest['dtype']} latents ({size:.1f} MiB){f', {bad} unreadable' if bad else ''} -> "
            f"{args.out}")
    return 0


def add_parsers(sub) -> None:
    """Register `encode` on the sub-parsers of the noisecraft command line."""
    e = sub.add_parser("encode", help="cache the VAE latents of a shard set (one file per shard), for training with "
                                      "--latents; parallel under torchrun")
    e.add_argument("vae_run", metavar="VAE_RUN", help="a noisecraft train-vae run folder")
    e.add_argument("--data", required=True, metavar="SHARDS", help="the shard folder (noisecraft shard)")
    e.add_argument("--out", required=True, metavar="DIR",
                   help="the cache folder (may be the shard folder itself); files already there for the same shards "
                        "and VAE are reused, so an interrupted encode continues")
    e.add_argument("--image-size", type=positive_int, default=None,
                   help="centre-crop and resize to this square first, as train --image-size does (default: the "
                        "stored size)")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="how mean and std are stored (default float32; float16 halves the disk)")
    e.add_argument("--batch-size", type=positive_int, default=64, help="images per VAE forward (default 64)")
    e.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: one GPU per process)")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    e.set_defaults(func=cmd_encode)
