"""Reference run for colour images: diffusers' unconditional-training example (examples/unconditional_image_generation/
train_unconditional.py) scaled to 32×32, with the interface of diffusers_recipe.py (train_recipe, sample_recipe).

The example's UNet2DModel has six levels (128, 128, 256, 256, 512, 512) with attention at the fifth, for 64-256 px
images. At 32×32 five halvings would end at 1×1, so it is scaled down the way DDPM's own CIFAR-10 network is: four
levels (128, 128, 256, 256), two ResNet layers each, attention at the third (8×8). The rest is the example's
defaults: DDPMScheduler (1000 steps, linear β), ε-prediction and MSE, AdamW (lr 1e-4, betas 0.95/0.999, weight decay
1e-6, eps 1e-8) with 500 warm-up steps (the example then decays by a cosine over its full run; a short budget never
gets there, so the rate stays at 1e-4), batch 16, random horizontal flips, and its EMA (inv_gamma 1, power 3/4,
at most 0.9999). The example samples with DDPMPipeline at 1000 steps; sample_recipe also does DDIM at fewer.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from noisecraft.errors import NoisecraftError

BATCH_SIZE = 16
LEARNING_RATE = 1e-4
WARMUP_STEPS = 500
NUM_TRAIN_TIMESTEPS = 1000
EMA_MAX_DECAY, EMA_INV_GAMMA, EMA_POWER = 0.9999, 1.0, 0.75

# The training budget's clock: wall time by default; the budget benchmarks set time.process_time.
CLOCK = time.perf_counter


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_recipe_unet(sample_size: int = 32, channels: int = 3):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=2,
                       block_out_channels=(128, 128, 256, 256),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def build_recipe_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear")


def ema_decay(step: int) -> float:
    """diffusers' EMAModel with warm-up: 1 - (1 + step/inv_gamma)^(-power), clipped to [0, max]."""
    return min(EMA_MAX_DECAY, max(0.0, 1 - (1 + step / EMA_INV_GAMMA) ** -EMA_POWER))


def train_recipe(dataset, minutes: float | None = None, steps: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = False):
    """Train until `minutes` of CLOCK pass or `steps` are done; returns (EMA model in eval mode, stats)."""
    if minutes is None and steps is None:
        raise NoisecraftError("Give a time budget (minutes) or a number of steps for the recipe run.")
    _, channels, height, width = dataset.images.shape
    if height != width or height % 8:
        raise NoisecraftError(f"the scaled example U-Net needs square images with a side divisible by 8, got "
                              f"{height}x{width}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_recipe_unet(int(height), int(channels)).to(device).train()
    ema = build_recipe_unet(int(height), int(channels)).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    scheduler = build_recipe_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.95, 0.999), weight_decay=1e-6,
                                  eps=1e-8)
    generator = torch.Generator().manual_seed(seed)
    budget = None if minutes is None else minutes * 60.0
    max_steps = math.inf if steps is None else steps
    losses, step, start = [], 0, CLOCK()
    while step < max_steps and (budget is None or CLOCK() - start < budget):
        indices = torch.randint(0, len(dataset.images), (BATCH_SIZE,), generator=generator)
        x0, _ = dataset.batch(indices)
        flip = torch.rand(BATCH_SIZE, generator=generator) < 0.5
        x0 = torch.where(flip.reshape(-1, 1, 1, 1), x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (BATCH_SIZE,), generator=generator)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # the example clips at 1 through accelerate
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - ema_decay(step))
        losses.append(loss.item())
        step += 1
    seconds = CLOCK() - start
    stats = {"steps": step, "seconds": round(seconds, 2),
             "images_per_s": round(step * BATCH_SIZE / seconds, 2) if step else 0.0,
             "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
             "parameters": count_parameters(model)}
    return ema, stats


@torch.no_grad()
def sample_recipe(model, n: int, steps: int = 1000, seed: int = 0, batch_size: int = 250,
                  progress: bool = False) -> torch.Tensor:
    """n images: DDPM ancestral sampling at 1000 steps (the example's DDPMPipeline), DDIM (eta 0) at fewer.
    Returns a float CPU tensor N×C×H×W in [-1, 1]."""
    from diffusers import DDIMScheduler, DDPMScheduler

    config = build_recipe_scheduler().config
    scheduler = DDPMScheduler.from_config(config) if steps >= NUM_TRAIN_TIMESTEPS else DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    size, channels = model.config.sample_size, model.config.in_channels
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        x = torch.randn(count, channels, size, size, generator=generator).to(device)
        for t in scheduler.timesteps:
            eps = model(x, t).sample
            x = scheduler.step(eps, t, x, generator=generator if device.type == "cpu" else None).prev_sample
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)
