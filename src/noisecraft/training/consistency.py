"""Few-step sampling by consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2), on the σ
scale of the samplers.

A consistency model f(x, σ) (denoiser.py: `ConsistencyFunction`) maps every point of a probability-flow ODE
trajectory to the trajectory's start, so one evaluation at σ_max is a sample, and more evaluations re-noise and
improve it (samplers/consistency.py). Distillation makes f self-consistent along the TEACHER's ODE: on a grid of N
σ's (EDM's ρ = 7 spacing, σ_1 = σ_min ... σ_N = σ_max), for an image x0 and a random n,

    x_{n+1} = x0 + σ_{n+1}·z,      x̂_n = one Heun step of the teacher's ODE from σ_{n+1} to σ_n      (eq. 6)
    L = d( f_θ(x_{n+1}, σ_{n+1}),  f_θ⁻(x̂_n, σ_n) ),      θ⁻ ← stopgrad(μ·θ⁻ + (1 - μ)·θ)           (eq. 7-8)

with f's boundary condition f(x, σ_min) = x anchoring the chain. θ⁻, the target network, is an EMA of the student
with rate μ. The metric d: the paper's best, LPIPS, needs a pretrained image network we cannot ship, so we offer
squared L2 (the paper's "CD (L2)") and the pseudo-Huber metric sqrt(||a - b||² + c²) - c, c = 0.00054·sqrt(dim)
(Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", §3.3), which that paper proposed in
LPIPS's place.

Unlike progressive distillation (training/distill.py) there is one student, trained once, for every step count:
`noisecraft sample OUT/consistency --steps 1|2|4`. Conditioning, networks and the students' folders work as there:
labels or captions are dropped at the run's label-dropout rate so classifier-free guidance still applies at
sampling time; the teacher must predict v, x0 or be EDM-preconditioned.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from ..denoiser import ConsistencyFunction, sigma_like
from ..errors import NoisecraftError
from ..samplers.steps import karras_sigmas
from .distill import Distiller, ode_step, optimizer_step
from .ema import EMA

METRICS = ("pseudo-huber", "l2")
STUDENT_FOLDER = "consistency"


def consistency_metric(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """d(a, b) per sample: squared L2 (mean over the pixels) or pseudo-Huber on the L2 norm, c = 0.00054·sqrt(dim)
    (Song & Dhariwal 2023, §3.3)."""
    diff = (a - b).flatten(1)
    if metric == "l2":
        return diff.pow(2).mean(1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return (diff.pow(2).sum(1) + c**2).sqrt() - c


class ConsistencyDistiller(Distiller):
    """Consistency distillation of a run into one student, written as the run folder out_dir/consistency that
    `noisecraft sample` loads like any other (its sampler: consistency, its default steps: `steps`)."""

    METHOD = "consistency"

    def __init__(self, run_dir: str | Path, dataset, out_dir: str | Path, *, steps: int = 1, teacher_steps: int = 18,
                 iterations: int = 2000, minutes: float | None = None, metric: str = "pseudo-huber",
                 target_decay: float = 0.95, **kwargs):
        """teacher_steps: N, the σ grid's size (the paper's N = 18 on CIFAR-10); steps: the student's default
        sampling steps; iterations or minutes: the whole budget (one stage); target_decay: μ of the target θ⁻."""
        if metric not in METRICS:
            raise NoisecraftError(f"unknown consistency metric {metric!r}; choose {' or '.join(METRICS)}.")
        if not 0.0 <= target_decay < 1.0:
            raise NoisecraftError(f"the target network's decay μ must be in [0, 1), got {target_decay}.")
        super().__init__(run_dir, dataset, out_dir, steps=steps, teacher_steps=teacher_steps, iterations=iterations,
                         minutes=minutes, **kwargs)
        self.metric, self.target_decay = metric, target_decay

    def check_steps(self, steps: int, teacher_steps: int) -> None:
        if teacher_steps < 2 or steps < 1:
            raise NoisecraftError(f"--teacher-steps is the consistency grid's N and must be at least 2, and --steps "
                                  f"at least 1; got {teacher_steps} and {steps}.")

    def grid(self, teacher) -> torch.Tensor:
        """N σ's from σ_max down to σ_min (EDM eq. 5), the teacher's own range."""
        return karras_sigmas(teacher.sigma_min, teacher.sigma_max, self.teacher_steps)[:-1].to(self.device)

    def consistency_loss(self, student: ConsistencyFunction, target: ConsistencyFunction, teacher,
                         grid: torch.Tensor) -> torch.Tensor:
        """Algorithm 2's loss of one batch: a random adjacent pair σ_{n+1} > σ_n of the grid per sample."""
        x0, cond = self._batch()
        i = torch.randint(0, len(grid) - 1, (x0.shape[0],), generator=self.generator)
        sigma, sigma_next = grid[i], grid[i + 1]
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        z = x0 + sigma_like(sigma, x0) * noise
        with torch.no_grad():
            z_next = ode_step(teacher, z, sigma, sigma_next, cond, heun=True)
            wanted = target(z_next, sigma_next, cond)
        return consistency_metric(student(z, sigma, cond), wanted, self.metric).mean()

    def distill(self) -> list[Path]:
        """Train the student for the whole budget; returns [its folder]."""
        teacher_net = self._load_teacher()
        student_net = copy.deepcopy(teacher_net).train().requires_grad_(True)
        target = EMA(student_net, self.target_decay)      # θ⁻, what the student is pulled towards
        ema = EMA(student_net, self.ema_decay)            # what the student samples with, as for every run
        optimizer = torch.optim.Adam(student_net.parameters(), lr=self.lr)
        teacher = self._denoiser(teacher_net, clip=True)
        student = ConsistencyFunction(self._denoiser(student_net, clip=False))
        target_f = ConsistencyFunction(self._denoiser(target.model, clip=False))
        grid = self.grid(teacher)
        started, done = self.clock(), 0
        while self._budget_left(done, started, 1, 0.0):
            loss = self.consistency_loss(student, target_f, teacher, grid)
            value = optimizer_step(loss, student_net, optimizer, f"step {done + 1}")
            target.update(student_net, done)
            ema.update(student_net, done)
            done += 1
            if done % 25 == 0 or done == 1:
                self._log(self.steps, done, value, self.clock() - started)
        folder = self._write_student(ema.model, self.steps, done, name=STUDENT_FOLDER)
        self._write_log()
        return [folder]
