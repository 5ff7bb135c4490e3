"""Sample quality vs number of network evaluations (NFE), for every sampler, on one trained MNIST run.

    python benchmarks/sampler_nfe.py RUN --n 250                       # RUN from mnist_budget.py or `noisecraft train`
    python benchmarks/sampler_nfe.py RUN --samplers ddim dpmpp_2m --nfe 10 20

Each cell is the FID-style domain score (features of a small MNIST classifier, cached; lower is better; NOT
comparable to published Inception FID) of `--n` samples against the MNIST test split. With a few hundred
samples the score is biased upwards; the "real data" row scores `--n` real training images the same way, the
floor any sampler can reach at that n. Samplers that call the network more than once per step get fewer
steps for the same NFE (heun: 2 per step but one at the last; plms: one extra at the start).
Writes a Markdown table, a JSON file and a PNG plot into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from noisecraft.data.datasets import load_dataset
from noisecraft.evaluation.classifier import load_or_train_classifier
from noisecraft.evaluation.fid import domain_fid, reference_statistics
from noisecraft.pipelines.diffusion import DiffusionPipeline

SAMPLERS = ("ddpm", "ddim", "plms", "lms", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde")
NFES = (5, 10, 20, 50, 100, 1000)


def steps_for_nfe(sampler: str, nfe: int) -> int | None:
    """The step count that spends `nfe` network evaluations, or None if impossible."""
    if sampler == "heun":
        steps = (nfe + 1) // 2
    elif sampler == "plms":
        steps = nfe - 1
    else:
        steps = nfe
    return steps if steps >= 1 else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=250)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--nfe", nargs="+", type=int, default=list(NFES))
    p.add_argument("--max-nfe-all", type=int, default=100,
                   help="above this NFE only ddpm and ddim run (the 1000-step references)")
    p.add_argument("--spacing", default="leading",
                   help="the σ's every sampler visits (leading: as the stored results were drawn; karras, ...)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="benchmarks/out/sampler_nfe")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe = DiffusionPipeline.from_run(args.run)
    test = load_dataset("mnist", "test", data_dir=args.data_dir)
    train = load_dataset("mnist", "train", data_dir=args.data_dir)
    classifier = load_or_train_classifier("mnist", data_dir=args.data_dir, cache_dir=args.cache_dir)
    reference = reference_statistics(test, classifier)
    real = train.batch(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.n])[0]
    floor = domain_fid(real, reference, classifier)
    print(f"real data floor at n={args.n}: {floor:.2f}")

    results = {"n": args.n, "real_data_floor": floor, "scores": {}, "seconds": {}}
    for sampler in args.samplers:
        for nfe in args.nfe:
            steps = steps_for_nfe(sampler, nfe)
            if steps is None or (nfe > args.max_nfe_all and sampler not in ("ddpm", "ddim")):
                continue
            if steps > pipe.schedule.T:
                continue
            t0 = time.perf_counter()
            images = pipe.sample(args.n, sampler=sampler, steps=steps, spacing=args.spacing, seed=0).images
            seconds = time.perf_counter() - t0
            score = domain_fid(images, reference, classifier)
            results["scores"].setdefault(sampler, {})[nfe] = score
            results["seconds"].setdefault(sampler, {})[nfe] = seconds
            print(f"{sampler:<16} NFE {nfe:>5} ({steps} steps): score {score:8.2f}  ({seconds:.0f} s)", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    nfes = sorted({nfe for s in results["scores"].values() for nfe in s})
    lines = ["| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for sampler, row in results["scores"].items():
        lines.append(f"| {sampler} | " + " | ".join(f"{row[k]:.1f}" if k in row else "" for k in nfes) + " |")
    lines.append(f"| real data (floor at n={args.n}) | " + " | ".join(f"{floor:.1f}" for _ in nfes) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for sampler, row in results["scores"].items():
        ks = sorted(row)
        ax.plot(ks, [row[k] for k in ks], marker="o", label=sampler)
    ax.axhline(floor, color="gray", linestyle="--", label=f"real data, n={args.n}")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="domain score (lower is better)",
           title=f"MNIST: sample quality vs NFE (n={args.n})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png", dpi=120)
    print(f"wrote {out}/table.md, results.json, quality_vs_nfe.png")


if __name__ == "__main__":
    main()
