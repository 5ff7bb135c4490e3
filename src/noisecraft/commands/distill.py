"""`noisecraft distill`: few-step students of a trained run, by progressive distillation (training/distill.py) or
consistency distillation (training/consistency.py).

    noisecraft distill runs/mnist-v --out runs/fast [--steps 1] [--teacher-steps 16] [--iterations 1000 | --minutes M]
    noisecraft sample runs/fast/steps-4 --n 64 --out grid.png          a student samples with its own 4 steps
    noisecraft distill runs/mnist-v --out runs/cm --method consistency [--teacher-steps 18] [--metric l2]
    noisecraft sample runs/cm/consistency --steps 2 --n 64 --out grid.png    one student, any number of steps
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NoisecraftError
from .arg_types import positive_int


PROGRESSIVE_TEACHER_STEPS, PROGRESSIVE_ITERATIONS = 16, 1000   # per halving
CONSISTENCY_GRID, CONSISTENCY_ITERATIONS = 18, 4000           # N of Song et al.'s CIFAR-10 runs; one stage
# Consistency: of 2e-4 and 1e-3 on the MNIST v-run (20 CPU-minutes, README), 2e-4 scored better at 1, 2 and 4 steps.
PROGRESSIVE_LR, CONSISTENCY_LR = 1e-4, 2e-4


def cmd_distill(args) -> int:
    from ..config import load_run_config
    from ..data.datasets import load_dataset
    from ..training.consistency import ConsistencyDistiller
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

    consistency = args.method == "consistency"
    lr = args.lr if args.lr is not None else (CONSISTENCY_LR if consistency else PROGRESSIVE_LR)
    common = dict(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=lr, seed=args.seed,
                  device=args.device, progress=report)
    if consistency:
        teacher_steps = args.teacher_steps or CONSISTENCY_GRID
        iterations = args.iterations or CONSISTENCY_ITERATIONS
        distiller = ConsistencyDistiller(args.run, dataset, out, teacher_steps=teacher_steps, iterations=iterations,
                                         metric=args.metric, target_decay=args.target_decay, **common)
        budget = f"{args.minutes:g} minutes" if args.minutes else f"{iterations} iterations"
        print(f"consistency distillation of {args.run} on its ODE at {teacher_steps} σ's (Heun steps), {budget}, "
              f"{args.metric} metric -> {out}")
    else:
        teacher_steps = args.teacher_steps or PROGRESSIVE_TEACHER_STEPS
        iterations = args.iterations or PROGRESSIVE_ITERATIONS
        distiller = Distiller(args.run, dataset, out, teacher_steps=teacher_steps, iterations=iterations, **common)
        budget = f"{args.minutes:g} minutes in all" if args.minutes else f"{iterations} iterations per stage"
        print(f"distilling {args.run} ({teacher_steps} Heun steps) down to {args.steps} step(s), {budget} -> {out}")
    for folder in distiller.distill():
        print(f"wrote {folder}")
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("distill", help="few-step students of a run (progressive or consistency distillation)",
                       description="Progressive distillation (Salimans & Ho 2022): students of teacher-steps/2, "
                                   "/4, ... down to --steps steps, each written to OUT/steps-N. Consistency "
                                   "distillation (Song et al. 2023, --method consistency): one student for any "
                                   "number of steps, written to OUT/consistency.")
    d.add_argument("run", help="the trained run (EDM-preconditioned, or v / x0 prediction)")
    d.add_argument("--out", required=True, help="new folder for the students")
    d.add_argument("--method", choices=("progressive", "consistency"), default="progressive",
                   help="progressive (default) or consistency distillation")
    d.add_argument("--steps", type=positive_int, default=1, help="progressive: the fewest steps to distil down to "
                   "(a power of 2); consistency: the student's default sampling steps")
    d.add_argument("--teacher-steps", type=positive_int, default=None,
                   help=f"progressive: Heun steps of the first teacher (a power of 2, default "
                        f"{PROGRESSIVE_TEACHER_STEPS}); consistency: N, the σ grid the teacher's Heun steps join "
                        f"(default {CONSISTENCY_GRID})")
    d.add_argument("--iterations", type=positive_int, default=None,
                   help=f"optimizer steps per halving (default {PROGRESSIVE_ITERATIONS}); consistency: in all "
                        f"(default {CONSISTENCY_ITERATIONS})")
    d.add_argument("--minutes", type=float, default=None, help="wall-clock budget for all stages (instead of "
                   "--iterations)")
    d.add_argument("--metric", choices=("pseudo-huber", "l2"), default="pseudo-huber",
                   help="consistency: the distance between the student and its target (default pseudo-huber)")
    d.add_argument("--target-decay", type=float, default=0.95,
                   help="consistency: μ, the EMA rate of the target network (default 0.95)")
    d.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's")
    d.add_argument("--lr", type=float, default=None,
                   help=f"default {PROGRESSIVE_LR:g}; consistency {CONSISTENCY_LR:g}")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--data-dir", default=None, help="where the run's dataset lives (default $NOISECRAFT_DATA)")
    d.add_argument("--no-download", action="store_true")
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_distill)
