"""Text-to-image within a CPU budget: VAE + CLIP text encoder + latent U-Net, against a pixel-space
class-conditional U-Net trained for the same budget.

    python benchmarks/text_to_image.py latent --minutes 40 --threads 1 &     # both at once, one core each
    python benchmarks/text_to_image.py pixel --minutes 40 --threads 1
    python benchmarks/text_to_image.py report                                # the table (README)
    python benchmarks/text_to_image.py score --settings ddpm:30,dpmpp_2m_sde:20:karras   # kept runs, other samplers
    python benchmarks/text_to_image.py score --settings dpmpp_2m_sde:20:karras --guidance 1,2,4   # a guidance sweep
    python benchmarks/text_to_image.py plot                                  # the sweep's figure

`latent` runs the three training commands a user would run (`noisecraft train-vae`, `train-clip`, then
`train --latent --text-encoder`), splitting --minutes between them (VAE --vae-minutes, CLIP --clip-minutes,
the rest — after the one-off latent/caption encoding — to the U-Net), and times them as a whole. `pixel`
trains `noisecraft train --conditional` for the full --minutes. Both then draw --per-class images for each
class — the latent model from the class's prompt ("a handwritten digit seven"), the pixel model from its
label — with the txt2img defaults of stop 23 (DDPM, 30 steps, guidance 4), and score them: the accuracy of a small
classifier trained on the real data (does the image show the prompted class?) and the FID-style domain
score against the test split (Fréchet distance of that classifier's features; NOT comparable to published
Inception FID). Training throughput (images/s) of both comes from their logs. `score` draws the kept runs again
with other samplers (sampler:steps[:spacing]) at each of --guidance (one w or a list, "2,4,6"), for choosing a text
run's default sampler and guidance scale; it writes <part>-settings.json. `plot` draws such files' guidance sweeps
(domain score and prompted share against w) to <part>-guidance.png.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from noisecraft.data.captions import class_prompts
from noisecraft.data.datasets import load_dataset
from noisecraft.evaluation.classifier import load_or_train_classifier, predict
from noisecraft.evaluation.fid import domain_fid
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.viz.images import save_grid

SAMPLER, STEPS, GUIDANCE = "ddpm", 30, 4.0   # the txt2img defaults this table was first drawn with (kept, to compare)


def noisecraft(args: list[str], threads: int) -> float:
    """Run a noisecraft command in a subprocess with `threads` OpenMP threads; return its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    print("$ noisecraft " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "noisecraft", *args], check=True, env=env)
    return time.perf_counter() - t0


def train_images_per_s(run: Path) -> float:
    """Mean training throughput from a run's log.csv (rows after the first, which includes warm-up)."""
    rows = list(csv.DictReader(open(run / "log.csv")))
    values = [float(r["images_per_s"]) for r in rows[1:]] or [float(r["images_per_s"]) for r in rows]
    return sum(values) / len(values)


def evaluate(pipe: DiffusionPipeline, conditions: list, per_class: int, key: str, test, classifier, out: Path,
             name: str, draw: dict | None = None) -> dict:
    """per_class images for each condition (prompt or label) -> classifier accuracy per class, domain score.
    `draw`: the sampler settings (default: the txt2img defaults this benchmark was first run with)."""
    draw = draw or {"sampler": SAMPLER, "steps": STEPS, "guidance": GUIDANCE}
    images, targets = [], []
    t0 = time.perf_counter()
    for c, condition in enumerate(conditions):
        result = pipe.sample(per_class, seed=1000 * c, **draw, **{key: condition})
        images.append(result.images)
        targets.append(torch.full((per_class,), c))
    seconds = time.perf_counter() - t0
    images, targets = torch.cat(images), torch.cat(targets)
    predicted = predict(classifier, images)
    per_class_acc = [(predicted[targets == c] == c).float().mean().item() for c in range(len(conditions))]
    order = torch.arange(len(images)).reshape(len(conditions), per_class)[:, :8].T.flatten()
    save_grid(images[order], out / f"{name}_grid.png", nrow=len(conditions))
    return {"accuracy": (predicted == targets).float().mean().item(), "accuracy_per_class": per_class_acc,
            "domain_score": domain_fid(images, test, classifier), "samples": len(images),
            "sample_seconds": seconds}


def run_latent(args, out: Path) -> dict:
    runs = out / "runs"
    t0 = time.perf_counter()
    common = ["--dataset", args.dataset, "--seed", str(args.seed)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    vae_s = noisecraft(["train-vae", *common, "--out", str(runs / "vae"), "--minutes", str(args.vae_minutes)],
                       args.threads)
    clip_s = noisecraft(["train-clip", *common, "--out", str(runs / "clip"), "--minutes", str(args.clip_minutes)],
                        args.threads)
    # The U-Net gets what is left, less a margin for the one-off encoding of the dataset into latents.
    left = args.minutes - (time.perf_counter() - t0) / 60 - args.encode_margin
    unet_s = noisecraft(["train", *common, "--latent", str(runs / "vae"), "--text-encoder", str(runs / "clip"),
                         "--out", str(runs / "ldm"), "--minutes", f"{left:.3f}", "--sample-every", "0"], args.threads)
    total = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    pipe = DiffusionPipeline.from_run(runs / "ldm")
    vae_config = json.loads((runs / "vae" / "config.json").read_text())
    clip_config = json.loads((runs / "clip" / "config.json").read_text())
    return {"minutes_total": total / 60, "minutes": {"vae": vae_s / 60, "clip": clip_s / 60, "unet": unet_s / 60},
            "vae_metrics": vae_config.get("metrics"), "clip_metrics": clip_config.get("metrics"),
            "train_images_per_s": train_images_per_s(runs / "ldm"), "pipe": pipe,
            "conditions": class_prompts(args.dataset), "key": "prompt"}


def run_pixel(args, out: Path) -> dict:
    runs = out / "runs"
    common = ["--dataset", args.dataset, "--seed", str(args.seed)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    seconds = noisecraft(["train", *common, "--conditional", "--out", str(runs / "pixel"), "--minutes",
                          str(args.minutes), "--sample-every", "0"], args.threads)
    torch.set_num_threads(args.threads)
    pipe = DiffusionPipeline.from_run(runs / "pixel")
    return {"minutes_total": seconds / 60, "train_images_per_s": train_images_per_s(runs / "pixel"), "pipe": pipe,
            "conditions": list(range(len(pipe.config.data.class_names))), "key": "label"}


def report(out: Path) -> None:
    rows = {k: json.loads((out / f"{k}.json").read_text()) for k in ("latent", "pixel") if (out / f"{k}.json").exists()}
    print(f"| model | training minutes (wall) | train images/s | prompted-class accuracy | domain score (n) |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['minutes_total']:.1f} | {r['train_images_per_s']:.0f} | {r['accuracy'] * 100:.1f}% | "
              f"{r['domain_score']:.2f} ({r['samples']}) |")
    if len(rows) == 2:
        ratio = rows["latent"]["train_images_per_s"] / rows["pixel"]["train_images_per_s"]
        print(f"\nlatent / pixel training throughput: {ratio:.2f}x")


def score_settings(args, out: Path) -> None:
    """The kept runs of earlier `latent`/`pixel` parts, drawn with each of --settings at each --guidance."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from budget_run import nfe, parse_settings
    runs = {"latent": (out / "runs" / "ldm", "prompt"), "pixel": (out / "runs" / "pixel", "label")}
    runs = {part: run for part, run in runs.items() if (run[0] / "config.json").is_file()}
    try:
        guidances = [float(w) for w in str(args.guidance).split(",")]
    except ValueError:
        raise SystemExit(f"--guidance {args.guidance!r}: give a number or a list of numbers, e.g. 4 or 2,4,6") from None
    if not runs:
        raise SystemExit(f"no kept run under {out / 'runs'}; run the latent or pixel part first")
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    classifier = load_or_train_classifier(args.dataset, data_dir=args.data_dir)
    torch.set_num_threads(args.threads)
    for part, (folder, key) in runs.items():
        pipe = DiffusionPipeline.from_run(folder)
        conditions = class_prompts(args.dataset) if key == "prompt" else list(range(len(pipe.config.data.class_names)))
        rows = []
        for (sampler, steps, spacing), guidance in itertools.product(parse_settings(args.settings), guidances):
            draw = {"sampler": sampler, "steps": steps, "spacing": spacing, "guidance": guidance}
            tag = f"{part}-{sampler}-{steps}" + (f"-{spacing}" if spacing else "")
            tag += f"-w{guidance:g}" if len(guidances) > 1 else ""   # one grid per scale in a sweep
            row = evaluate(pipe, conditions, args.per_class, key, test, classifier, out, tag, draw)
            row.pop("accuracy_per_class")
            rows.append({**draw, "nfe": nfe(sampler, steps), **row})
            print(f"{part}: {sampler}-{steps} {spacing or ''} w={guidance:g}: accuracy {row['accuracy']:.3f}, "
                  f"domain score {row['domain_score']:.2f}", flush=True)
        (out / f"{part}-settings.json").write_text(json.dumps({"per_class": args.per_class, "rows": rows}, indent=2))


def plot_guidance(rows: list, path: Path) -> None:
    """Domain score and the share of images showing their prompt against the guidance scale w, a line per sampler:
    the diversity-for-fidelity trade of classifier-free guidance, as `score --guidance 1,2,4` measured it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = {}
    for r in rows:
        lines.setdefault(f"{r['sampler']}-{r['steps']}" + (f" {r['spacing']}" if r.get("spacing") else ""), []).append(r)
    lines = {name: sorted(rs, key=lambda r: r["guidance"]) for name, rs in lines.items() if len(rs) > 1}
    if not lines:
        raise SystemExit("no sampler was drawn at two or more guidance scales; run score --guidance 1,2,4 first")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rs in lines.items():
        w = [r["guidance"] for r in rs]
        left.plot(w, [r["domain_score"] for r in rs], marker="o", label=name)
        right.plot(w, [100 * r["accuracy"] for r in rs], marker="o", label=name)
    left.set(xlabel="guidance w (1 = none)", ylabel="domain score (lower is better)", title="sample quality vs the data")
    right.set(xlabel="guidance w (1 = none)", ylabel="% showing the prompted class", title="follows the prompt")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["latent", "pixel", "report", "score", "plot"])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--minutes", type=float, default=40.0, help="the whole training budget of each model")
    p.add_argument("--vae-minutes", type=float, default=8.0)
    p.add_argument("--clip-minutes", type=float, default=3.0)
    p.add_argument("--encode-margin", type=float, default=1.0, help="minutes kept for encoding latents once")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="ddpm:30,dpmpp_2m_sde:20:karras",
                   help="score: sampler:steps[:spacing],... (a spacing left out: the run's plain one)")
    p.add_argument("--guidance", default=str(GUIDANCE), help="score: guidance w of every setting, or a list (2,4,6)")
    p.add_argument("--rows", nargs="+", default=None, metavar="JSON",
                   help="plot: settings files to draw (default: OUT/<dataset>/latent-settings.json)")
    p.add_argument("--out", default="benchmarks/out/text_to_image")
    args = p.parse_args(argv)
    out = Path(args.out) / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        return report(out)
    if args.part == "score":
        return score_settings(args, out)
    if args.part == "plot":
        files = [Path(f) for f in args.rows] if args.rows else [out / "latent-settings.json"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"no settings file {', '.join(missing)}; run score first or pass --rows")
        rows = [r for f in files for r in json.loads(f.read_text())["rows"]]
        return plot_guidance(rows, files[0].with_name(files[0].stem.replace("-settings", "") + "-guidance.png"))
    result = run_latent(args, out) if args.part == "latent" else run_pixel(args, out)
    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    classifier = load_or_train_classifier(args.dataset, data_dir=args.data_dir)
    pipe, conditions, key = result.pop("pipe"), result.pop("conditions"), result.pop("key")
    result.update(evaluate(pipe, conditions, args.per_class, key, test, classifier, out, args.part))
    result.update(sampler=SAMPLER, steps=STEPS, guidance=GUIDANCE, threads=args.threads)
    (out / f"{args.part}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
