"""Few-step sampling by distillation, progressive or consistency: its CPU cost and its quality/steps curve.

    python benchmarks/distill_budget.py RUN --cpu-minutes 20 --out benchmarks/out/distill     # RUN: a v or EDM run
    python benchmarks/distill_budget.py RUN --cpu-minutes 20 --method consistency --out benchmarks/out/cm \
        --compare benchmarks/out/distill                 # the plot shows the progressive students beside

Progressive (noisecraft distill's Distiller): distils RUN from a --teacher-steps Heun teacher down to --steps,
halving, on one thread until the process has used --cpu-minutes of CPU time (split evenly over the stages), then
scores each student at its own steps with its default sampler (DPM++ 2M on its nested σ's, which is Euler at 1 and
2 steps); students of 3 steps or more are scored with Euler too. Consistency (ConsistencyDistiller): one student
trained for all of --cpu-minutes on an N = --teacher-steps σ grid, scored with multistep consistency sampling at each
of --score-steps on the same nested σ's. Either way each student is set against the teacher with DPM++ 2M at the same
steps (what a student was before distillation) and the teacher's --reference-steps Heun steps. Domain score: the
FID-style Fréchet distance of a small classifier's features (not comparable to published FID); lower is better.
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
from noisecraft.training.consistency import ConsistencyDistiller
from noisecraft.training.distill import Distiller
from noisecraft.viz.images import save_grid


def plot(rows: list, path: Path, method: str = "progressive", others: tuple = ()) -> None:
    """Score against network evaluations: the students and the teacher at the students' default sampler and
    steps, the Heun teacher, and the students of `others` ((method, rows) of another results.json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lines = [(f"{method} student", "o", rows, "student"), ("teacher", "s", rows, "teacher")]
    lines += [(f"{m} student", "^", r, "student") for m, r in others]
    for label, marker, table, name in lines:
        pts = sorted((r["nfe"], r["score"]) for r in table if r["model"] == name and r.get("default", True)
                     and r["sampler"] != "heun")
        used = sorted({r["sampler"] for r in table if r["model"] == name and r["sampler"] != "heun"
                       and r.get("default", True)})
        ax.plot(*zip(*pts), marker=marker, label=f"{label} ({', '.join(used)}, nested σ's)")
    heun = [r for r in rows if r["sampler"] == "heun"][0]
    ax.axhline(heun["score"], color="grey", ls="--", label=f"teacher, Heun {heun['steps']} steps ({heun['nfe']} NFE)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    steps = sorted({r["nfe"] for table in [rows] + [r for _, r in others] for r in table if r["sampler"] != "heun"})
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
    p.add_argument("--method", choices=("progressive", "consistency"), default="progressive")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="progressive: the first teacher's Heun steps (default 16); consistency: the grid's N (18)")
    p.add_argument("--steps", type=int, default=1, help="progressive: the fewest steps to distil down to")
    p.add_argument("--score-steps", default="1,2,4", help="consistency: the step counts to score the student at")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="the teacher's Heun steps to compare with (default: progressive's --teacher-steps, else 8)")
    p.add_argument("--metric", default="pseudo-huber", help="consistency: pseudo-huber or l2")
    p.add_argument("--target-decay", type=float, default=0.95, help="consistency: μ of the target network")
    p.add_argument("--compare", nargs="*", default=[], metavar="OUT",
                   help="other --out folders of this benchmark whose students the plot shows too")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 for progressive (a CPU budget allows few "
                   "iterations per stage: a high rate), 2e-4 for consistency (it scored better than 1e-3)")
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
    others = tuple((r.get("method", "progressive"), r["rows"])
                   for r in (json.loads((Path(o) / "results.json").read_text()) for o in args.compare))
    if args.replot:
        kept = json.loads((out / "results.json").read_text())
        plot(kept["rows"], out / "distill_steps.png", kept.get("method", "progressive"), others)
        return
    consistency = args.method == "consistency"
    if args.lr is None:
        args.lr = 2e-4 if consistency else 1e-3
    if args.teacher_steps is None:
        args.teacher_steps = 18 if consistency else 16
    if args.reference_steps is None:
        args.reference_steps = 8 if consistency else args.teacher_steps
    config = load_run_config(args.run)
    test = load_dataset(config.data.dataset, "test", data_dir=args.data_dir)
    if args.score_only:      # the distillation's cost is the one recorded when it ran
        before = json.loads((out / "results.json").read_text())
        cpu_seconds, args.cpu_minutes = before["cpu_seconds"], before["cpu_minutes_budget"]
        args.teacher_steps = before["teacher_steps"]
        args.reference_steps = before.get("reference_steps", args.teacher_steps)
        students = sorted((out / "students").glob("steps-*"), key=lambda f: -int(f.name.split("-")[1]))
        students += [f for f in [out / "students" / "consistency"] if f.is_dir()]
    else:
        shutil.rmtree(out / "students", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        train = load_dataset(config.data.dataset, "train", data_dir=args.data_dir)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cpu0 = time.process_time()
        common = dict(teacher_steps=args.teacher_steps, minutes=args.cpu_minutes, clock=time.process_time,
                      lr=args.lr, batch_size=args.batch_size)
        if consistency:
            students = ConsistencyDistiller(args.run, train, out / "students", metric=args.metric,
                                            target_decay=args.target_decay, **common).distill()
        else:
            students = Distiller(args.run, train, out / "students", steps=args.steps, **common).distill()
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

    score("teacher", teacher, "heun", args.reference_steps, 2 * args.reference_steps - 1)
    for folder in students:
        student = DiffusionPipeline.from_run(folder, device=args.device)
        distilled = student.config.distillation
        if distilled.method == "consistency":    # one student for every step count
            for steps in sorted({int(k) for k in args.score_steps.split(",")}, reverse=True):
                score("teacher", teacher, "dpmpp_2m", steps, steps)
                score("teacher", teacher, "consistency", steps, steps, default=False)   # the student at step 0
                score("student", student, "consistency", steps, steps)
            continue
        steps, sampler = distilled.steps, student.defaults.sampler
        score("teacher", teacher, sampler, steps, steps)
        score("student", student, sampler, steps, steps)
        if steps >= 3 and sampler != "euler":   # Euler, the step it was trained to take, for comparison
            score("student", student, "euler", steps, steps, default=False)
    log = (out / "students" / "distill.csv").read_text()
    method = "consistency" if consistency or (out / "students" / "consistency").is_dir() else "progressive"
    result = {"run": args.run, "method": method, "cpu_minutes_budget": args.cpu_minutes, "cpu_seconds": cpu_seconds,
              "n": args.n, "teacher_steps": args.teacher_steps, "reference_steps": args.reference_steps,
              "lr": args.lr, "batch_size": args.batch_size, "rows": rows, "log": log}
    if method == "consistency":
        result.update(metric=args.metric, target_decay=args.target_decay)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    plot(rows, out / "distill_steps.png", method, others)
    print(f"distillation used {cpu_seconds / 60:.1f} CPU-minutes; results in {out}")


if __name__ == "__main__":
    main()
