"""Quality on a CPU budget: noisecraft's defaults vs diffusers' MNIST tutorial recipe, same minutes, same score.

    python benchmarks/mnist_budget.py --minutes 20            # the issue's benchmark (≈ 45 min in all)
    python benchmarks/mnist_budget.py --minutes 2 --n 200     # a quick look

Both models train for the same wall-clock minutes on MNIST's train split, then draw `--n` samples with
DDIM-50; each set is scored with the FID-style domain score (Fréchet distance of features of a small MNIST
classifier, trained once and cached; NOT comparable to published Inception FID) against the test split.
Prints a table and writes grids and results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noisecraft.config import make_run_config  # noqa: E402
from noisecraft.data.datasets import load_dataset  # noqa: E402
from noisecraft.evaluation.classifier import load_or_train_classifier  # noqa: E402
from noisecraft.evaluation.fid import domain_fid, reference_statistics  # noqa: E402
from noisecraft.models.unet import count_parameters  # noqa: E402
from noisecraft.pipelines.diffusion import DiffusionPipeline  # noqa: E402
from noisecraft.training.trainer import Trainer  # noqa: E402
from noisecraft.viz.images import save_grid  # noqa: E402


def run_noisecraft(train, minutes, n, out: Path, seed=0):
    run = out / "noisecraft_run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    config = make_run_config(train, train={"minutes": minutes, "seed": seed, "sample_every": 0,
                                           "checkpoint_every": 2000})
    trainer = Trainer(config, train, run)
    summary = trainer.fit()
    pipe = DiffusionPipeline.from_run(run)
    t0 = time.perf_counter()
    images = pipe.sample(n, sampler="ddim", steps=50, seed=seed).images
    sample_s = time.perf_counter() - t0
    save_grid(images[:64], out / "noisecraft_grid.png", nrow=8)
    return images, {"parameters": count_parameters(trainer.model), "steps": summary["steps"],
                    "train_images_per_s": summary["images_per_s"], "sample_s_per_1000": sample_s / n * 1000}


def run_recipe(train, minutes, n, out: Path, seed=0):
    from diffusers_recipe import sample_recipe, train_recipe

    model, stats = train_recipe(train, minutes=minutes, seed=seed)
    t0 = time.perf_counter()
    images = sample_recipe(model, n, steps=50, seed=seed)
    sample_s = time.perf_counter() - t0
    save_grid(images[:64], out / "recipe_grid.png", nrow=8)
    return images, {"parameters": stats["parameters"], "steps": stats["steps"],
                    "train_images_per_s": stats["images_per_s"], "sample_s_per_1000": sample_s / n * 1000}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="training budget for each model")
    p.add_argument("--n", type=int, default=1000, help="samples scored per model")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None, help="classifier cache (default ~/.cache/noisecraft/classifiers)")
    p.add_argument("--skip-recipe", action="store_true", help="only train and score noisecraft")
    p.add_argument("--out", default="benchmarks/out/mnist_budget")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train = load_dataset("mnist", "train", data_dir=args.data_dir)
    test = load_dataset("mnist", "test", data_dir=args.data_dir)
    classifier = load_or_train_classifier("mnist", data_dir=args.data_dir, cache_dir=args.cache_dir)
    reference = reference_statistics(test, classifier)

    results = {"minutes": args.minutes, "n": args.n, "torch_threads": torch.get_num_threads()}
    images, results["noisecraft"] = run_noisecraft(train, args.minutes, args.n, out)
    results["noisecraft"]["score"] = domain_fid(images, reference, classifier)
    if not args.skip_recipe:
        images, results["diffusers_recipe"] = run_recipe(train, args.minutes, args.n, out)
        results["diffusers_recipe"]["score"] = domain_fid(images, reference, classifier)
        results["score_ratio_recipe_over_noisecraft"] = results["diffusers_recipe"]["score"] / results["noisecraft"]["score"]

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nMNIST, {args.minutes:g} training minutes each, {args.n} DDIM-50 samples, domain score vs test split "
          f"(lower is better)")
    print(f"{'model':<18}{'params':>10}{'steps':>8}{'train img/s':>13}{'s/1000 samples':>16}{'score':>10}")
    for key in ("noisecraft", "diffusers_recipe"):
        if key in results:
            r = results[key]
            print(f"{key:<18}{r['parameters']:>10,}{r['steps']:>8}{r['train_images_per_s']:>13.1f}"
                  f"{r['sample_s_per_1000']:>16.1f}{r['score']:>10.2f}")
    if "score_ratio_recipe_over_noisecraft" in results:
        print(f"recipe score / noisecraft score = {results['score_ratio_recipe_over_noisecraft']:.1f}x")
    print(f"grids and results.json in {out}")


if __name__ == "__main__":
    main()
