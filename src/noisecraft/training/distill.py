"""Few-step sampling by progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2), on the σ scale of the samplers.

A student starts as a copy of its teacher and learns to take in ONE deterministic step what the teacher takes in
TWO. For a student step from σ to σ'' (its grid, spacing "nested", is every other σ of the teacher's, so σ' lies
between them), the teacher goes z -> z' -> z'' along the probability-flow ODE, and the student is regressed onto
the x̂0 that makes one Euler (= DDIM) step land on z'':

    z'' = x̃ + (σ''/σ)·(z - x̃)      =>      x̃ = (z'' - (σ''/σ)·z) / (1 - σ''/σ)      (x̃ = z'' when σ'' = 0)

with the loss ||D_student(z, σ) - x̃||² / c_out(σ)², i.e. the network's own error ||F - F*||² at unit weight (for an
EDM network that is EDM's λ(σ) weighting). Then the student becomes the teacher and the steps halve again:
16 -> 8 -> 4 -> 2 -> 1. The first teacher is the trained run itself, stepping with Heun (EDM Algorithm 1), the best
deterministic sampler we have; later teachers step with Euler, the step they were trained to take.

Why progressive distillation is `noisecraft distill`'s default and consistency distillation (training/consistency.py,
Song et al. 2023) the option: on the MNIST v-run, each given 20 CPU-minutes on one thread (README), progressive 8->4->2->1
students scored 3.15 / 4.28 / 5.71 at 4 / 2 / 1 steps and the best consistency student 4.44 / 5.32 / 5.50. Progressive
wins at 2 and 4 steps; at 1 step the two are level. A consistency student is one network for every step count.

Conditioning: class and text runs are distilled with the dataset's labels or captions, dropped at the run's
label-dropout rate, so each student learns the conditional and the unconditional model; classifier-free guidance
is then applied at sampling time as before (it doubles the cost of a step). Guidance is not distilled in.

Networks: any run whose x̂0 stays stable at high noise: EDM-preconditioned, v or x0 prediction. An eps-prediction
network's x̂0 = x - σ·ε̂ amplifies its error by σ_max at the first step, which one-step students cannot undo.
"""

from __future__ import annotations

import copy
import csv
import math
import shutil
import time
from pathlib import Path

import torch

from ..config import DistillationConfig, RunConfig, load_run_config
from ..data.encoded import build_batches
from ..denoiser import Denoiser, batch_sigma, sigma_like
from ..errors import NoisecraftError
from ..io.checkpoint import load_weights, save_json, save_weights
from ..models.unet import UNet
from ..samplers.steps import nested_sigmas
from .ema import EMA

DISTILLABLE = ("edm", "v", "x0")
COMPONENT_DIRS = ("vae", "text_encoder")   # a latent or text run's frozen parts, copied to every student


def ode_step(denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cond=None,
             heun: bool = False) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dσ = (x - D(x, σ))/σ from σ to σ_next, one σ per sample: Euler
    (EDM Algorithm 1, lines 4-5) and, with heun, the trapezoid correction wherever σ_next > 0 (lines 6-8). The
    samplers take one σ for the whole batch; distillation needs a different step for every sample."""
    s, s_next = sigma_like(sigma, x), sigma_like(sigma_next, x)
    slope = (x - denoiser(x, sigma, cond)) / s
    x_next = x + (s_next - s) * slope
    if not heun:
        return x_next
    alive = sigma_next > 0
    if not bool(alive.any()):
        return x_next
    safe = torch.where(alive, sigma_next, torch.ones_like(sigma_next))   # no division by σ_next = 0
    slope_next = (x_next - denoiser(x_next, safe, cond)) / sigma_like(safe, x)
    corrected = x + (s_next - s) * (slope + slope_next) / 2
    return torch.where(sigma_like(alive.to(x.dtype), x) > 0, corrected, x_next)


def distillation_target(z: torch.Tensor, z_next: torch.Tensor, sigma: torch.Tensor,
                        sigma_next: torch.Tensor) -> torch.Tensor:
    """x̃ with z_next = x̃ + (σ_next/σ)·(z - x̃): the x̂0 whose single Euler step from σ lands on the teacher's
    z_next (Salimans & Ho 2022, Algorithm 2, written on the σ scale)."""
    ratio = sigma_like(sigma_next / sigma, z)
    return (z_next - ratio * z) / (1 - ratio)


def optimizer_step(loss: torch.Tensor, net: UNet, optimizer: torch.optim.Optimizer, where: str) -> float:
    """One clipped optimizer step on a distillation loss; returns the loss, refusing a non-finite one."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NoisecraftError(f"the distillation loss became {value} at {where}; retry with a lower --lr.")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    return value


class Distiller:
    """Progressive distillation of a run into students of teacher_steps/2, /4, ... down to `steps` steps, each
    written as a run folder out_dir/steps-N that `noisecraft sample` loads like any other."""

    METHOD = "progressive"     # what a student's config.json records as its distillation method

    def __init__(self, run_dir: str | Path, dataset, out_dir: str | Path, *, steps: int = 1, teacher_steps: int = 16,
                 iterations: int = 1000, minutes: float | None = None, batch_size: int | None = None,
                 lr: float = 1e-4, ema_decay: float = 0.995, seed: int = 0, device: str = "cpu", progress=None,
                 clock=time.perf_counter):
        """minutes: a budget for all stages instead of `iterations` per stage, measured by `clock` (wall time by
        default; benchmarks pass time.process_time to budget CPU time)."""
        self.run_dir, self.out_dir = Path(run_dir), Path(out_dir)
        self.config: RunConfig = load_run_config(self.run_dir)
        d = self.config.diffusion
        if d.prediction not in DISTILLABLE:
            raise NoisecraftError(f"{run_dir} predicts {d.prediction}, whose x̂0 = x - σ·ε̂ blows up at the first step "
                                  f"of a few-step student; distil a run trained with --preconditioning edm or "
                                  f"--prediction v.")
        if self.config.distillation is not None:
            raise NoisecraftError(f"{run_dir} is already a distilled student; distil its teacher "
                                  f"({self.config.distillation.teacher}) with fewer --steps instead.")
        self.check_steps(steps, teacher_steps)
        self.steps, self.teacher_steps = steps, teacher_steps
        self.iterations, self.minutes = iterations, minutes
        self.batch_size = batch_size or self.config.train.batch_size
        self.lr, self.ema_decay, self.seed = lr, ema_decay, seed
        self.device = torch.device(device)
        self.progress, self.clock = progress, clock
        self.schedule = d.make_schedule()
        self.dataset = dataset
        self.batches = build_batches(self.config, dataset, self.run_dir)   # the teacher's caches (latents, text)
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.log_rows: list[dict] = []

    def check_steps(self, steps: int, teacher_steps: int) -> None:
        if teacher_steps < 2 or teacher_steps & (teacher_steps - 1) or not 1 <= steps < teacher_steps \
                or steps & (steps - 1):
            raise NoisecraftError(f"--teacher-steps ({teacher_steps}) and --steps ({steps}) must be powers of two "
                                  f"with steps < teacher_steps: each stage halves the steps.")

    # --- the pieces of one stage ----------------------------------------------------------------

    def _denoiser(self, net: UNet, clip: bool) -> Denoiser:
        d = self.config.diffusion
        return Denoiser(net, self.schedule, d.prediction, clip_x0=clip and d.clip_x0 and self.config.latent is None,
                        sigma_data=d.sigma_data, sigma_max_cap=d.sampling_sigma_max)

    def _load_teacher(self) -> UNet:
        model = UNet(self.config.model)
        model.load_state_dict(load_weights(self.run_dir / "model.safetensors"))
        return model.to(self.device).eval().requires_grad_(False)

    def _batch(self):
        n = min(self.batch_size, len(self.dataset))
        indices = torch.randint(0, len(self.dataset), (n,), generator=self.generator)
        x0, cond = self.batches.batch(indices, self.generator, self.config.train.label_dropout)
        return x0.to(self.device), None if cond is None else cond.to(self.device)

    def stage_loss(self, student: Denoiser, teacher: Denoiser, grid: torch.Tensor, heun: bool) -> torch.Tensor:
        """The loss of one batch: a random student step i per sample, from σ = grid[2i] to σ'' = grid[2i + 2] of
        the teacher's grid, the teacher's two steps, and the student's error against x̃ on its own output scale."""
        x0, cond = self._batch()
        n = x0.shape[0]
        i = torch.randint(0, (len(grid) - 1) // 2, (n,), generator=self.generator)
        sigma, mid, sigma_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        z = x0 + sigma_like(sigma, x0) * torch.randn(x0.shape, generator=self.generator).to(self.device)
        with torch.no_grad():
            z_mid = ode_step(teacher, z, sigma, mid, cond, heun)
            z_next = ode_step(teacher, z_mid, mid, sigma_next, cond, heun)
            target = distillation_target(z, z_next, sigma, sigma_next)
        x0_hat = student(z, sigma, cond)
        c_out = student.parameterisation.c_out(batch_sigma(sigma, z)).abs()
        return ((x0_hat - target) / sigma_like(c_out, z)).pow(2).flatten(1).mean(1).mean()

    def _budget_left(self, done: int, started: float, stages_left: int, spent: float) -> bool:
        if self.minutes is not None:   # split what is left of the wall-clock budget over the stages to go
            return self.clock() - started < (self.minutes * 60 - spent) / stages_left
        return done < self.iterations

    def distill(self) -> list[Path]:
        """Run every stage; returns the student folders written, largest step count first."""
        teacher_net = self._load_teacher()
        written, spent = [], 0.0
        steps = self.teacher_steps
        stages = int(math.log2(self.teacher_steps // self.steps))
        for stage in range(stages):
            heun = stage == 0
            student_net = copy.deepcopy(teacher_net).train().requires_grad_(True)
            ema = EMA(student_net, self.ema_decay)
            optimizer = torch.optim.Adam(student_net.parameters(), lr=self.lr)
            teacher, student = self._denoiser(teacher_net, clip=True), self._denoiser(student_net, clip=False)
            # the σ's the student will be sampled on: `noisecraft sample` builds the same nested grid
            grid = nested_sigmas(teacher.sigma_min, teacher.sigma_max, steps).to(self.device)
            steps //= 2
            started, done = self.clock(), 0
            while self._budget_left(done, started, stages - stage, spent):
                loss = self.stage_loss(student, teacher, grid, heun)
                value = optimizer_step(loss, student_net, optimizer, f"stage {stage + 1}, step {done + 1}")
                ema.update(student_net, done)
                done += 1
                if done % 25 == 0 or done == 1:
                    self._log(steps, done, value, self.clock() - started + spent)
            spent += self.clock() - started
            teacher_net = ema.model.requires_grad_(False).eval()
            written.append(self._write_student(teacher_net, steps, done))
        self._write_log()
        return written

    # --- output ----------------------------------------------------------------------------------

    def _log(self, steps: int, iteration: int, loss: float, seconds: float) -> None:
        self.log_rows.append({"student_steps": steps, "iteration": iteration, "loss": f"{loss:.6f}",
                              "elapsed_s": f"{seconds:.1f}"})
        if self.progress is not None:
            self.progress(steps, iteration, loss, seconds)

    def _write_log(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "distill.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["student_steps", "iteration", "loss", "elapsed_s"])
            writer.writeheader()
            writer.writerows(self.log_rows)

    def _write_student(self, net: UNet, steps: int, iterations: int, name: str | None = None) -> Path:
        folder = self.out_dir / (name or f"steps-{steps}")
        folder.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.distillation = DistillationConfig(steps=steps, teacher=str(self.run_dir), method=self.METHOD,
                                                 teacher_steps=self.teacher_steps, iterations=iterations)
        for name in COMPONENT_DIRS:
            if (self.run_dir / name).is_dir() and not (folder / name).exists():
                shutil.copytree(self.run_dir / name, folder / name)
        save_weights(net.state_dict(), folder / "model.safetensors",
                     metadata={"weights": "ema", "distilled_steps": str(steps)})
        save_json(config.to_dict(), folder / "config.json")
        return folder
