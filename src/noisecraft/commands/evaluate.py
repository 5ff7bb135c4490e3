"""Evaluation commands: `noisecraft train-classifier`.

    noisecraft train-classifier --dataset mnist                   train (or reuse) the domain-score classifier
    noisecraft train-classifier --dataset digits --steps 50 --out /tmp/classifiers

The classifier (`noisecraft.evaluation.classifier`) provides the features of the FID-style domain score, of
precision/recall, and the accuracy of conditional samples. It is cached by dataset, version, steps and seed,
so `noisecraft eval` reuses the one trained here when it is given the same --steps and cache folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import NoisecraftError


def cmd_train_classifier(args) -> int:
    from ..data.datasets import dataset_name_for, load_dataset
    from ..evaluation.classifier import (
        DEFAULT_SEED,
        accuracy,
        classifier_directory,
        default_cache_dir,
        load_or_train_classifier,
        recipe_for,
    )

    if args.steps is not None and args.steps < 1:
        raise NoisecraftError(f"--steps must be a positive integer, got {args.steps}.")
    seed = DEFAULT_SEED if args.seed is None else args.seed
    steps = recipe_for(dataset_name_for(args.dataset, args.data_dir)).steps if args.steps is None else args.steps
    cache_dir = Path(args.out).expanduser() if args.out else default_cache_dir(args.data_dir)
    directory = classifier_directory(args.dataset, args.data_dir, cache_dir, steps, seed)
    cached = (directory / "classifier.json").is_file()
    if not cached:
        print(f"training the evaluation classifier on {args.dataset} ({steps} steps) -> {directory}")
    model = load_or_train_classifier(args.dataset, data_dir=args.data_dir, cache_dir=cache_dir, device=args.device,
                                     steps=steps, seed=seed, progress=not args.quiet)
    meta = json.loads((directory / "classifier.json").read_text())
    test_accuracy = meta.get("test_accuracy")
    if test_accuracy is None:    # cached by an older run without it: measure now (not written back)
        try:
            test_accuracy = accuracy(model, load_dataset(args.dataset, split="test", data_dir=args.data_dir))
        except NoisecraftError:
            pass                 # a dataset without a labelled test split (folder:PATH)
    where = "reused the cached classifier" if cached else "cached the classifier"
    timing = f", trained in {meta['train_seconds']:.0f} s" if "train_seconds" in meta and not cached else ""
    score = f"test accuracy {100 * test_accuracy:.2f}%" if test_accuracy is not None else "no labelled test split"
    print(f"{args.dataset}: {score} ({steps} steps{timing}); {where} in {directory}")
    return 0


def add_parsers(sub) -> None:
    """Register `train-classifier` on the sub-parsers of the noisecraft command line."""
    from ..evaluation.classifier import CIFAR10_RECIPE, DEFAULT_STEPS

    t = sub.add_parser("train-classifier",
                       help="train (or reuse) the small classifier behind the domain score and sample accuracy")
    t.add_argument("--dataset", default="mnist", help="digits | mnist | fashion-mnist | cifar10 | folder:PATH")
    t.add_argument("--data-dir", default=None,
                   help="where dataset files live (default $NOISECRAFT_DATA or ~/.cache/noisecraft)")
    t.add_argument("--steps", type=int, default=None,
                   help=f"Adam steps (default: the dataset's recipe, {DEFAULT_STEPS}, or {CIFAR10_RECIPE.steps} for "
                        f"cifar10); part of the cache key, so scores compare only between classifiers trained alike")
    t.add_argument("--out", default=None,
                   help="cache folder (default $NOISECRAFT_CACHE or ~/.cache/noisecraft/classifiers)")
    t.add_argument("--seed", type=int, default=None, help="training seed (default 0); part of the cache key")
    t.add_argument("--device", default="cpu")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_classifier)
