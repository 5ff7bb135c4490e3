"""`noisecraft viz`: the forward process, the schedules, the reverse process of a run, a VAE's latents; the guide's
pictures (forward of any image or latent, a sampler's sigmas, one denoising step) live in viz_tutorial.py."""

from __future__ import annotations

from ..errors import NoisecraftError
from ..viz.process import forward_strip, reverse_pictures
from .arg_types import finite_float, int_at_least, positive_int
from .dataset_args import add_data_args, load_data


def cmd_viz(args) -> int:
    from ..schedule import NoiseSchedule
    from ..viz.plots import plot_schedules

    if args.what == "forward" and (args.input or args.latent):
        from .viz_tutorial import viz_forward_input
        if not args.input:
            raise NoisecraftError("--latent needs the image to encode: add --input IMAGE.")
        return viz_forward_input(args)
    if args.latent:
        raise NoisecraftError("--latent is for viz forward (the forward process of an image's latent).")
    if args.what in ("latents", "sigmas", "denoise-step"):
        from . import viz_tutorial
        if args.what == "sigmas" and args.run:
            raise NoisecraftError("viz sigmas takes no run argument; pass the model as --model RUN_OR_SD.")
        return {"latents": viz_tutorial.viz_latents, "sigmas": viz_tutorial.viz_sigmas,
                "denoise-step": viz_tutorial.viz_denoise_step}[args.what](args)
    if args.what == "reverse":
        return _viz_reverse(args)
    if args.what == "schedules":
        schedules = {k: NoiseSchedule.create(k, args.T) for k in ("linear", "scaled_linear", "cosine")}
        print(f"wrote {plot_schedules(schedules, args.out or 'schedules.png')}")
        return 0
    # forward process of one dataset image
    dataset = load_data(args, split="train")
    if not 0 <= args.index < len(dataset):
        raise NoisecraftError(f"--index must be in 0..{len(dataset) - 1}, got {args.index}.")
    schedule = NoiseSchedule.create(args.schedule or "cosine", args.T)
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
    v = sub.add_parser("viz", help="pictures: the forward process, the schedules, the reverse process of a run",
                       description="forward: an image noised by q(x_t | x0) (a dataset image, or --input IMAGE, "
                       "or its latent with --latent); schedules: beta, alpha_bar, sigma, SNR of the beta schedules; "
                       "sigmas: the sigma a sampler visits per step; reverse: x_t and x0_hat while a run samples; "
                       "latents: the channels of an image's latent; denoise-step: x_t, eps, eps_hat and x0_hat of "
                       "one network evaluation at --t.")
    v.add_argument("what", choices=["forward", "schedules", "sigmas", "reverse", "latents", "denoise-step"])
    v.add_argument("run", nargs="?", default=None,
                   help="run directory or SD model (viz reverse, viz denoise-step), or an image (viz latents)")
    v.add_argument("--input", default=None, help="viz forward, denoise-step, latents: an image file (or .npz)")
    v.add_argument("--latent", default=None,
                   help="viz forward: noise the image's latent through this autoencoder (a train-vae run, a latent "
                   "run or an SD model) and decode it")
    v.add_argument("--model", default=None, help="viz sigmas: the run or SD model whose schedule and defaults to use "
                   "(default: Stable Diffusion's scaled_linear schedule and linspace spacing)")
    v.add_argument("--spacing", default=None, choices=["leading", "trailing", "linspace", "karras", "nested"],
                   help="viz sigmas: timestep spacing (default: the model's)")
    v.add_argument("--vae", default=None,
                   help="viz latents: the autoencoder (a train-vae run, a latent run or an SD model)")
    add_data_args(v)
    v.add_argument("--sampler", default=None, help="viz reverse, sigmas: the sampler (default: the model's)")
    v.add_argument("--steps", type=positive_int, default=None, help="viz reverse, sigmas: sampling steps (default: the model's)")
    v.add_argument("--save-every", type=int, default=None,
                   help="viz reverse: a column every k steps (default steps/10)")
    v.add_argument("--gif", default=None, help="viz reverse: also a GIF of x_t")
    v.add_argument("--n", type=positive_int, default=16, help="viz reverse: samples in the GIF (the strip shows the first)")
    v.add_argument("--label", type=int, default=None, help="viz reverse, denoise-step: class (conditional runs)")
    v.add_argument("--prompt", default=None, help="viz reverse, denoise-step: prompt (text-conditional runs)")
    v.add_argument("--guidance", type=finite_float(), default=None,
                   help="viz reverse: classifier-free guidance scale (default: the model's)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--index", type=int, default=0, help="viz forward: which dataset image")
    v.add_argument("--t", type=int, nargs="+", default=None,
                   help="viz forward: timesteps to show (default 0 50 ... 999); viz denoise-step: the timestep (40)")
    v.add_argument("--schedule", default=None,
                   help="beta schedule (default cosine; viz sigmas: scaled_linear; --latent: the model's)")
    v.add_argument("--T", type=int_at_least(2), default=1000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None)
    v.set_defaults(func=cmd_viz)
