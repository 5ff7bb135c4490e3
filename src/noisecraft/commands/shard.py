"""`noisecraft shard`: write a dataset as WebDataset-style tar shards with a manifest, for streaming training.

    noisecraft shard mnist --out shards/mnist --shard-size 1000
    noisecraft shard fashion-mnist --split test --out shards/fashion-test
    noisecraft shard photos/ --out shards/photos --image-size 256 --format jpg --quality 90
"""

from __future__ import annotations

from .arg_types import int_at_least, positive_int


def cmd_shard(args) -> int:
    from ..data.shards import summary_lines, write_shards

    def progress(done: int, total: int, images: int) -> None:
        if not args.quiet and (done == total or done % max(1, total // 10) == 0):
            print(f"  {done}/{total} shards, {images} images", flush=True)

    manifest = write_shards(args.source, args.out, shard_size=args.shard_size, split=args.split,
                            image_size=args.image_size, image_format=args.format, quality=args.quality,
                            seed=args.seed, shuffle=not args.no_shuffle, overwrite=args.overwrite,
                            data_dir=args.data_dir, download=not args.no_download, progress=progress)
    for line in summary_lines(manifest):
        print(line)
    return 0


def add_parsers(sub) -> None:
    """Register `shard` on the sub-parsers of the noisecraft command line."""
    s = sub.add_parser("shard", help="write a dataset as tar shards (WebDataset layout) with a manifest, for "
                                     "streaming training")
    s.add_argument("source", metavar="SRC",
                   help="a folder of images (loose, or one sub-folder per class; captions.jsonl/csv optional) or a "
                        "built-in dataset: digits, mnist, fashion-mnist, cifar10 (write ./NAME for a folder named so)")
    s.add_argument("--out", required=True, help="the folder for the shards and manifest.json")
    s.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--split", choices=("train", "test"), default="train", help="built-in datasets: which split")
    s.add_argument("--image-size", type=positive_int, default=None,
                   help="centre-crop and resize every image to this square size before storing")
    s.add_argument("--format", choices=("png", "jpg", "webp"), default=None,
                   help="how images are stored (default: PNG; a folder's PNG/JPEG/WebP files are copied unchanged)")
    s.add_argument("--quality", type=int_at_least(1), default=95, help="JPEG/WebP quality, 1-100 (default 95)")
    s.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)")
    s.add_argument("--no-shuffle", action="store_true", help="keep the source order instead of shuffling")
    s.add_argument("--overwrite", action="store_true", help="replace the shards and manifest already in --out")
    s.add_argument("--data-dir", default=None,
                   help="where built-in dataset files live (default $NOISECRAFT_DATA or ~/.cache/noisecraft)")
    s.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_shard)
