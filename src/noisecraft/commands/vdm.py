"""Variational diffusion model commands: `noisecraft train-vdm` and `noisecraft eval-vdm`.

    noisecraft train-vdm --dataset mnist --out runs/vdm [--minutes 20 | --steps N] [--base-channels 32] [--fourier 7,8]
    noisecraft train-vdm --out runs/vdm --resume --minutes 10          continue a run
    noisecraft eval-vdm runs/vdm --split test --n 1000                 bits/dim ± standard error
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import NoisecraftError
from .arg_types import int_list


def cmd_train_vdm(args) -> int:
    from ..data.datasets import load_dataset
    from ..training.vdm_trainer import DEFAULT_VDM_MINUTES, train_vdm

    if args.out is None:
        raise NoisecraftError("say where the run goes with --out DIR.")
    dataset = load_dataset(args.dataset, split="train", data_dir=args.data_dir, image_size=args.image_size,
                           download=not args.no_download)
    unet = {"base_channels": args.base_channels, "num_res_blocks": args.num_res_blocks, "dropout": args.dropout}
    if args.channel_mults:
        unet["channel_mults"] = int_list(args.channel_mults, "--channel-mults")
    if args.attention_levels is not None:
        unet["attention_levels"] = int_list(args.attention_levels, "--attention-levels", allow_none=True)
    options = {k: getattr(args, k) for k in ("warmup_steps", "ema_decay", "checkpoint_every")
               if getattr(args, k) is not None}
    minutes = args.minutes
    if args.steps is None and minutes is None:
        minutes = DEFAULT_VDM_MINUTES
    budget = " or ".join(x for x in (f"{args.steps} steps" if args.steps else "",
                                     f"{minutes:g} minutes" if minutes else "") if x)
    c, h, w = dataset.image_shape
    print(f"{'resuming' if args.resume else 'training'} a variational diffusion model on {dataset.name} "
          f"({len(dataset)} images {c}x{h}x{w}), budget {budget} -> {args.out}")
    summary = train_vdm(dataset, args.out, minutes=minutes, steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, unet=unet, fourier=int_list(args.fourier, "--fourier", allow_none=True),
                        seed=args.seed, device=args.device, resume=args.resume, progress=not args.quiet, **options)
    print(f"done: {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['seconds_per_step']:.3f} s/step); "
          f"training bound {summary['bpd']:.3f} bits/dim (last steps); learned γ_0 = {summary['gamma_0']:.2f}, "
          f"γ_1 = {summary['gamma_1']:.2f}; weights in {Path(args.out) / 'model.safetensors'}")
    return 0


def cmd_eval_vdm(args) -> int:
    import torch

    from ..data.datasets import load_dataset
    from ..training.vdm_trainer import load_vdm, vdm_bits_per_dim

    model, config = load_vdm(args.run, device=args.device)
    c, h, w = config["data"]["image_shape"]
    name = args.dataset or config["data"]["dataset"]
    if h != w:
        raise NoisecraftError(f"the run's images are {h}x{w}; eval-vdm handles square images only.")
    dataset = load_dataset(name, split=args.split, data_dir=args.data_dir, image_size=h,
                           download=not args.no_download)
    if args.n is not None:
        if args.n < 1:
            raise NoisecraftError(f"--n must be a positive integer, got {args.n}.")
        dataset = dataset.subset(args.n)
    if tuple(dataset.image_shape) != (c, h, w):
        raise NoisecraftError(f"{name} images have shape {dataset.image_shape} but the run expects {(c, h, w)}; "
                              f"pass the run's dataset with --dataset.")
    result = vdm_bits_per_dim(model, dataset, batch_size=args.batch_size, repeats=args.repeats,
                              generator=torch.Generator().manual_seed(args.seed))
    stderr = "" if math.isnan(result["stderr"]) else f" ± {result['stderr']:.4f}"
    print(f"bits/dim {result['mean']:.4f}{stderr} (variational bound, standard error over {result['n']} "
          f"{args.split} images of {name}, {result['repeats']} estimate{'s' if result['repeats'] > 1 else ''} each): "
          f"diffusion {result['diffusion']:.4f}, prior {result['prior']:.4f}, "
          f"reconstruction {result['reconstruction']:.4f}")
    return 0


def add_parsers(sub) -> None:
    """Register `train-vdm` and `eval-vdm` on the sub-parsers of the noisecraft command line."""
    t = sub.add_parser("train-vdm", help="train a variational diffusion model (learned schedule, bits/dim)")
    t.add_argument("--dataset", default="mnist", help="digits | mnist | fashion-mnist | cifar10 | folder:PATH")
    t.add_argument("--data-dir", default=None,
                   help="where dataset files live (default $NOISECRAFT_DATA or ~/.cache/noisecraft)")
    t.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
    t.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
    t.add_argument("--out", default=None, help="run directory (new, or the one to continue with --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (its model settings are kept)")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 20 if no --steps)")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up (default 200)")
    t.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the saved weights (default 0.999)")
    t.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 500)")
    t.add_argument("--base-channels", type=int, default=None, help="U-Net width of the first level (default 32)")
    t.add_argument("--channel-mults", default=None, help="width multiplier per level, e.g. 1,2,2")
    t.add_argument("--num-res-blocks", type=int, default=None)
    t.add_argument("--attention-levels", default=None, help="levels with self-attention, e.g. 2, or none")
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--fourier", default="7,8",
                   help="exponents n of the sin/cos(2^n·π·z) input features (default 7,8), or none")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_vdm)

    e = sub.add_parser("eval-vdm", help="bits/dim of a variational diffusion model on a dataset split")
    e.add_argument("run", help="run directory made by noisecraft train-vdm")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--n", type=int, default=1000, help="number of images (the first n of the split)")
    e.add_argument("--dataset", default=None, help="default: the run's dataset")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--no-download", action="store_true")
    e.add_argument("--batch-size", type=int, default=250)
    e.add_argument("--repeats", type=int, default=1, help="independent estimates of the bound per image")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_eval_vdm)
