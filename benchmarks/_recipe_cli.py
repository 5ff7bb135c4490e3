"""The command line the peer recipes share when run on their own (lucidrains_recipe.py, smalldiffusion_recipe.py):
the common flags, the domain scorer, and drawing one sample set per step count with a grid and a results.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def add_common_arguments(parser, out: str) -> None:
    """Budget, sampling, scoring and output flags; each recipe adds its own (--sample-steps, --batch-size, ...)."""
    parser.add_argument("--minutes", type=float, default=1.0, help="training time budget (default 1: smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps instead")
    parser.add_argument("--n", type=int, default=64, help="number of images to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--score", action="store_true",
                        help="also compute the domain score vs the MNIST test split (trains the classifier once)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $NOISECRAFT_DATA)")
    parser.add_argument("--cache-dir", default=None, help="classifier cache")
    parser.add_argument("--out", default=out, help="folder for grids and results")


def domain_scorer(args):
    """images -> the FID-style domain score against the MNIST test split, or None without --score."""
    if not args.score:
        return None
    from noisecraft.data.datasets import load_dataset
    from noisecraft.evaluation.classifier import load_or_train_classifier
    from noisecraft.evaluation.fid import domain_fid, reference_statistics

    classifier = load_or_train_classifier("mnist", data_dir=args.data_dir, cache_dir=args.cache_dir)
    reference = reference_statistics(load_dataset("mnist", split="test", data_dir=args.data_dir), classifier)
    return lambda images: domain_fid(images, reference, classifier)


def draw_sample_sets(args, model, sample_recipe, name_for, results: dict) -> None:
    """One sample set per --sample-steps value: grid, value range, seconds and (with --score) the score, into
    results["samplers"]; then OUT/results.json."""
    from noisecraft.viz.images import save_grid

    out, scorer = Path(args.out), domain_scorer(args)
    results.update(n=args.n, seed=args.seed, threads=torch.get_num_threads(), samplers={})
    for sample_steps in args.sample_steps:
        start = time.perf_counter()
        samples = sample_recipe(model, args.n, steps=sample_steps, seed=args.seed, progress=True)
        seconds = time.perf_counter() - start
        name = name_for(sample_steps)
        grid = save_grid(samples[:64], out / f"samples_{name}.png", nrow=8)
        entry = {"nfe": sample_steps, "seconds": round(seconds, 2),
                 "min": float(samples.min()), "max": float(samples.max()), "mean": float(samples.mean())}
        if scorer is not None:
            entry["domain_fid"] = scorer(samples)
        results["samplers"][name] = entry
        score = f", domain FID {entry['domain_fid']:.3f}" if "domain_fid" in entry else ""
        print(f"  {name}: {args.n} images {tuple(samples.shape[1:])} in {seconds:.1f}s, "
              f"range [{entry['min']:.2f}, {entry['max']:.2f}], mean {entry['mean']:.3f}{score}; grid {grid}")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
