"""`noisecraft demo`: the whole story on the bundled 8×8 digits in a few CPU minutes, no download."""

from __future__ import annotations

from pathlib import Path

from ..viz.process import forward_strip, trajectory_frames


def cmd_demo(args) -> int:
    import torch

    from ..config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
    from ..data.datasets import load_dataset
    from ..models.unet import UNetConfig, count_parameters
    from ..pipelines.diffusion import DiffusionPipeline
    from ..schedule import NoiseSchedule
    from ..training.trainer import Trainer
    from ..viz.images import save_gif, save_grid, save_strip

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
    frames, denoised, captions = trajectory_frames(result.trajectory)
    gif = save_gif(frames, out / "denoise.gif", nrow=4, captions=captions)
    pick = torch.linspace(0, len(frames) - 1, 8).round().long().tolist()
    reverse = save_strip(torch.stack([torch.stack([frames[i][0] for i in pick]), torch.stack([denoised[i][0] for i in pick])]),
                         out / "reverse.png", rows=["x_t", "x0_hat"], captions=[captions[i].split()[1] for i in pick])
    print(f"    wrote {gif} and {reverse}")
    print(f"done: pictures in {out}/ (forward.png, samples.png, denoise.gif, reverse.png), model in {run}/")
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="the whole story on bundled digits in a few CPU minutes (no download)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=1500)
    d.add_argument("--minutes", type=float, default=None, help="stop earlier after this many minutes")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_demo)
