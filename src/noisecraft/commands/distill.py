"""`noisecraft distill`: few-step students of a trained run by progressive distillation (training/distill.py).

    noisecraft distill runs/mnist-edm --out runs/fast [--steps 1] [--teacher-steps 16] [--iterations 1000 | --minutes M]
    noisecraft sample runs/fast/steps-4 --n 64 --out grid.png          a student samples with its own 4 Euler steps
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NoisecraftError
from .arg_types import positive_int


def cmd_distill(args) -> int:
    from ..config import load_run_config
    from ..data.datasets import load_dataset
    from ..training.distill import Distiller

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise NoisecraftError(f"{out} is not empty; choose a new --out for the students.")
    config = load_run_config(args.run)
    _, h, _ = config.data.image_shape
    dataset = load_dataset(config.data.dataset, split="train", data_dir=args.data_dir, image_size=h,
                           download=not args.no_download)

    def report(steps, iteration, loss, seconds):
        print(f"  student {steps:>3} steps  iteration {iteration:>6}  loss {loss:.4f}  {seconds / 60:.1f} min",
              flush=True)

    distiller = Distiller(args.run, dataset, out, steps=args.steps, teacher_steps=args.teacher_steps,
                          iterations=args.iterations, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, device=args.device, progress=report)
    budget = f"{args.minutes:g} minutes in all" if args.minutes else f"{args.iterations} iterations per stage"
    print(f"distilling {args.run} ({args.teacher_steps} Heun steps) down to {args.steps} step(s), {budget} -> {out}")
    for folder in distiller.distill():
        print(f"wrote {folder}")
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("distill", help="few-step students of a run (progressive distillation)",
                       description="Progressive distillation (Salimans & Ho 2022): students of teacher-steps/2, "
                                   "/4, ... down to --steps Euler steps, each written to OUT/steps-N.")
    d.add_argument("run", help="the trained run (EDM-preconditioned, or v / x0 prediction)")
    d.add_argument("--out", required=True, help="new folder for the students")
    d.add_argument("--steps", type=positive_int, default=1, help="the fewest steps to distil down to (a power of 2)")
    d.add_argument("--teacher-steps", type=positive_int, default=16,
                   help="Heun steps of the first teacher (a power of 2, default 16)")
    d.add_argument("--iterations", type=positive_int, default=1000, help="optimizer steps per halving")
    d.add_argument("--minutes", type=float, default=None, help="wall-clock budget for all stages (instead of "
                   "--iterations)")
    d.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's")
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--data-dir", default=None, help="where the run's dataset lives (default $NOISECRAFT_DATA)")
    d.add_argument("--no-download", action="store_true")
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_distill)
