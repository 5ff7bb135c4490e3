"""Reference run: the diffusers MNIST recipe, trained for a time budget and scored with the domain score.

The recipe is the one from the Hugging Face diffusion course / diffusers tutorial for 28x28 MNIST:

    UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    DDPMScheduler(num_train_timesteps=1000), AdamW(lr=1e-3), batch 128, MSE between true and predicted noise,

with a constant learning rate. Three blocks downsample twice (28 -> 14 -> 7), so 28x28 images need no
padding. Samples come from DDIM with 50 steps (eta=0) built from the DDPM scheduler's config. The score is
noisecraft's FID-style domain score against the MNIST test split (a small MNIST classifier's features,
not Inception FID; see `noisecraft.evaluation.fid`).

    NOISECRAFT_DATA=/path/to/data python benchmarks/diffusers_recipe.py --minutes 30 --n 10000

The default (`--minutes 1`, `--n 64`) is a smoke run. It needs diffusers (a test dependency).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noisecraft.errors import NoisecraftError

BATCH_SIZE = 128
LEARNING_RATE = 1e-3
NUM_TRAIN_TIMESTEPS = 1000


# The training budget's clock: wall time by default; mnist_budget.py sets time.process_time to budget
# CPU time, which stays fair when other programs share the machine.
CLOCK = time.perf_counter


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_recipe_unet(sample_size: int = 28, channels: int = 1):
    """The recipe's UNet2DModel (about 1.7M parameters at 28x28, 1 channel)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def build_recipe_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)


def train_recipe(dataset, minutes: float | None = None, steps: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = True):
    """Train the recipe on `dataset` (an `ImageDataset`) until `minutes` pass or `steps` are done.

    Returns `(model, stats)` with stats = {steps, seconds, images_per_s, final_loss, parameters}; the
    final loss is the mean of the last 50 steps. The model is returned in eval mode.
    """
    if minutes is None and steps is None:
        raise NoisecraftError("Give a time budget (minutes) or a number of steps for the recipe run.")
    _, channels, height, width = dataset.images.shape
    if height != width or height % 4 != 0:
        raise NoisecraftError(
            f"The recipe UNet needs square images with a side divisible by 4, got {height}x{width}; "
            "resize the dataset (e.g. image_size=28 or 32)."
        )
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG left untouched
        torch.manual_seed(seed)
        model = build_recipe_unet(sample_size=int(height), channels=int(channels))
    model = model.to(device).train()
    scheduler = build_recipe_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    budget = None if minutes is None else minutes * 60.0
    max_steps = math.inf if steps is None else steps

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="diffusers recipe", unit="step")
    losses: list[float] = []
    step = 0
    start = CLOCK()
    while step < max_steps and (budget is None or CLOCK() - start < budget):
        indices = torch.randint(0, len(dataset.images), (BATCH_SIZE,), generator=generator)
        x0, _ = dataset.batch(indices)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (BATCH_SIZE,), generator=generator)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(model(noisy, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if bar is not None:
            elapsed = CLOCK() - start
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{step * BATCH_SIZE / elapsed:.1f}")
    seconds = CLOCK() - start
    if bar is not None:
        bar.close()
    stats = {
        "steps": step,
        "seconds": round(seconds, 2),
        "images_per_s": round(step * BATCH_SIZE / seconds, 2) if step else 0.0,
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "parameters": count_parameters(model),
    }
    return model.eval(), stats


@torch.no_grad()
def sample_recipe(model, n: int, steps: int = 50, seed: int = 0, batch_size: int = 250,
                  progress: bool = False) -> torch.Tensor:
    """Draw `n` images with DDIM (eta=0, `steps` steps); returns a float CPU tensor N x C x H x W in [-1, 1].

    All starting noise comes from one generator seeded with `seed`, so a seed gives the same images
    whatever the batch size.
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(build_recipe_scheduler().config)
    ddim.set_timesteps(steps)
    size, channels = model.config.sample_size, model.config.in_channels
    device = next(model.parameters()).device
    noise = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    out = []
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="DDIM sampling", unit="batch")
    for i in chunks:
        x = noise[i : i + batch_size].to(device)
        for t in ddim.timesteps:
            eps = model(x, t).sample
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, columns: int = 8, max_images: int = 64) -> None:
    """Save up to `max_images` images in [-1, 1] as one PNG grid with a 2-pixel border."""
    from PIL import Image

    images = images[:max_images]
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, col = divmod(k, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = pixels[k]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="training time budget (default 1: smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps instead")
    parser.add_argument("--n", type=int, default=64, help="number of images to sample and score")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="data folder (default: $NOISECRAFT_DATA)")
    parser.add_argument("--cache-dir", default=None, help="classifier cache (default: <data dir>/classifiers)")
    parser.add_argument("--out", default="benchmarks/out/diffusers_recipe", help="folder for the grid and results")
    args = parser.parse_args(argv)

    from noisecraft.data.datasets import load_dataset
    from noisecraft.evaluation.classifier import load_or_train_classifier
    from noisecraft.evaluation.fid import domain_fid

    train = load_dataset("mnist", split="train", data_dir=args.data_dir)
    test = load_dataset("mnist", split="test", data_dir=args.data_dir)
    minutes = None if args.steps is not None else args.minutes
    model, stats = train_recipe(train, minutes=minutes, steps=args.steps, seed=args.seed)

    start = time.perf_counter()
    samples = sample_recipe(model, args.n, steps=args.sample_steps, seed=args.seed, progress=True)
    sample_seconds = time.perf_counter() - start

    classifier = load_or_train_classifier("mnist", data_dir=args.data_dir, cache_dir=args.cache_dir)
    score = domain_fid(samples, test, classifier)

    out = Path(args.out)
    save_grid(samples, out / "samples.png")
    results = {**stats, "sampler": f"DDIM-{args.sample_steps}", "n": args.n,
               "sample_seconds": round(sample_seconds, 2), "domain_fid": score, "seed": args.seed}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    caveat = "" if args.n >= 1000 else " (n < 1000: biased, smoke run only)"
    print(
        f"diffusers recipe: {stats['parameters'] / 1e6:.2f}M params, {stats['steps']} steps in "
        f"{stats['seconds']:.0f}s ({stats['images_per_s']:.1f} img/s), loss {stats['final_loss']:.4f}; "
        f"DDIM-{args.sample_steps} n={args.n} in {sample_seconds:.0f}s; "
        f"domain FID vs MNIST test {score:.3f}{caveat}; grid {out / 'samples.png'}"
    )


if __name__ == "__main__":
    try:
        main()
    except NoisecraftError as exc:
        raise SystemExit(f"error: {exc}")
