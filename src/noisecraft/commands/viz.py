"""`noisecraft viz`: the forward process, the schedules, the reverse process of a run, a VAE's latents."""

from __future__ import annotations

from ..errors import NoisecraftError
from ..viz.process import forward_strip, reverse_pictures
from .arg_types import finite_float, int_at_least, positive_int
from .dataset_args import add_data_args, load_data


def cmd_viz(args) -> int:
    from ..schedule import NoiseSchedule
    from ..viz.plots import plot_schedules

    if args.what == "reverse":
        return _viz_reverse(args)
    if args.what == "latents":
        from .vae import cmd_viz_latents
        return cmd_viz_latents(args)
    if args.what == "schedules":
        schedules = {k: NoiseSchedule.create(k, args.T) for k in ("linear", "scaled_linear", "cosine")}
        print(f"wrote {plot_schedules(schedules, args.out or 'schedules.png')}")
        return 0
    # forward process of one dataset image
    dataset = load_data(args, split="train")
    if not 0 <= args.index < len(dataset):
        raise NoisecraftError(f"--index must be in 0..{len(dataset) - 1}, got {args.index}.")
    schedule = NoiseSchedule.create(args.schedule, args.T)
    ts = args.t if args.t else [t for t in (0, 50, 100, 200, 300, 500, 700, 999) if t < args.T]
    bad = [t for t in ts if not 0 <= t < args.T]
    if bad:
        raise NoisecraftError(f"--t values must be timesteps in 0..{args.T - 1}, got {bad}.")
    path = forward_strip(dataset, args.index, schedule, args.out or "forward.png", ts=ts, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _viz_reverse(args) -> int:
    from ..pipelines.diffusion import DiffusionPipeline

    if not args.run:
        raise NoisecraftError("viz reverse needs a run directory: noisecraft viz reverse RUN --out strip.png.")
    if args.save_every is not None and args.save_every < 1:
        raise NoisecraftError(f"--save-every must be at least 1, got {args.save_every}.")
    pipe = DiffusionPipeline.from_run(args.run, device=args.device)
    save_every = args.save_every or max(1, pipe.defaults.resolve(args.sampler, args.steps)["steps"] // 10)
    result = pipe.sample(args.n, sampler=args.sampler, steps=args.steps, seed=args.seed, label=args.label,
                         prompt=args.prompt, guidance=args.guidance, save_every=save_every)
    written = reverse_pictures(result.trajectory, args.out or "reverse.png", args.gif)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parsers(sub) -> None:
    v = sub.add_parser("viz", help="pictures: the forward process, the schedules, the reverse process of a run")
    v.add_argument("what", choices=["forward", "schedules", "reverse", "latents"])
    v.add_argument("run", nargs="?", default=None, help="run directory (viz reverse), or an image (viz latents)")
    v.add_argument("--vae", default=None, help="viz latents: the autoencoder run (from noisecraft train-vae)")
    add_data_args(v)
    v.add_argument("--sampler", default=None, help="viz reverse: the sampler (default: the model's)")
    v.add_argument("--steps", type=positive_int, default=None, help="viz reverse: sampling steps (default: the model's)")
    v.add_argument("--save-every", type=int, default=None,
                   help="viz reverse: a column every k steps (default steps/10)")
    v.add_argument("--gif", default=None, help="viz reverse: also a GIF of x_t")
    v.add_argument("--n", type=positive_int, default=16, help="viz reverse: samples in the GIF (the strip shows the first)")
    v.add_argument("--label", type=int, default=None, help="viz reverse: class (conditional runs)")
    v.add_argument("--prompt", default=None, help="viz reverse: prompt (text-conditional runs)")
    v.add_argument("--guidance", type=finite_float(), default=None,
                   help="viz reverse: classifier-free guidance scale (default: the model's)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--index", type=int, default=0, help="viz forward: which dataset image")
    v.add_argument("--t", type=int, nargs="+", default=None, help="viz forward: timesteps to show (default 0 50 ... 999)")
    v.add_argument("--schedule", default="cosine")
    v.add_argument("--T", type=int_at_least(2), default=1000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None)
    v.set_defaults(func=cmd_viz)
