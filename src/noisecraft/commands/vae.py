"""Autoencoder commands: `noisecraft train-vae`, and the latent figure that `noisecraft viz latents` draws.

    noisecraft train-vae --dataset mnist --out runs/vae-mnist [--minutes 6] [--channels 32,64,64] [--gan]
    noisecraft viz latents IMAGE --vae runs/vae-mnist --out latents.png
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NoisecraftError
from .arg_types import int_list


def _load_splits(args):
    """The training split and, where the dataset has one, the test split (for the PSNR)."""
    from ..data.datasets import load_dataset
    common = dict(data_dir=args.data_dir, image_size=args.image_size, download=not args.no_download)
    train = load_dataset(args.dataset, split="train", **common)
    if args.dataset.startswith("folder:"):
        return train, None                      # no test split: the PSNR is measured on training images
    return train, load_dataset(args.dataset, split="test", **common)


def cmd_train_vae(args) -> int:
    from ..models.unet import count_parameters
    from ..models.vae import VAEConfig
    from ..training.vae_trainer import DEFAULT_VAE_MINUTES, VAETrainConfig, VAETrainer

    if args.out is None:
        raise NoisecraftError("say where the autoencoder goes with --out DIR.")
    out = Path(args.out)
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        raise NoisecraftError(f"{out} already holds a run; choose another --out or delete it.")
    dataset, test = _load_splits(args)
    model = VAEConfig(in_channels=dataset.image_shape[0], latent_channels=args.latent_channels,
                      block_out_channels=int_list(args.channels, "--channels"), layers_per_block=args.layers_per_block,
                      norm_groups=args.norm_groups)
    train = {k: getattr(args, k) for k in ("steps", "minutes", "batch_size", "lr", "kl_weight", "gan_weight",
                                           "gan_start", "seed", "warmup_steps")}
    train = {k: v for k, v in train.items() if v is not None}
    if args.steps is None and args.minutes is None:
        train["minutes"] = DEFAULT_VAE_MINUTES
    train_config = VAETrainConfig(loss=args.loss, gan=args.gan, **train)
    trainer = VAETrainer(model, train_config, dataset, out, test_dataset=test, device=args.device)
    c, h, w = dataset.image_shape
    f = model.downsample_factor
    budget = " or ".join(x for x in (f"{train_config.steps} steps" if train_config.steps else "",
                                     f"{train_config.minutes:g} minutes" if train_config.minutes else "") if x)
    print(f"training an autoencoder on {dataset.name} ({len(dataset)} images {c}x{h}x{w} -> latents "
          f"{model.latent_channels}x{h // f}x{w // f}), {count_parameters(trainer.model) / 1e6:.2f}M parameters, "
          f"budget {budget} -> {out}")
    summary = trainer.fit()
    print(f"done: {summary['steps']} steps in {summary['seconds']:.0f} s; reconstruction PSNR {summary['psnr']:.2f} dB "
          f"({summary['psnr_split']} split, {summary['psnr_images']} images); latent scaling factor "
          f"{summary['scaling_factor']:.5f}; weights in {out / 'model.safetensors'}")
    return 0


# --- viz latents ----------------------------------------------------------------------------------

def latent_figure(vae, image, path) -> Path:
    """One row per image: the input, each channel of its latent (posterior mean, min–max normalised per channel
    and upscaled to the image size with nearest neighbour) and the reconstruction decoded from that mean."""
    import torch
    import torch.nn.functional as F

    from ..viz.images import save_strip

    if image.ndim == 3:
        image = image.unsqueeze(0)
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            x = image.to(device, torch.float32)
            z = vae.encode(x).mode()
            recon = vae.decode(z).clamp(-1, 1)
    finally:
        vae.train(was_training)
    n, c, h, w = x.shape
    lo = z.amin(dim=(2, 3), keepdim=True)
    hi = z.amax(dim=(2, 3), keepdim=True)
    shown = (z - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1                       # each channel to [-1, 1]
    shown = F.interpolate(shown, size=(h, w), mode="nearest")
    channels = shown.unsqueeze(2).expand(-1, -1, c, -1, -1)                   # grey, repeated for RGB inputs
    rows = torch.cat([x.unsqueeze(1), channels, recon.unsqueeze(1)], dim=1).cpu()   # N × (L+2) × C × H × W
    captions = ["input"] + [f"z{i}" for i in range(z.shape[1])] + ["recon"]
    return save_strip(rows, path, captions=captions)


# --- argument parsing -----------------------------------------------------------------------------

def add_parsers(sub) -> None:
    """Register `train-vae` on the sub-parsers of the noisecraft command line."""
    t = sub.add_parser("train-vae", help="train the KL autoencoder of latent diffusion")
    t.add_argument("--dataset", default="mnist", help="digits | mnist | fashion-mnist | cifar10 | folder:PATH")
    t.add_argument("--data-dir", default=None, help="where dataset files live (default $NOISECRAFT_DATA or ~/.cache/noisecraft)")
    t.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
    t.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
    t.add_argument("--out", default=None, help="new run directory")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 6 if no --steps)")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--latent-channels", type=int, default=4)
    t.add_argument("--channels", default="32,64,64",
                   help="width of each level; the image shrinks 2x between levels (32,64,64: 28x28 -> 7x7)")
    t.add_argument("--layers-per-block", type=int, default=1)
    t.add_argument("--norm-groups", type=int, default=8)
    t.add_argument("--loss", choices=["l1", "l2"], default="l1", help="reconstruction loss")
    t.add_argument("--kl-weight", type=float, default=None, help="weight of KL(q(z|x) || N(0, I)) (default 1e-6)")
    t.add_argument("--gan", action="store_true", help="add a PatchGAN discriminator (hinge loss)")
    t.add_argument("--gan-weight", type=float, default=None, help="weight of the adversarial loss (default 0.1)")
    t.add_argument("--gan-start", type=int, default=None, help="steps before the discriminator joins (default 1000)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=cmd_train_vae)
