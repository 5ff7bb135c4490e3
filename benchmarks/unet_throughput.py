"""Training and sampling throughput of noisecraft's default MNIST U-Net vs diffusers' UNet2DModel, in one process.

    python benchmarks/unet_throughput.py                 # ≈ 3 minutes on 2 cores
    python benchmarks/unet_throughput.py --rounds 5

The reference is the U-Net of diffusers' MNIST tutorial (block_out_channels (32, 64, 64), attention in the two
lower blocks, 1.71M parameters). Our default (one ResBlock per level, 1.19M) is timed, and so is the same U-Net
with two ResBlocks per level, whose parameter count (1.74M) matches the reference's. Training steps (forward, MSE loss,
backward, AdamW) at batch 128 on 28×28 inputs are timed in alternating rounds, so both models see the same
machine state; the ratio of the medians is printed. The reference is timed as diffusers ships it (NCHW) and
also converted to channels-last, the memory layout noisecraft's U-Net uses, to show how much of the gap
is layout.

Sampling: network evaluations per second at batch 256 and the seconds for 1000 MNIST samples with DDIM-50.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from noisecraft.denoiser import Denoiser
from noisecraft.models.unet import UNet, count_parameters
from noisecraft.samplers import generate
from noisecraft.schedule import NoiseSchedule
from noisecraft.training.config import default_model_config


def reference_unet(channels_last: bool):
    from diffusers import UNet2DModel
    model = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                        block_out_channels=(32, 64, 64),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_step_fn(model, forward, batch: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, 28, 28)

    def step():
        t = torch.randint(0, 1000, (batch,))
        loss = (forward(model, x, t) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_steps(step, n: int) -> float:
    """Seconds per step over n steps (after one untimed warm-up step)."""
    step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-sampling", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    ours = UNet(default_model_config((1, 28, 28)))
    # The same U-Net with two ResBlocks per level has the reference's parameter count (1.74M vs 1.71M).
    matched = UNet(replace(default_model_config((1, 28, 28)), num_res_blocks=2))
    contenders = {
        "noisecraft": (ours, lambda m, x, t: m(x, t.float())),
        "noisecraft 2 blocks/level": (matched, lambda m, x, t: m(x, t.float())),
        "diffusers": (reference_unet(False), lambda m, x, t: m(x, t).sample),
        "diffusers+channels_last": (reference_unet(True), lambda m, x, t: m(x, t).sample),
    }
    steps = {name: train_step_fn(model, fwd, args.batch) for name, (model, fwd) in contenders.items()}
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, args.steps))

    print(f"training step, batch {args.batch}, 28x28, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps (median; min-max in brackets)")
    base = statistics.median(times["noisecraft"])
    for name, (model, _) in contenders.items():
        med = statistics.median(times[name])
        print(f"  {name:<26}{count_parameters(model):>10,} params  {args.batch / med:7.1f} img/s "
              f"[{args.batch / max(times[name]):.1f}-{args.batch / min(times[name]):.1f}]  "
              f"noisecraft speed-up {med / base:.2f}x")

    if not args.skip_sampling:
        schedule = NoiseSchedule.create("cosine", 1000)
        den = Denoiser(ours.eval(), schedule, "eps", clip_x0=True)
        x = torch.randn(256, 1, 28, 28)
        with torch.no_grad():
            den(x, 1.0)
            t0 = time.perf_counter()
            for _ in range(5):
                den(x, 1.0)
            nfe_s = 5 * 256 / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for start in range(0, 1000, 250):
                generate(den, (250, 1, 28, 28), sampler="ddim", steps=50, seed=start)
            per_1000 = time.perf_counter() - t0
        print(f"sampling: {nfe_s:.0f} image-evaluations/s at batch 256; 1000 samples with DDIM-50 in {per_1000:.1f} s")


if __name__ == "__main__":
    main()
