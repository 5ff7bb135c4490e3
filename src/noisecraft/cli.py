"""The `noisecraft` command line: parse arguments, call the Python API, print where results went.

    noisecraft demo                      forward strip, a small model trained on bundled digits, grid + GIF
    noisecraft train --dataset mnist --out runs/mnist [--conditional] [--steps N | --minutes M] [--resume RUN]
    noisecraft sample RUN --n 64 --sampler ddim --steps 50 --seed 0 --out s.npz --grid g.png --gif d.gif
    noisecraft viz forward|schedules ...

Errors a user can cause print one line ("noisecraft: error: ...") and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import NoisecraftError
from .training.config import DEFAULT_MINUTES



# --- helpers shared by commands ---------------------------------------------------------------

def _load_data(args, split="train"):
    from .training.datasets import load_dataset
    return load_dataset(args.dataset, split=split, data_dir=args.data_dir, image_size=args.image_size,
                        download=not args.no_download)


def _sample_grid_fn(n: int = 16, steps: int = 25):
    """A callback for the trainer: sample n images from the EMA weights with DDIM and save a grid."""
    def write(trainer, path):
        import torch

        from .denoiser import Denoiser
        from .samplers import generate
        from .viz.images import save_grid
        cfg = trainer.config
        den = Denoiser(trainer.ema.model, trainer.schedule, cfg.diffusion.prediction, cfg.diffusion.clip_x0)
        k = cfg.model.num_classes
        cond = torch.arange(n) % k if cfg.data.conditional and k else None
        nrow = k if cond is not None and n % k == 0 else None
        x = generate(den, (n, *cfg.data.image_shape), sampler="ddim", steps=steps, cond=cond, seed=0,
                     device=trainer.device)
        save_grid(x.clamp(-1, 1).cpu(), path, nrow=nrow)
    return write


def _build_config(args, dataset):
    from .training.config import make_run_config
    model = {k: getattr(args, k) for k in ("base_channels", "num_res_blocks", "dropout")}
    if args.channel_mults:
        model["channel_mults"] = tuple(int(m) for m in args.channel_mults.split(","))
    if args.attention_levels is not None:
        model["attention_levels"] = tuple(int(a) for a in args.attention_levels.split(",") if a.strip())
    diffusion = dict(schedule=args.schedule, prediction=args.prediction, min_snr_gamma=args.min_snr_gamma)
    train = {k: getattr(args, k) for k in ("batch_size", "lr", "ema_decay", "warmup_steps", "steps", "minutes",
                                           "seed", "label_dropout", "sample_every", "checkpoint_every")}
    config = make_run_config(dataset, args.conditional, model, diffusion, train)
    if args.min_snr_gamma == 0:
        config.diffusion.min_snr_gamma = None
    return config


# --- commands ---------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .models.unet import count_parameters
    from .training.trainer import Trainer, load_run_config, resume_trainer

    if args.resume:
        run = Path(args.resume)
        config = load_run_config(run)
        args.dataset = config.data.dataset
        args.image_size = config.data.image_shape[-1] if args.image_size is None else args.image_size
        dataset = _load_data(args)
        trainer = resume_trainer(run, dataset, device=args.device, steps=args.steps, minutes=args.minutes)
        print(f"resuming {run} at step {trainer.step}")
    else:
        if args.out is None:
            raise NoisecraftError("say where the run goes with --out DIR (or continue one with --resume DIR).")
        out = Path(args.out)
        if (out / "state").exists() or (out / "config.json").exists():
            raise NoisecraftError(f"{out} already holds a run; continue it with --resume {out} or choose another --out.")
        dataset = _load_data(args)
        config = _build_config(args, dataset)
        trainer = Trainer(config, dataset, out, device=args.device)
        budget = (f"{config.train.steps} steps" if config.train.steps else "") + \
                 (" or " if config.train.steps and config.train.minutes else "") + \
                 (f"{config.train.minutes:g} minutes" if config.train.minutes else "")
        print(f"training on {dataset.name} ({len(dataset)} images {'x'.join(map(str, dataset.image_shape))}), "
              f"U-Net {count_parameters(trainer.model) / 1e6:.2f}M parameters, budget {budget} -> {out}")
    summary = trainer.fit(sample_fn=_sample_grid_fn())
    print(f"done: {summary['steps']} steps, loss {summary['loss']:.4f}, {summary['images_per_s']:.0f} images/s; "
          f"EMA weights in {trainer.out_dir / 'model.safetensors'}")
    return 0


def _trajectory_frames(trajectory, limit=16):
    """x_t (shown on the data scale, x·sqrt(ᾱ)) and x̂0 for each saved step, first `limit` images."""
    frames, denoised, captions = [], [], []
    total = trajectory[-1]["i"] + 1 if trajectory else 0
    for info in trajectory:
        scale = (1.0 + info["sigma"] ** 2) ** -0.5
        frames.append((info["x"][:limit] * scale).clamp(-1, 1))
        denoised.append(info["denoised"][:limit].clamp(-1, 1))
        captions.append(f"step {info['i'] + 1}/{total}  sigma={info['sigma']:.2f}")
    return frames, denoised, captions


def cmd_sample(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .io.checkpoint import atomic_write_bytes
    from .pipelines.pixel import DiffusionPipeline
    from .viz.images import save_gif, save_grid, to_uint8

    if not (args.out or args.grid or args.gif):
        raise NoisecraftError("say what to write: --out samples.npz, --grid grid.png and/or --gif denoise.gif.")
    pipe = DiffusionPipeline.from_run(args.run, device=args.device)
    options = {}
    if args.eta is not None:
        options["eta"] = args.eta
    if args.variance is not None:
        options["variance"] = args.variance
    if args.karras:
        options["karras"] = True
    save_every = args.save_every or (max(1, args.steps // 25) if args.gif else 0)
    bars = []

    def progress(k):
        # The bar opens at the first sampler step, after every argument has been checked, so a bad
        # --sampler or --label prints only the error line.
        if not bars:
            bars.append(tqdm(total=args.n, unit="img", desc=f"{args.sampler}-{args.steps}"))
        bars[0].update(k)

    t0 = time.perf_counter()
    try:
        result = pipe.sample(args.n, sampler=args.sampler, steps=args.steps, seed=args.seed, label=args.label,
                             guidance=args.guidance, save_every=save_every, batch_size=args.batch_size,
                             spacing=args.spacing, progress=progress, **options)
    finally:
        for bar in bars:
            bar.close()
    seconds = time.perf_counter() - t0
    written = []
    if args.out:
        import io
        buf = io.BytesIO()
        arrays = {"images": to_uint8(result.images)}
        if result.labels is not None:
            arrays["labels"] = result.labels.numpy().astype(np.int64)
        np.savez_compressed(buf, **arrays)
        written.append(atomic_write_bytes(args.out, buf.getvalue()))
    if args.grid:
        written.append(save_grid(result.images[:args.grid_n], args.grid))
    if args.gif:
        frames, _, captions = _trajectory_frames(result.trajectory)
        written.append(save_gif(frames, args.gif, captions=captions))
    print(f"{args.n} samples in {seconds:.1f} s ({seconds / args.n * 1000:.1f} ms/image); wrote "
          + ", ".join(str(p) for p in written))
    return 0


def cmd_viz(args) -> int:
    from .schedule import NoiseSchedule
    from .viz.plots import plot_schedules

    if args.what == "schedules":
        schedules = {k: NoiseSchedule.create(k, args.T) for k in ("linear", "scaled_linear", "cosine")}
        print(f"wrote {plot_schedules(schedules, args.out or 'schedules.png')}")
        return 0
    # forward process of one dataset image
    dataset = _load_data(args, split="train")
    if not 0 <= args.index < len(dataset):
        raise NoisecraftError(f"--index must be in 0..{len(dataset) - 1}, got {args.index}.")
    path = forward_strip(dataset, args.index, NoiseSchedule.create(args.schedule, args.T), args.out or "forward.png",
                         seed=args.seed)
    print(f"wrote {path}")
    return 0


def forward_strip(dataset, index, schedule, path, ts=(0, 50, 100, 200, 300, 500, 700, 999), seed=0):
    """The closed-form forward process q(x_t | x0) of one image at several t, as a captioned strip."""
    import torch

    from .viz.images import save_strip
    x0, _ = dataset.batch(torch.tensor([index]))
    ts = [t for t in ts if t < schedule.T]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    xs = torch.cat([schedule.q_sample(x0, torch.tensor([t]), noise) for t in ts])
    return save_strip(torch.cat([x0, xs.clamp(-1, 1)]), path, captions=["x0"] + [f"t={t}" for t in ts])


def cmd_demo(args) -> int:
    import torch

    from .pipelines.pixel import DiffusionPipeline
    from .schedule import NoiseSchedule
    from .training.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
    from .training.datasets import load_dataset
    from .training.trainer import Trainer
    from .models.unet import UNetConfig, count_parameters
    from .viz.images import save_gif, save_grid, save_strip

    out = Path(args.out)
    dataset = load_dataset("digits", split="train")
    print("1/4 the forward process: a real digit from scikit-learn's bundled set, noised by q(x_t | x0)")
    strip = forward_strip(dataset, 0, NoiseSchedule.create("cosine", 1000), out / "forward.png")
    print(f"    wrote {strip}")

    config = RunConfig(
        model=UNetConfig(in_channels=1, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                         attention_levels=(2,), dropout=0.0),
        diffusion=DiffusionConfig(schedule="cosine", prediction="eps", min_snr_gamma=5.0),
        train=TrainConfig(batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995, steps=args.steps,
                          minutes=args.minutes, sample_every=0, checkpoint_every=0, seed=args.seed),
        data=DataConfig(dataset="digits", image_shape=tuple(dataset.image_shape), class_names=dataset.class_names),
    )
    run = out / "run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    trainer = Trainer(config, dataset, run, device=args.device)
    print(f"2/4 training a {count_parameters(trainer.model) / 1e6:.2f}M-parameter U-Net on {len(dataset)} digits "
          f"(16x16) for {args.steps} steps")
    summary = trainer.fit()
    print(f"    {summary['steps']} steps in {summary['seconds']:.0f} s, final loss {summary['loss']:.4f}")

    print("3/4 sampling 64 digits with DDIM (50 steps) from the EMA weights")
    pipe = DiffusionPipeline.from_run(run, device=args.device)
    result = pipe.sample(64, sampler="ddim", steps=50, seed=args.seed, save_every=2)
    grid = save_grid(result.images, out / "samples.png", nrow=8)
    print(f"    wrote {grid}")
    print("4/4 the reverse process: x_t and the predicted x0 as the sampler runs")
    frames, denoised, captions = _trajectory_frames(result.trajectory)
    gif = save_gif(frames, out / "denoise.gif", nrow=4, captions=captions)
    pick = torch.linspace(0, len(frames) - 1, 8).round().long().tolist()
    reverse = save_strip(torch.stack([torch.stack([frames[i][0] for i in pick]), torch.stack([denoised[i][0] for i in pick])]),
                         out / "reverse.png", rows=["x_t", "x0_hat"], captions=[captions[i].split()[1] for i in pick])
    print(f"    wrote {gif} and {reverse}")
    print(f"done: pictures in {out}/ (forward.png, samples.png, denoise.gif, reverse.png), model in {run}/")
    return 0


# --- argument parsing --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noisecraft", description="Diffusion models made readable.")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(q):
        q.add_argument("--dataset", default="mnist", help="digits | mnist | fashion-mnist | folder:PATH")
        q.add_argument("--data-dir", default=None, help="where dataset files live (default $NOISECRAFT_DATA or ~/.cache/noisecraft)")
        q.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
        q.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")

    d = sub.add_parser("demo", help="the whole story on bundled digits in a few CPU minutes (no download)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=1500)
    d.add_argument("--minutes", type=float, default=None, help="stop earlier after this many minutes")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a pixel-space diffusion model")
    data_args(t)
    t.add_argument("--out", default=None, help="new run directory")
    t.add_argument("--resume", default=None, help="continue the run in this directory")
    t.add_argument("--conditional", action="store_true", help="class-conditional (with label dropout for guidance)")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    t.add_argument("--minutes", type=float, default=None, help=f"wall-clock budget (default {DEFAULT_MINUTES:g} if no --steps)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--ema-decay", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--label-dropout", type=float, default=None)
    t.add_argument("--schedule", default=None, help="linear | scaled_linear | cosine")
    t.add_argument("--prediction", default=None, help="eps | x0 | v")
    t.add_argument("--min-snr-gamma", type=float, default=None, help="Min-SNR loss weighting (0 turns it off)")
    t.add_argument("--base-channels", type=int, default=None)
    t.add_argument("--channel-mults", default=None, help="e.g. 1,2,2")
    t.add_argument("--num-res-blocks", type=int, default=None)
    t.add_argument("--attention-levels", default=None, help="e.g. 2 (level 0 = full resolution)")
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--sample-every", type=int, default=None)
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run directory written by noisecraft train")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--sampler", default="ddim",
                   help="ddpm | ddim | plms | lms | euler | euler_ancestral | heun | dpmpp_2m | dpmpp_2m_sde, or a "
                        "known alias: 'Euler a', 'DPM++ 2M', 'DPM++ 2M Karras' (any name + ' Karras')")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--spacing", default="leading", help="leading | trailing | linspace")
    s.add_argument("--karras", action="store_true", help="Karras et al. (EDM) sigma spacing instead of --spacing")
    s.add_argument("--eta", type=float, default=None, help="noise of ddim, euler_ancestral, dpmpp_2m_sde (0: deterministic)")
    s.add_argument("--variance", default=None, help="DDPM variance: small (posterior) | large (beta)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=int, default=None, help="class to draw (conditional runs)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w (1 = none)")
    s.add_argument("--batch-size", type=int, default=250)
    s.add_argument("--out", default=None, help=".npz with uint8 images N×H×W×C (and labels)")
    s.add_argument("--grid", default=None, help="PNG grid of the first --grid-n samples")
    s.add_argument("--grid-n", type=int, default=64)
    s.add_argument("--gif", default=None, help="GIF of the denoising process (first 16 samples)")
    s.add_argument("--save-every", type=int, default=0, help="keep x_t and x0_hat every k steps")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("viz", help="pictures: the forward process, the schedules")
    v.add_argument("what", choices=["forward", "schedules"])
    data_args(v)
    v.add_argument("--index", type=int, default=0)
    v.add_argument("--schedule", default="cosine")
    v.add_argument("--T", type=int, default=1000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None)
    v.set_defaults(func=cmd_viz)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NoisecraftError as e:
        print(f"noisecraft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("noisecraft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
