"""Overhead of the UI over the Python API for the same generation (same model, sampler, steps, seed), in one process.

The UI path is what a click on Generate runs, minus Gradio's transport: `ui.engine.Engine.run(Job)` consumed to the
end (the worker thread, the per-step callback with progress and live x̂0 previews, the PNGs with their parameters and
the gallery thumbnails). The plain path is `pipe.sample(n, sampler=..., steps=..., seed=...)` on the same loaded
pipeline. Both alternate, `--rounds` times; the ratio of the medians is the overhead (goal: <= 1.05). Also reported:
the time to the first preview event, whether the two paths drew the identical picture, and (`--memory N`) the
process's resident memory before and after N more UI generations (the gallery keeps paths, not pictures).
`--preview-every k` asks for a preview every k steps as the page does; the engine throttles them by wall time
(ui.engine.PREVIEW_MIN_S, PREVIEW_SHARE) and progress events too (PROGRESS_MIN_S).

    python benchmarks/ui_overhead.py                       # digits (the default model, 1 training step) + tiny SD
    python benchmarks/ui_overhead.py --run runs/mnist --steps 10 --rounds 9
    python benchmarks/ui_overhead.py --models digits --memory 500
    python benchmarks/ui_overhead.py --models digits --with-training     # generating while the UI trains

The tiny SD-shaped model needs diffusers and transformers (test dependencies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def digits_run(folder: Path) -> Path:
    """The model `noisecraft train --dataset digits` builds (default settings), after one optimizer step."""
    from noisecraft.cli import main
    run = folder / "digits"
    assert main(["train", "--dataset", "digits", "--steps", "1", "--sample-every", "0", "--out", str(run)]) == 0
    return run


def tiny_sd(folder: Path) -> Path:
    from tiny_sd import save_tiny_pipeline
    save_tiny_pipeline(folder / "tiny-sd")
    return folder / "tiny-sd"


def measure(model: Path, steps: int | None, n: int, rounds: int, preview_every: int, memory: int) -> dict:
    from noisecraft.ui.engine import Engine, Job
    from noisecraft.ui.library import ModelLibrary

    with tempfile.TemporaryDirectory(prefix="noisecraft-ui-bench-") as outputs:
        engine = Engine(ModelLibrary([model.parent]), outputs=outputs)
        pipe = engine.load(str(model))
        prompt = "a handwritten digit seven" if pipe.takes_prompts else None
        settings = pipe.defaults.resolve(None, steps, None, None)
        job = Job(model=str(model), prompt=prompt, sampler=settings["sampler"], steps=settings["steps"], seed=7, n=n,
                  preview_every=preview_every)
        plain_kw = {"sampler": settings["sampler"], "steps": settings["steps"], "seed": 7}
        if prompt is not None:
            plain_kw["prompt"] = prompt

        def ui_once():
            t0, first_preview, items = time.perf_counter(), None, None
            for event in engine.run(job):
                if event[0] == "preview" and first_preview is None:
                    first_preview = time.perf_counter() - t0
                elif event[0] == "done":
                    items = event[1]
                elif event[0] in ("error", "cancelled"):
                    raise RuntimeError(f"the UI job ended with {event}")
            return time.perf_counter() - t0, first_preview, items

        def plain_once():
            t0 = time.perf_counter()
            result = pipe.sample(n, **plain_kw)
            return time.perf_counter() - t0, result

        ui_once(), plain_once()                      # warm-up: first calls allocate and build caches
        ui_s, plain_s, previews = [], [], []
        for _ in range(rounds):
            seconds, first, items = ui_once()
            ui_s.append(seconds)
            if first is not None:
                previews.append(first)
            seconds, result = plain_once()
            plain_s.append(seconds)
        from PIL import Image

        from noisecraft.viz.images import to_uint8
        ui_picture = np.asarray(Image.open(items[0].image))
        plain_picture = to_uint8(result.images)[0]
        same = np.array_equal(ui_picture.reshape(plain_picture.shape), plain_picture)
        out = {"model": str(model), "sampler": settings["sampler"], "steps": settings["steps"], "n": n,
               "preview_every": preview_every, "threads": torch.get_num_threads(),
               "ui_seconds": ui_s, "plain_seconds": plain_s,
               "ui_median": statistics.median(ui_s), "plain_median": statistics.median(plain_s),
               "ratio": statistics.median(ui_s) / statistics.median(plain_s),
               "first_preview_median": statistics.median(previews) if previews else None,
               "identical_picture": bool(same)}
        if memory:
            before = _rss_bytes()
            for _ in range(memory):
                ui_once()
            out.update(memory_generations=memory, rss_before=before, rss_after=_rss_bytes())
        return out


def with_training(model: Path, steps: int | None, rounds: int, folder: Path) -> dict:
    """Generation time (plain pipeline) alone, then while a UI training run (ui.training.TrainingJob on digits)
    goes, with the UI's thread split: server + trainer threads <= cores."""
    from noisecraft.pipelines.stable_diffusion import load_pipeline
    from noisecraft.ui.training import TrainingJob, thread_split, wait_until
    server, trainer = thread_split()
    torch.set_num_threads(server)
    pipe = load_pipeline(model)
    kw = {"prompt": "a handwritten digit seven"} if pipe.takes_prompts else {}

    def median_seconds():
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            pipe.sample(1, steps=steps, seed=7, **kw)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    median_seconds()
    alone = median_seconds()
    job = TrainingJob.start("digits", "unconditional", 10.0, folder / "training", threads=trainer,
                            sample_every=0, log_every=5, set_server_threads=False)
    try:
        if not wait_until(lambda: job.status()["steps"], 300):
            raise RuntimeError(f"the training run did not start: {job.status()['message']}")
        during = median_seconds()
        trained = job.status()["step"]
    finally:
        job.stop(timeout=120)
    return {"server_threads": server, "trainer_threads": trainer, "alone_median": alone, "during_median": during,
            "slowdown": during / alone, "training_steps_meanwhile": trained}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["digits", "tiny-sd"], help="digits | tiny-sd (built here)")
    p.add_argument("--run", default=None, help="measure this run / diffusers folder / single file instead")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="images per generation")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--preview-every", type=int, default=2)
    p.add_argument("--memory", type=int, default=0, metavar="N", help="then N more UI generations: memory growth")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the UI server's share, ui.training.thread_split)")
    p.add_argument("--with-training", action="store_true",
                   help="also: generation time alone vs while a UI training run goes (the thread split)")
    p.add_argument("--json", default=None, help="write the results here (default: print only)")
    args = p.parse_args()
    from noisecraft.ui.training import thread_split
    torch.set_num_threads(args.threads or thread_split()[0])
    results = {}
    with tempfile.TemporaryDirectory(prefix="noisecraft-ui-models-") as tmp:
        models = {"run": Path(args.run).resolve()} if args.run else \
            {name: (digits_run if name == "digits" else tiny_sd)(Path(tmp)) for name in args.models}
        for name, model in models.items():
            r = results[name] = measure(model, args.steps, args.n, args.rounds, args.preview_every, args.memory)
            line = (f"{name}: {r['sampler']}-{r['steps']}, n={r['n']}: UI {r['ui_median'] * 1000:.1f} ms, plain "
                    f"{r['plain_median'] * 1000:.1f} ms, ratio {r['ratio']:.3f}")
            if r["first_preview_median"] is not None:
                line += f", first preview after {r['first_preview_median'] * 1000:.1f} ms"
            line += f", identical picture: {r['identical_picture']}"
            if args.memory:
                line += (f", RSS {r['rss_before'] / 2**20:.0f} -> {r['rss_after'] / 2**20:.0f} MiB after "
                         f"{args.memory} more generations")
            print(line, flush=True)
            if args.with_training:
                t = results[name]["with_training"] = with_training(model, args.steps, args.rounds, Path(tmp) / name)
                print(f"{name} while training ({t['trainer_threads']} trainer + {t['server_threads']} server threads): "
                      f"{t['alone_median'] * 1000:.1f} ms alone, {t['during_median'] * 1000:.1f} ms during, slowdown "
                      f"{t['slowdown']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
