"""Few-step sampling by progressive distillation: its CPU cost and its quality/steps curve.

    python benchmarks/distill_budget.py RUN --cpu-minutes 10 --out benchmarks/out/distill     # RUN: an EDM run

Distils RUN (noisecraft distill's Distiller) from a --teacher-steps Heun teacher down to --steps, halving, on one
thread until the process has used --cpu-minutes of CPU time (split evenly over the stages), then scores each
student at its own steps with its default sampler (DPM++ 2M on its nested σ's, which is Euler at 1 and 2 steps)
against the teacher with the same sampler and steps (what the student was before distillation) and against the
teacher's --teacher-steps Heun steps; students of 3 steps or more are scored with Euler too. Domain score: the FID-style
Fréchet distance of a small classifier's features (not comparable to published FID); lower is better.
Writes results.json, grids and a plot into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from noisecraft.config import load_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.evaluation.classifier import load_or_train_classifier
from noisecraft.evaluation.fid import domain_fid, reference_statistics
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.training.distill import Distiller
from noisecraft.viz.images import save_grid


def plot(rows: list, path: Path) -> None:
    """Score against network evaluations: each student and its teacher at the student's default sampler and steps,
    and the Heun teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, marker in (("student", "o"), ("teacher", "s")):
        pts = sorted((r["nfe"], r["score"]) for r in rows if r["model"] == name and r.get("default", True)
                     and r["sampler"] != "heun")
        used = sorted({r["sampler"] for r in rows if r["model"] == name and r["sampler"] != "heun"
                       and r.get("default", True)})
        ax.plot(*zip(*pts), marker=marker, label=f"{name} ({', '.join(used)}, nested σ's)")
    heun = [r for r in rows if r["sampler"] == "heun"][0]
    ax.axhline(heun["score"], color="grey", ls="--", label=f"teacher, Heun {heun['steps']} steps ({heun['nfe']} NFE)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    steps = sorted({r["nfe"] for r in rows if r["sampler"] != "heun"})
    ax.set_xticks(steps, [str(n) for n in steps])   # 1, 2, 4 rather than 2^0, 2^1, 2^2
    ax.minorticks_off()
    ax.set_xlabel("network evaluations (= steps)")
    ax.set_ylabel("domain score (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--cpu-minutes", type=float, default=10.0, help="CPU time for all stages together")
    p.add_argument("--teacher-steps", type=int, default=16)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3, help="a CPU budget allows few iterations per stage: a high rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="where to sample for the scores")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="benchmarks/out/distill")
    p.add_argument("--replot", action="store_true", help="only redraw distill_steps.png from --out's results.json")
    p.add_argument("--score-only", action="store_true",
                   help="score the students already in --out (e.g. after a change of their default sampler)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        plot(json.loads((out / "results.json").read_text())["rows"], out / "distill_steps.png")
        return
    config = load_run_config(args.run)
    test = load_dataset(config.data.dataset, "test", data_dir=args.data_dir)
    if args.score_only:      # the distillation's cost is the one recorded when it ran
        before = json.loads((out / "results.json").read_text())
        cpu_seconds, args.cpu_minutes = before["cpu_seconds"], before["cpu_minutes_budget"]
        args.teacher_steps = before["teacher_steps"]
        students = sorted((out / "students").glob("steps-*"), key=lambda f: -int(f.name.split("-")[1]))
    else:
        shutil.rmtree(out / "students", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        train = load_dataset(config.data.dataset, "train", data_dir=args.data_dir)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cpu0 = time.process_time()
        students = Distiller(args.run, train, out / "students", steps=args.steps, teacher_steps=args.teacher_steps,
                             minutes=args.cpu_minutes, clock=time.process_time, lr=args.lr,
                             batch_size=args.batch_size).distill()
        cpu_seconds = time.process_time() - cpu0
        torch.set_num_threads(threads)      # scoring is not part of the budget: all cores

    classifier = load_or_train_classifier(config.data.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    reference = reference_statistics(test, classifier)
    teacher = DiffusionPipeline.from_run(args.run, device=args.device)
    rows = []

    def score(name, pipe, sampler, steps, nfe, default=True):
        images = pipe.sample(args.n, sampler=sampler, steps=steps, spacing="nested", seed=0, batch_size=500).images
        rows.append({"model": name, "sampler": sampler, "steps": steps, "nfe": nfe, "default": default,
                     "score": domain_fid(images.cpu(), reference, classifier)})
        save_grid(images[:64].cpu(), out / f"{name}-{sampler}-{steps}.png", nrow=8)
        print(f"{name:<10} {sampler:<6} {steps:>3} steps  nfe {nfe:>3}  score {rows[-1]['score']:8.2f}", flush=True)

    score("teacher", teacher, "heun", args.teacher_steps, 2 * args.teacher_steps - 1)
    for folder in students:
        student = DiffusionPipeline.from_run(folder, device=args.device)
        steps, sampler = student.config.distillation.steps, student.defaults.sampler
        score("teacher", teacher, sampler, steps, steps)
        score("student", student, sampler, steps, steps)
        if steps >= 3 and sampler != "euler":   # Euler, the step it was trained to take, for comparison
            score("student", student, "euler", steps, steps, default=False)
    log = (out / "students" / "distill.csv").read_text()
    result = {"run": args.run, "cpu_minutes_budget": args.cpu_minutes, "cpu_seconds": cpu_seconds, "n": args.n,
              "teacher_steps": args.teacher_steps, "rows": rows, "log": log}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    plot(rows, out / "distill_steps.png")
    print(f"distillation used {cpu_seconds / 60:.1f} CPU-minutes; results in {out}")


if __name__ == "__main__":
    main()
