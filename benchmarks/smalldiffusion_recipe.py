"""Peer run: smalldiffusion's documented Fashion-MNIST recipe, applied to MNIST and trained for a time budget.

The recipe is the one smalldiffusion's README (version 0.5.0) points to for FashionMNIST, its example script
examples/fashion_mnist_dit.py ("FID around 5-6 after about 2 GPU hours"):

    DiT(in_dim=28, channels=1, patch_size=2, depth=6, head_dim=32, num_heads=6, mlp_ratio=4.0)  # 4.1M params
    ScheduleDDPM(N=1000, beta_start=0.0001, beta_end=0.02)
    training_loop(loader, model, schedule, lr=1e-3)   # AdamW, the model's own loss: eps-prediction MSE
    DataLoader(batch_size=1024, shuffle=True), images mapped to [-1, 1]
    torch_ema.ExponentialMovingAverage(decay=0.99), updated after every yielded step; samples from the average
    samples(model, schedule.sample_sigmas(20), gam=1.6)   # mu=0 (library default): 20 deterministic steps

`variant="unet"` selects the README's other 28x28 example, examples/fashion_mnist_unet.py:
`Scaled(Unet)(28, 1, 1, ch=64, ch_mult=(1, 1, 2), attn_resolutions=(14,))` (4.4M parameters) with
`ScheduleLogLinear(N=800, sigma_min=0.01, sigma_max=20)`, lr 7e-4, EMA decay 0.999, the same sampler.

Training goes through the library's own `training_loop` generator. Its loader here is an iterable that hands
out shuffled batches of noisecraft's `ImageDataset` and ends when the time budget (or step count) is used up,
so the loop finishes the step in flight and every counted step is a full AdamW update.

What MNIST changes: nothing that 28x28 forces (the DiT's 2x2 patches and the U-Net's two halvings fit 28).
The one departure is dropping the example's random horizontal flip (`img_train_transform`), because a
mirrored digit is not an MNIST digit. The scripts run through accelerate on a GPU; here the same
`training_loop` and `samples` run on an `Accelerator` pinned to the requested device.

The sampler is the library's `samples` with the example's settings: 20 steps of `schedule.sample_sigmas(20)`
with gam=1.6, mu=0. Each step is one network evaluation, so the recipe's own default is already the common
20-NFE budget. (The function's bare default, gam=1, is DDIM; pass `gam=1.0` to `sample_recipe` for it.)
Samples are the library's x0 in [-1, 1], clamped, in the format of `diffusers_recipe.sample_recipe`.

    NOISECRAFT_DATA=/path/to/data python benchmarks/smalldiffusion_recipe.py --minutes 1 --n 16 --out /tmp/x
    python benchmarks/smalldiffusion_recipe.py --minutes 30 --n 1000 --score

Note the batch of 1024, kept because it is the recipe's: on one CPU thread a DiT step took 1.5 to 3.5 minutes
here (10-13 images/s at batch 128-256, 4.7 at 1024 on a loaded machine), so a short run makes only a few steps,
and a step holds about 13 MB of activations per image, about 15 GB of memory in all at batch 1024. `batch_size`
(`--batch-size`) changes it for experiments; the benchmark should keep the recipe's. Needs the benchmark-only packages of benchmarks/requirements.txt (see its header for how to install).
"""

from __future__ import annotations

import argparse
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

PACKAGE = "smalldiffusion"
BATCH_SIZE = 1024  # both Fashion-MNIST examples
DEFAULT_SAMPLING_STEPS = 20  # both examples: schedule.sample_sigmas(20)
GAM = 1.6  # both examples; mu stays at the library default 0
VARIANTS = {
    # examples/fashion_mnist_dit.py (the README's FashionMNIST recipe)
    "dit": {"learning_rate": 1e-3, "ema_decay": 0.99},
    # examples/fashion_mnist_unet.py
    "unet": {"learning_rate": 7e-4, "ema_decay": 0.999},
}

_accelerators: dict[str, object] = {}


# The training budget's clock: wall time by default; mnist_budget.py sets time.process_time to budget
# CPU time, which stays fair when other programs share the machine.
CLOCK = time.perf_counter


def _library():
    return import_peer("smalldiffusion", PACKAGE)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_recipe(variant: str = "dit", image_size: int = 28, channels: int = 1):
    """(model, schedule) of the chosen example script."""
    lib = _library()
    if variant == "dit":
        model = lib.DiT(in_dim=image_size, channels=channels, patch_size=2, depth=6, head_dim=32, num_heads=6,
                        mlp_ratio=4.0)
        schedule = lib.ScheduleDDPM(N=1000, beta_start=0.0001, beta_end=0.02)
    elif variant == "unet":
        model = lib.Scaled(lib.Unet)(image_size, channels, channels, ch=64, ch_mult=(1, 1, 2),
                                     attn_resolutions=(image_size // 2,))
        schedule = lib.ScheduleLogLinear(N=800, sigma_min=0.01, sigma_max=20)
    else:
        raise NoisecraftError(f"Unknown smalldiffusion variant {variant!r}; use one of {sorted(VARIANTS)}.")
    return model, schedule


def _accelerator(device: torch.device):
    """One accelerate.Accelerator per device kind (accelerate keeps process-wide state)."""
    key = "cpu" if device.type == "cpu" else "gpu"
    if key not in _accelerators:
        from accelerate import Accelerator

        _accelerators[key] = Accelerator(cpu=key == "cpu")
    return _accelerators[key]


def _fork_rng(device: torch.device):
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


class _Batches:
    """Shuffled epochs of `batch_size` images in [-1, 1] that stop when the budget or step count is spent."""

    def __init__(self, dataset, batch_size, device, generator, budget, max_steps):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.generator, self.budget, self.max_steps = generator, budget, max_steps
        self.steps, self.start = 0, None

    def __iter__(self):
        self.start = CLOCK()
        order, cursor = torch.randperm(len(self.dataset), generator=self.generator), 0
        while self.steps < self.max_steps and (
            self.budget is None or CLOCK() - self.start < self.budget
        ):
            if cursor + self.batch_size > len(order):  # like DataLoader(shuffle=True), minus the short tail batch
                order, cursor = torch.randperm(len(self.dataset), generator=self.generator), 0
            x, _ = self.dataset.batch(order[cursor : cursor + self.batch_size])
            cursor += self.batch_size
            self.steps += 1
            yield x.to(self.device)


def train_recipe(dataset, minutes: float | None = None, steps: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = True,
                 variant: str = "dit", batch_size: int = BATCH_SIZE):
    """Train the recipe on `dataset` (an `ImageDataset`) until `minutes` pass or `steps` are done.

    Returns `(model, stats)` like `diffusers_recipe.train_recipe`: the model holds the EMA weights (what the
    example samples with), is in eval mode and carries its schedule for `sample_recipe`; stats =
    {steps, seconds, images_per_s, final_loss, parameters}, the final loss being the mean of the last 50 steps.
    The global RNG is left as it was. `progress` is accepted for the common interface; the library's
    `training_loop` always shows its own tqdm bar.
    """
    if minutes is None and steps is None:
        raise NoisecraftError("Give a time budget (minutes) or a number of steps for the recipe run.")
    if variant not in VARIANTS:
        raise NoisecraftError(f"Unknown smalldiffusion variant {variant!r}; use one of {sorted(VARIANTS)}.")
    lib = _library()
    ema_cls = import_peer("torch_ema", "torch-ema").ExponentialMovingAverage
    settings = VARIANTS[variant]
    device = torch.device(device)
    accelerator = _accelerator(device)
    _, channels, height, width = dataset.images.shape
    if height != width:
        raise NoisecraftError(f"The smalldiffusion recipes need square images, got {height}x{width}.")

    with _fork_rng(device):  # seeded init and training noise; the caller's RNG state is restored after
        torch.manual_seed(seed)
        model, schedule = build_recipe(variant, image_size=int(height), channels=int(channels))
        model = model.to(accelerator.device)
        ema = ema_cls(model.parameters(), decay=settings["ema_decay"])
        batches = _Batches(dataset, batch_size, accelerator.device, torch.Generator().manual_seed(seed),
                           None if minutes is None else minutes * 60.0, math.inf if steps is None else steps)
        losses: list[float] = []
        # epochs=1: the one "epoch" is the whole budget, since `batches` ends only when the budget is spent
        for ns in lib.training_loop(batches, model, schedule, accelerator=accelerator, epochs=1,
                                    lr=settings["learning_rate"]):
            losses.append(ns.loss.item())
            if progress:
                elapsed = CLOCK() - batches.start
                ns.pbar.set_description(f"smalldiffusion {variant} loss={losses[-1]:.4f} "
                                        f"step {batches.steps} {batches.steps * batch_size / elapsed:.1f} img/s")
            ema.update()
        seconds = CLOCK() - batches.start
    ema.copy_to(model.parameters())
    model.eval()
    model.recipe_schedule = schedule
    stats = {
        "steps": batches.steps,
        "seconds": round(seconds, 2),
        "images_per_s": round(batches.steps * batch_size / seconds, 2) if batches.steps else 0.0,
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "parameters": count_parameters(model),
    }
    return model, stats


@torch.no_grad()
def sample_recipe(model, n: int, steps: int = DEFAULT_SAMPLING_STEPS, seed: int = 0, batch_size: int = 250,
                  progress: bool = False, gam: float = GAM) -> torch.Tensor:
    """Draw `n` images with the library's `samples` (`steps` NFE, gam=1.6, mu=0 as in the examples).

    Returns a float CPU tensor N x C x H x W in [-1, 1], like `diffusers_recipe.sample_recipe`. All starting
    noise comes from one generator seeded with `seed` (the sampler adds no noise with mu=0), so a seed gives
    the same images whatever the batch size.
    """
    lib = _library()
    device = next(model.parameters()).device
    accelerator = _accelerator(device)
    sigmas = model.recipe_schedule.sample_sigmas(steps)
    noise = torch.randn(n, *model.input_dims, generator=torch.Generator().manual_seed(seed))
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"smalldiffusion sampling ({steps} steps)", unit="batch")
    out = []
    with _fork_rng(device):
        torch.manual_seed(seed)
        for i in chunks:
            xt = noise[i : i + batch_size].to(device) * sigmas[0].to(device)
            *_, x0 = lib.samples(model, sigmas, gam=gam, xt=xt, accelerator=accelerator)
            out.append(x0.clamp(-1.0, 1.0).float().cpu())
    model.eval()
    return torch.cat(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, out="benchmarks/out/smalldiffusion_recipe")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="dit")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="the recipe's is 1024")
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[DEFAULT_SAMPLING_STEPS],
                        help="sampling steps (= NFE), one sample set each; the recipe's is 20")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _library()  # fail early, with the install hint, if the package is missing

    from noisecraft.data.datasets import load_dataset

    train = load_dataset("mnist", split="train", data_dir=args.data_dir)
    minutes = None if args.steps is not None else args.minutes
    model, stats = train_recipe(train, minutes=minutes, steps=args.steps, seed=args.seed, device=args.device,
                                variant=args.variant, batch_size=args.batch_size)
    print(f"smalldiffusion recipe ({args.variant}): {stats['parameters']:,} params, {stats['steps']} steps "
          f"({stats['steps'] * args.batch_size} images) in {stats['seconds']:.0f}s = "
          f"{stats['images_per_s']:.1f} img/s on {torch.get_num_threads()} thread(s), "
          f"loss {stats['final_loss']:.4f}")
    draw_sample_sets(args, model, sample_recipe, lambda steps: f"gam{GAM}-{steps}",
                     {**stats, "variant": args.variant, "batch_size": args.batch_size})

if __name__ == "__main__":
    try:
        main()
    except NoisecraftError as exc:
        raise SystemExit(f"error: {exc}")
