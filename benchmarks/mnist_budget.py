"""Quality on a CPU budget: noisecraft's recipes vs the recipes users would pick instead, same CPU-minutes, same score.

    python benchmarks/mnist_budget.py --cpu-minutes 20 --jobs 2           # train, score and report (hours on 2 cores)
    python benchmarks/mnist_budget.py --phase score --device cuda         # score trained models on a GPU
    python benchmarks/mnist_budget.py --phase report                      # the tables and the plot from the JSONs

Recipes (budget_run.py): noisecraft (the default recipe, VP: cosine schedule, ε-prediction, Min-SNR 5), noisecraft-edm
(--preconditioning edm), diffusers (its MNIST tutorial), lucidrains (denoising-diffusion-pytorch's README recipe,
padded to 32×32) and smalldiffusion (its Fashion-MNIST DiT example). Each trains on one thread until its process
has used --cpu-minutes of CPU time, `--jobs` at a time; CPU time, unlike wall time, stays fair when recipes share
the machine. Then each draws --n samples with its own default sampler and at 20 network evaluations (ours: the
whole sampler-vs-NFE table), scored with the FID-style domain score against the MNIST test split (Fréchet distance
of a small MNIST classifier's features; lower is better; NOT comparable to published Inception FID).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = ("noisecraft", "noisecraft-edm", "diffusers", "lucidrains", "smalldiffusion")


def run_phase(phase: str, recipe: str, args) -> int:
    cmd = [sys.executable, str(HERE / "budget_run.py"), phase, "--dataset", args.dataset, "--recipe", recipe,
           "--out", args.out, "--n", str(args.n), "--cpu-minutes", str(args.cpu_minutes), "--device", args.device]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    log = Path(args.out) / f"{phase}-{args.dataset}-{recipe}.log"
    with open(log, "w") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)


def load_results(out: Path, dataset: str) -> dict:
    return {r: json.loads((out / f"{dataset}-{r}.json").read_text()) for r in RECIPES
            if (out / f"{dataset}-{r}.json").exists()}


def best(rows, pred):
    picked = [r for r in rows if pred(r)]
    return min(picked, key=lambda r: r["score"]) if picked else None


def default_row(recipe: str, rows: list) -> dict | None:
    """The row drawn with the recipe's own default sampler: marked by budget_run, or, in files written before it
    marked them, for our runs the row of the defaults of that time: DDPM-10 (VP) and Heun-10 on Karras σ's (EDM)."""
    marked = next((s for s in rows if s.get("default")), None)
    if marked or not recipe.startswith("noisecraft"):
        return marked
    then = ("heun", 10, "karras") if recipe == "noisecraft-edm" else ("ddpm", 10, "leading")
    return next((s for s in rows if (s["sampler"], s["steps"], s.get("spacing")) == then), None)


def report(out: Path, dataset: str) -> None:
    results = load_results(out, dataset)
    if not results:
        raise SystemExit(f"no results in {out}; run the train and score phases first.")
    print(f"\n{dataset}: each recipe trained for {next(iter(results.values()))['cpu_minutes']:g} CPU-minutes on one "
          f"thread; domain score of {next(iter(results.values()))['n']} samples (lower is better)\n")
    print("| recipe | parameters | steps | images per CPU-s | own default sampler | score | best at ≤ 20 NFE | score |")
    print("|---|---:|---:|---:|---|---:|---|---:|")
    fmt = lambda s: (f"{s['sampler']} {s['steps']} ({s['nfe']} NFE)", f"{s['score']:.2f}") if s else ("–", "–")
    for name, r in results.items():
        cheap = best(r["samples"], lambda s: s["nfe"] <= 20)
        print(f"| {name} | {r['parameters']:,} | {r['steps']} | {r['train_images_per_s']:.1f} | "
              f"{' | '.join(fmt(default_row(name, r['samples'])))} | {' | '.join(fmt(cheap))} |")
    ours = {name: r for name, r in results.items() if name in ("noisecraft", "noisecraft-edm")}
    if "noisecraft" not in ours:
        return
    # every row of our recipes, tagged with its recipe, for the goals of the issue (either recipe may win)
    rows = [dict(s, recipe=name) for name, r in ours.items() for s in r["samples"]]
    label = lambda s: f"{s['recipe']} {s['sampler']} {s['steps']} ({s['nfe']} NFE)"
    ddim50 = next(s for s in ours["noisecraft"]["samples"] if (s["sampler"], s["steps"]) == ("ddim", 50))["score"]
    cheap = best(rows, lambda s: s["nfe"] <= 20)
    deterministic = lambda s: s["sampler"] in ("heun", "euler", "dpmpp_2m", "ddim")
    det20 = best(rows, lambda s: s["nfe"] <= 20 and deterministic(s))
    top = best(rows, lambda s: True)
    print(f"\ngoal 1: our best at ≤ 20 NFE, {label(cheap)}: {cheap['score']:.2f} vs half of today's DDIM-50 "
          f"{ddim50 / 2:.2f} (DDIM-50 {ddim50:.2f}): ratio {cheap['score'] / ddim50:.2f} (goal ≤ 0.5)")
    print(f"goal 2: deterministic at ≤ 20 NFE, {label(det20)}: {det20['score']:.2f} vs the best of our runs at any "
          f"NFE here, {label(top)}: {top['score']:.2f}: {det20['score'] / top['score'] - 1:+.0%}")
    for name in ours:
        ref_file = out / f"{dataset}-{name}-ref.json"
        if ref_file.exists():   # the same comparison against 1000 evaluations, all rows at the ref file's n
            ref = json.loads(ref_file.read_text())
            det = best(ref["samples"], lambda s: s["nfe"] <= 20 and deterministic(s))
            long = best(ref["samples"], lambda s: s["nfe"] >= 1000)
            if det and long:
                print(f"goal 2 at 1000 NFE, {name} (n = {ref['n']}): {det['sampler']} {det['steps']} "
                      f"({det['nfe']} NFE) {det['score']:.2f} vs {long['sampler']} {long['steps']} "
                      f"{long['score']:.2f}: {det['score'] / long['score'] - 1:+.0%} (goal ≤ +10%)")
    nfe_table(out, dataset, ours)


def nfe_table(out: Path, dataset: str, runs: dict) -> None:
    # "default (…)" rows are drawn apart from the table's settings (older files); they are in the first table
    samplers = sorted({s["sampler"] for r in runs.values() for s in r["samples"] if not s["sampler"].startswith("default")})
    print("\n| recipe | sampler | " + " | ".join(["NFE → score"]) + " |\n|---|---|---|")
    for name, r in runs.items():
        for sampler in samplers:
            cells = sorted((s["nfe"], s["score"]) for s in r["samples"] if s["sampler"] == sampler)
            if not cells:
                continue
            print(f"| {name} | {sampler} | " + ", ".join(f"{n}: {v:.2f}" for n, v in cells) + " |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), sharey=True)
    colours = {sampler: f"C{i}" for i, sampler in enumerate(samplers)}    # one colour per sampler in every panel
    scores = [s["score"] for r in runs.values() for s in r["samples"]]
    yticks = [v for v in (1, 1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100, 200, 500, 1000)
              if min(scores) / 1.2 <= v <= max(scores) * 1.2]
    for ax, (name, r) in zip(axes, runs.items()):
        for sampler in samplers:
            pts = sorted((s["nfe"], s["score"]) for s in r["samples"] if s["sampler"] == sampler)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=sampler, color=colours[sampler])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_yticks(yticks, [f"{v:g}" for v in yticks])   # a log axis within one decade shows no labels itself
        drawn = [s["nfe"] for s in r["samples"]]
        ticks = [n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if min(drawn) <= n <= max(drawn)]
        ax.set_xticks(ticks, [str(n) for n in ticks])   # plain numbers, not 2×10^1
        ax.minorticks_off()
        ax.set_title(name)
        ax.set_xlabel("network evaluations")
    axes[0].set_ylabel("domain score (lower is better)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{dataset}_sampler_nfe.png", dpi=120)
    print(f"\nplot: {out / f'{dataset}_sampler_nfe.png'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=["all", "train", "score", "report"], default="all")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--cpu-minutes", type=float, default=20.0, help="training budget per recipe, in CPU time")
    p.add_argument("--jobs", type=int, default=2, help="recipes trained at a time (one thread each)")
    p.add_argument("--device", default="cpu", help="where the score phase samples")
    p.add_argument("--n", type=int, default=1000, help="samples scored per setting")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/out/mnist_budget")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for phase, jobs in (("train", args.jobs), ("score", 1)):
        if args.phase in ("all", phase):
            with ThreadPoolExecutor(jobs) as pool:
                codes = list(pool.map(lambda r: run_phase(phase, r, args), args.recipes))
            failed = [r for r, c in zip(args.recipes, codes) if c]
            if failed:
                print(f"{phase} failed for {failed}; see the logs in {args.out}", file=sys.stderr)
    if args.phase in ("all", "report"):
        report(Path(args.out), args.dataset)


if __name__ == "__main__":
    main()
