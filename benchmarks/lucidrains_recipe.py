"""Peer run: the README recipe of lucidrains' denoising-diffusion-pytorch, trained for a time budget on MNIST.

The recipe, from the library's README (version 2.3.4) and its `Trainer` defaults:

    Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)                      # 35.7M parameters at 1 channel
    GaussianDiffusion(model, image_size=32, timesteps=1000, sampling_timesteps=250)
        # library defaults: objective='pred_v', beta_schedule='sigmoid', ddim_sampling_eta=0, auto_normalize=True
    Trainer(diffusion, folder, train_batch_size=32, train_lr=8e-5, gradient_accumulate_every=2,
            ema_decay=0.995, amp=True)
        # Trainer defaults: Adam betas (0.9, 0.99), grad-norm clipping at 1.0, EMA (ema-pytorch) updated every
        # 10 steps with its default warm-up, samples drawn from the EMA model, random horizontal flips

The loss is the library's own: `diffusion(images)` draws timesteps and noise and returns the weighted
v-prediction MSE. `Trainer` itself is not used, because it reads a folder of image files and runs through
accelerate; `train_recipe` is the same loop written out: micro-batches of 32 from shuffled epochs, each loss
divided by 2 and back-propagated, the gradient norm clipped to 1, one Adam step per 2 micro-batches (64
images), then the EMA update.

What 28x28 MNIST forces, and the other departures:

* Padding to 32x32. The U-Net halves the image three times (dim_mults has four levels) with a space-to-depth
  rearrange that needs even sides, so 28 -> 14 -> 7 -> 3.5 fails. The images are zero-padded by 2 pixels on
  each side (black, MNIST's background) and samples are cropped back to the centre 28x28. Padding keeps the
  README's network unchanged (dropping a level, dim_mults=(1, 2, 4), would make it a 9.9M-parameter model
  that is not the recipe) at the cost of 32^2 / 28^2 = 1.31x the pixels; the border is constant black and
  easy to learn. Resizing to 32 instead would change the digits' stroke geometry against the test split.
* No horizontal flips (the Trainer's default augmentation): mirrored digits are not MNIST digits.
* Precision: the README's amp=True (fp16 autocast with gradient scaling, as accelerate does it) applies on
  CUDA only, where the library's flash attention needs it on GPUs newer than the A100; on CPU the run stays
  in float32, like the other recipes in this benchmark. Sampling on CUDA runs under the same autocast.
* Data: images in [0, 1] as the library expects (it maps them to [-1, 1] itself; `auto_normalize=True`),
  taken from noisecraft's `ImageDataset` rather than PNG files.

The EMA is ema-pytorch's as the Trainer sets it up: during the first 100 steps it copies the weights every 10
steps instead of averaging, so after a short CPU run (a few dozen steps) the returned model holds the weights
of up to 10 steps earlier.

Sampling uses the library's own sampler, `diffusion.sample(batch_size=...)` on the EMA model: DDIM (eta=0)
whenever `sampling_timesteps` < 1000, one network evaluation per step, so `steps=250` is the README default
and `steps=20` is the common 20-NFE budget (`steps=1000` runs its ancestral DDPM sampler). Samples come back
in [0, 1], are cropped to 28x28 and mapped to [-1, 1], the format of `diffusers_recipe.sample_recipe`.

    NOISECRAFT_DATA=/path/to/data python benchmarks/lucidrains_recipe.py --minutes 1 --n 16 --out /tmp/x
    python benchmarks/lucidrains_recipe.py --minutes 30 --n 1000 --sample-steps 250 20 --score

The CLI default samples only at 20 steps: 250 steps of a 35.7M-parameter U-Net take minutes even for 16
images on a CPU. Needs the benchmark-only packages of benchmarks/requirements.txt (see its header for how to install).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peer_imports import import_peer
from _recipe_cli import add_common_arguments, draw_sample_sets

from noisecraft.errors import NoisecraftError

PACKAGE = "denoising-diffusion-pytorch"
UNET_DIM = 64
DIM_MULTS = (1, 2, 4, 8)
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SAMPLING_STEPS = 250  # README: sampling_timesteps=250 (DDIM)
BATCH_SIZE = 32  # README: train_batch_size=32 ...
GRADIENT_ACCUMULATE_EVERY = 2  # ... gradient_accumulate_every=2: 64 images per optimizer step
LEARNING_RATE = 8e-5  # README: train_lr=8e-5
ADAM_BETAS = (0.9, 0.99)  # Trainer default
MAX_GRAD_NORM = 1.0  # Trainer default
EMA_DECAY = 0.995  # README / Trainer default
EMA_UPDATE_EVERY = 10  # Trainer default
SIDE_MULTIPLE = 2 ** (len(DIM_MULTS) - 1)  # three halvings: sides must be multiples of 8


# The training budget's clock: wall time by default; mnist_budget.py sets time.process_time to budget
# CPU time, which stays fair when other programs share the machine.
CLOCK = time.perf_counter


def _library():
    return import_peer("denoising_diffusion_pytorch.denoising_diffusion_pytorch", PACKAGE)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def padding_for(height: int, width: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that makes both sides multiples of 8 (28 -> 32: 2 each side)."""
    ph, pw = (-height) % SIDE_MULTIPLE, (-width) % SIDE_MULTIPLE
    return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


def build_recipe_diffusion(image_size: int = 32, channels: int = 1,
                           sampling_timesteps: int = DEFAULT_SAMPLING_STEPS):
    """The README's Unet inside the README's GaussianDiffusion (library defaults otherwise)."""
    lib = _library()
    unet = lib.Unet(dim=UNET_DIM, dim_mults=DIM_MULTS, channels=channels, flash_attn=True)
    return lib.GaussianDiffusion(unet, image_size=image_size, timesteps=NUM_TRAIN_TIMESTEPS,
                                 sampling_timesteps=sampling_timesteps)


def _fork_rng(device: torch.device):
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def train_recipe(dataset, minutes: float | None = None, steps: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = True,
                 batch_size: int = BATCH_SIZE):
    """Train the recipe on `dataset` (an `ImageDataset`) until `minutes` pass or `steps` optimizer steps are done.

    A step is one Adam update over `GRADIENT_ACCUMULATE_EVERY` micro-batches of `batch_size` (default 2 x 32,
    the README's). Returns `(diffusion, stats)`: the EMA copy of the `GaussianDiffusion` (what the library's
    Trainer samples from) in eval mode, and stats = {steps, seconds, images_per_s, final_loss, parameters}
    like `diffusers_recipe.train_recipe`; images_per_s counts every training image, the final loss is the
    mean of the last 50 steps, parameters are the U-Net's. The global RNG is left as it was.
    """
    if minutes is None and steps is None:
        raise NoisecraftError("Give a time budget (minutes) or a number of steps for the recipe run.")
    ema_cls = import_peer("ema_pytorch", "ema-pytorch").EMA
    device = torch.device(device)
    _, channels, height, width = dataset.images.shape
    pad = padding_for(int(height), int(width))
    padded = (int(height) + pad[2] + pad[3], int(width) + pad[0] + pad[1])
    images_per_step = batch_size * GRADIENT_ACCUMULATE_EVERY
    budget = None if minutes is None else minutes * 60.0
    max_steps = math.inf if steps is None else steps

    with _fork_rng(device):  # seeded init and training noise; the caller's RNG state is restored after
        torch.manual_seed(seed)
        diffusion = build_recipe_diffusion(image_size=padded, channels=int(channels)).to(device).train()
        ema = ema_cls(diffusion, beta=EMA_DECAY, update_every=EMA_UPDATE_EVERY).to(device)
        optimizer = torch.optim.Adam(diffusion.parameters(), lr=LEARNING_RATE, betas=ADAM_BETAS)
        generator = torch.Generator().manual_seed(seed)
        order, cursor = torch.randperm(len(dataset), generator=generator), 0

        def next_batch():  # shuffled epochs, like the Trainer's DataLoader(shuffle=True)
            nonlocal order, cursor
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(dataset), generator=generator), 0
            x, _ = dataset.batch(order[cursor : cursor + batch_size])
            cursor += batch_size
            x = (x + 1.0) / 2.0  # the library wants [0, 1] and normalizes to [-1, 1] itself
            return torch.nn.functional.pad(x, pad, value=0.0).to(device)

        # The README's amp=True (accelerate's fp16 autocast + gradient scaling) on CUDA, float32 on CPU. On GPUs
        # newer than the A100 the library's flash attention allows only its fp16/bf16 kernel, so amp is needed.
        use_amp = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="lucidrains recipe", unit="step")
        losses: list[float] = []
        step = 0
        start = CLOCK()
        while step < max_steps and (budget is None or CLOCK() - start < budget):
            total_loss = 0.0
            for _ in range(GRADIENT_ACCUMULATE_EVERY):
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    loss = diffusion(next_batch()) / GRADIENT_ACCUMULATE_EVERY
                total_loss += loss.item()
                scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            ema.update()
            losses.append(total_loss)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.4f}",
                                img_s=f"{step * images_per_step / (CLOCK() - start):.1f}")
        seconds = CLOCK() - start
        if bar is not None:
            bar.close()

    model = ema.ema_model.eval()
    model.data_shape = (int(channels), int(height), int(width))  # for cropping samples back
    stats = {
        "steps": step,
        "seconds": round(seconds, 2),
        "images_per_s": round(step * images_per_step / seconds, 2) if step else 0.0,
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "parameters": count_parameters(diffusion.model),
    }
    return model, stats


@torch.no_grad()
def sample_recipe(model, n: int, steps: int = DEFAULT_SAMPLING_STEPS, seed: int = 0, batch_size: int = 250,
                  progress: bool = False) -> torch.Tensor:
    """Draw `n` images with the library's `diffusion.sample` (DDIM, eta=0, when `steps` < 1000; `steps` NFE).

    Returns a float CPU tensor N x C x H x W in [-1, 1], cropped to the training images' size (28x28 for
    MNIST), like `diffusers_recipe.sample_recipe`. The library draws its noise from the global RNG, which is
    seeded with `seed` for the call and restored after, so a seed gives the same images for the same
    `batch_size` (unlike the diffusers recipe, not across batch sizes).
    """
    if not 1 <= steps <= model.num_timesteps:
        raise NoisecraftError(f"steps must be between 1 and {model.num_timesteps}, got {steps}.")
    saved = model.sampling_timesteps, model.is_ddim_sampling
    model.sampling_timesteps, model.is_ddim_sampling = steps, steps < model.num_timesteps
    _, height, width = getattr(model, "data_shape", (model.channels, *model.image_size))
    top = (model.image_size[0] - height) // 2
    left = (model.image_size[1] - width) // 2
    out = []
    try:
        with _fork_rng(model.device):
            torch.manual_seed(seed)
            for i in range(0, n, batch_size):
                # the library prints a tqdm bar per batch; keep it only when asked for progress
                quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
                amp = torch.autocast("cuda", dtype=torch.float16, enabled=model.device.type == "cuda")
                with quiet, amp:
                    x = model.sample(batch_size=min(batch_size, n - i))
                x = x[:, :, top : top + height, left : left + width]
                out.append((x.float().cpu() * 2.0 - 1.0).clamp(-1.0, 1.0))
    finally:
        model.sampling_timesteps, model.is_ddim_sampling = saved
    return torch.cat(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, out="benchmarks/out/lucidrains_recipe")
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[20],
                        help=f"DDIM steps (= NFE), one sample set each; the README's is {DEFAULT_SAMPLING_STEPS}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _library()  # fail early, with the install hint, if the package is missing

    from noisecraft.data.datasets import load_dataset

    train = load_dataset("mnist", split="train", data_dir=args.data_dir)
    minutes = None if args.steps is not None else args.minutes
    model, stats = train_recipe(train, minutes=minutes, steps=args.steps, seed=args.seed, device=args.device)
    print(f"lucidrains recipe: {stats['parameters']:,} params, {stats['steps']} steps "
          f"({stats['steps'] * BATCH_SIZE * GRADIENT_ACCUMULATE_EVERY} images) in {stats['seconds']:.0f}s = "
          f"{stats['images_per_s']:.1f} img/s on {torch.get_num_threads()} thread(s), "
          f"loss {stats['final_loss']:.4f}")
    name_for = lambda steps: f"DDIM-{steps}" if steps < NUM_TRAIN_TIMESTEPS else "DDPM-1000"
    draw_sample_sets(args, model, sample_recipe, name_for, dict(stats))

if __name__ == "__main__":
    try:
        main()
    except NoisecraftError as exc:
        raise SystemExit(f"error: {exc}")
