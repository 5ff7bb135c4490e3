"""Training and sampling speed of noisecraft's MNIST U-Net vs diffusers' UNet2DModel, in one process.

    python benchmarks/unet_throughput.py                       # ≈ 6 minutes on 2 cores
    python benchmarks/unet_throughput.py --rounds 5 --compile --profile --save

Training: the same step for every contender — x_t = q_sample(x0, t, ε) on the cosine schedule, MSE on ε, backward,
gradient clipping at 1, AdamW, EMA update (foreach lerp) — at batch 128 on 28×28 inputs, timed in alternating
rounds so that all contenders see the same machine state; the ratio of medians is printed. The reference is the
U-Net of diffusers' MNIST tutorial (block_out_channels (32, 64, 64), attention in the two lower blocks, 1.71M
parameters) with torch's default AdamW, as a diffusers user runs it; our default U-Net (one ResBlock per level,
1.19M) and the same with two ResBlocks per level (1.74M, the reference's parameter count) run with the trainer's
options (foreach AdamW by default; fused AdamW, bf16 autocast and torch.compile as variants).

Efficiency: FLOPs of one training step (torch.utils.flop_counter: convolutions, matmuls, attention; forward and
backward) over its time, against this machine's measured fp32 matmul peak (torch.mm, 2048×2048).

Sampling: network evaluations per second at batch 256, and seconds for 1000 MNIST samples with DDPM-10
(ten evaluations) and with DDIM-50.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from noisecraft.config import default_model_config
from noisecraft.denoiser import Denoiser
from noisecraft.models.unet import UNet, count_parameters
from noisecraft.samplers import generate
from noisecraft.schedule import NoiseSchedule
from noisecraft.training.ema import EMA
from noisecraft.training.speed import SpeedOptions

SCHEDULE = NoiseSchedule.create("cosine", 1000)
RESULTS = Path(__file__).parent / "results" / "unet_throughput.json"


def reference_unet(channels_last: bool = False):
    from diffusers import UNet2DModel
    model = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                        block_out_channels=(32, 64, 64),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def ours(blocks: int) -> UNet:
    return UNet(replace(default_model_config((1, 28, 28)), num_res_blocks=blocks))


class Contender:
    """A model with its forward convention and training options; step() is one full training step."""

    def __init__(self, model, forward, batch: int, adam: str | None = "foreach", precision: str = "fp32",
                 compile: bool = False):
        self.model, self.batch = model, batch
        kernel = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False),
                  None: {}}[adam]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kernel)
        self.ema = EMA(model, 0.999)
        self.speed = SpeedOptions(precision=precision)
        net = torch.compile(model) if compile else model
        self.forward = lambda x, t: forward(net, x, t)
        self.x0 = torch.rand(batch, 1, 28, 28) * 2 - 1
        self.calls = 0

    def step(self):
        t = torch.randint(0, 1000, (self.batch,))
        noise = torch.randn_like(self.x0)
        with self.speed.autocast(torch.device("cpu")):
            pred = self.forward(SCHEDULE.q_sample(self.x0, t, noise), t)
        loss = (pred.float() - noise).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.ema.update(self.model, self.calls)
        self.calls += 1


def time_steps(step, n: int) -> float:
    """Seconds per step over n steps (after one untimed warm-up step)."""
    step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def step_flops(contender: Contender) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        contender.step()
    return float(counter.get_total_flops())


def matmul_peak(dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of one large matrix product, the best of `repeats` (the machine's practical dense peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def profile_phases(contender: Contender, steps: int = 2) -> dict:
    """Share of a training step's time per op family (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile
    contender.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            contender.step()
    families = {"convolution": ("convolution", "conv"), "group norm": ("group_norm",),
                "attention": ("attention", "_scaled_dot"), "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
                "optimizer + EMA": ("_foreach", "lerp", "addcmul", "addcdiv", "sqrt")}
    totals = {name: 0.0 for name in families}
    totals["elementwise and other"] = 0.0
    for event in prof.key_averages():
        family = next((name for name, keys in families.items() if any(k in event.key for k in keys)),
                      "elementwise and other")
        totals[family] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {name: round(100 * v / whole, 1) for name, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def sampling(model: UNet, batch: int = 256) -> dict:
    den = Denoiser(model.eval(), SCHEDULE, "eps", clip_x0=True)
    x = torch.randn(batch, 1, 28, 28)
    out = {}
    with torch.no_grad():
        den(x, 1.0)
        t0 = time.perf_counter()
        for _ in range(5):
            den(x, 1.0)
        out["image_evaluations_per_s"] = 5 * batch / (time.perf_counter() - t0)
        for name, sampler, steps in (("ddpm10", "ddpm", 10), ("ddim50", "ddim", 50)):
            t0 = time.perf_counter()
            for start in range(0, 1000, 250):
                generate(den, (250, 1, 28, 28), sampler=sampler, steps=steps, seed=start)
            out[f"s_per_1000_{name}"] = time.perf_counter() - t0
    return out


def trainer_breakdown(steps: int = 10) -> dict:
    """The real Trainer on MNIST (or the bundled digits when MNIST is not on disk) with the default settings:
    one step's time, and how much of it the data path (indices, gather, t, noise) and the EMA update take."""
    import tempfile

    from noisecraft.config import make_run_config
    from noisecraft.data.datasets import load_dataset
    from noisecraft.errors import NoisecraftError
    from noisecraft.training.trainer import Trainer
    try:
        data = load_dataset("mnist", download=False)
    except NoisecraftError:
        data = load_dataset("digits", image_size=28)
    config = make_run_config(data, False, {}, {}, dict(steps=steps + 1, sample_every=0, checkpoint_every=0))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, data, tmp, progress=False)
        trainer.train_step()
        step = time_steps(trainer.train_step, steps)
        g = torch.Generator().manual_seed(0)
        b = config.train.batch_size

        def data_path():
            x0, _ = trainer.batches.batch(trainer.batch_indices(trainer.step), g, 0.1)
            trainer.timestep_sampler.sample(b, g)
            torch.randn(x0.shape, generator=g)
        data_s = time_steps(data_path, steps)
        ema_s = time_steps(lambda: trainer.ema.update(trainer.model, 100), steps)
    return {"dataset": data.name, "batch": b, "step_s": step, "images_per_s": b / step,
            "data_path_s": data_s, "ema_s": ema_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (compiles for minutes)")
    p.add_argument("--profile", action="store_true", help="op-family breakdown of our parameter-matched step")
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--only-trainer", action="store_true", help="only the Trainer's step breakdown")
    p.add_argument("--save", action="store_true", help=f"write {RESULTS}")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    breakdown = trainer_breakdown()
    print(f"Trainer ({breakdown['dataset']}, defaults, batch {breakdown['batch']}): {breakdown['step_s'] * 1000:.0f} ms "
          f"per step ({breakdown['images_per_s']:.0f} images/s); data path {breakdown['data_path_s'] * 1000:.2f} ms "
          f"({100 * breakdown['data_path_s'] / breakdown['step_s']:.2f}%), EMA update {breakdown['ema_s'] * 1000:.2f} ms "
          f"({100 * breakdown['ema_s'] / breakdown['step_s']:.2f}%)")
    if args.only_trainer:
        return
    b = args.batch
    call_ours = lambda m, x, t: m(x, t.float())                          # noqa: E731
    call_ref = lambda m, x, t: m(x, t).sample                            # noqa: E731
    contenders = {
        "noisecraft default (1 block/level)": Contender(ours(1), call_ours, b),
        "noisecraft 2 blocks/level": Contender(ours(2), call_ours, b),
        "noisecraft 2 blocks/level, per-tensor AdamW": Contender(ours(2), call_ours, b, adam="loop"),
        "noisecraft 2 blocks/level, fused AdamW": Contender(ours(2), call_ours, b, adam="fused"),
        "noisecraft 2 blocks/level, bf16 autocast": Contender(ours(2), call_ours, b, precision="bf16"),
        "diffusers UNet2DModel": Contender(reference_unet(), call_ref, b, adam=None),
        "diffusers, channels-last + foreach AdamW": Contender(reference_unet(True), call_ref, b, adam="foreach"),
    }
    if args.compile:
        contenders["noisecraft 2 blocks/level, torch.compile"] = Contender(ours(2), call_ours, b, compile=True)
        t0 = time.perf_counter()
        contenders["noisecraft 2 blocks/level, torch.compile"].step()
        print(f"torch.compile: first step (compiling) {time.perf_counter() - t0:.0f} s")
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, c in contenders.items():
            times[name].append(time_steps(c.step, args.steps))

    reference = "diffusers UNet2DModel"
    print(f"training step (q_sample, MSE, backward, clip, AdamW, EMA), batch {b}, 28x28, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps (median [min-max])")
    rows = {}
    for name, c in contenders.items():
        med = statistics.median(times[name])
        rows[name] = {"parameters": count_parameters(c.model), "images_per_s": b / med,
                      "images_per_s_range": [b / max(times[name]), b / min(times[name])],
                      "speedup_vs_diffusers": statistics.median(times[reference]) / med}
        print(f"  {name:<45}{rows[name]['parameters']:>10,} params {b / med:7.1f} img/s "
              f"[{b / max(times[name]):.1f}-{b / min(times[name]):.1f}]  x{rows[name]['speedup_vs_diffusers']:.2f} "
              f"vs diffusers")

    matched = contenders["noisecraft 2 blocks/level"]
    flops = step_flops(matched)
    peak = matmul_peak()
    peak_bf16 = matmul_peak(torch.bfloat16, n=1024, repeats=2)   # small: bf16 may be very slow here
    achieved = flops / statistics.median(times["noisecraft 2 blocks/level"]) / 1e9
    efficiency = {"gflop_per_step": flops / 1e9, "gflop_per_image": flops / b / 1e9, "achieved_gflop_s": achieved,
                  "matmul_peak_fp32_gflop_s": peak, "matmul_peak_bf16_gflop_s": peak_bf16,
                  "share_of_peak": achieved / peak}
    print(f"efficiency: {flops / 1e9:.1f} GFLOP per step ({flops / b / 1e9:.2f} per image, forward + backward), "
          f"{achieved:.0f} GFLOP/s achieved vs a measured fp32 matmul peak of {peak:.0f} GFLOP/s "
          f"({100 * achieved / peak:.0f}%); bf16 matmul peak {peak_bf16:.0f} GFLOP/s")

    result = {"threads": torch.get_num_threads(), "batch": b, "rounds": args.rounds, "steps": args.steps,
              "training": rows, "efficiency": efficiency, "trainer": breakdown}
    if args.profile:
        result["profile_percent"] = profile_phases(matched)
        print("profile of the parameter-matched step (% of self CPU time):",
              ", ".join(f"{k} {v}" for k, v in result["profile_percent"].items()))
    if not args.skip_sampling:
        result["sampling"] = sampling(contenders["noisecraft default (1 block/level)"].model)
        s = result["sampling"]
        print(f"sampling (default U-Net): {s['image_evaluations_per_s']:.0f} image-evaluations/s at batch 256; "
              f"1000 samples: {s['s_per_1000_ddpm10']:.1f} s with DDPM-10, "
              f"{s['s_per_1000_ddim50']:.1f} s with DDIM-50")
    if args.save:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
