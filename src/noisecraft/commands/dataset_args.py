"""The dataset flags shared by every command that reads a dataset, and loading it from them."""

from __future__ import annotations


def load_data(args, split="train"):
    from ..data.datasets import load_dataset
    return load_dataset(args.dataset, split=split, data_dir=args.data_dir, image_size=args.image_size,
                        download=not args.no_download)


def add_data_args(q) -> None:
    """--dataset, --data-dir, --image-size, --no-download."""
    q.add_argument("--dataset", default="mnist", help="digits | mnist | fashion-mnist | cifar10 | folder:PATH")
    q.add_argument("--data-dir", default=None, help="where dataset files live (default $NOISECRAFT_DATA or ~/.cache/noisecraft)")
    q.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
    q.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
