"""Which timesteps t a training batch uses: uniform (DDPM Algorithm 1) or importance sampled (improved DDPM §3.3).

L_vlb = Σ_t L_t is dominated by a few early terms, so estimating it from a uniform t is very noisy. Improved DDPM
(Nichol & Dhariwal 2021, eq. 18) samples t with p_t ∝ sqrt(E[L_t²]) and weights each loss by 1/(T·p_t), which
keeps the estimate of E_t[L_t] unbiased while lowering its variance. E[L_t²] comes from the last 10 losses seen at
each t; until every t has 10, t stays uniform (weights 1). Like the paper's code, a small share of uniform
probability (0.001) is mixed in, so that no p_t reaches 0 and no weight explodes.

The history is part of the exact-resume state: `state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import torch

from ..config import TIMESTEP_SAMPLING
from ..errors import NoisecraftError


class TimestepSampler:
    """sample(n, generator) -> (t, weights); update(t, losses) after each step (importance sampling only)."""

    def __init__(self, T: int, kind: str = "uniform", history: int = 10, uniform_prob: float = 0.001):
        if kind not in TIMESTEP_SAMPLING:
            raise NoisecraftError(f"unknown timestep sampling {kind!r}; choose one of {', '.join(TIMESTEP_SAMPLING)}.")
        self.T, self.kind, self.uniform_prob = int(T), kind, float(uniform_prob)
        self.history = torch.zeros(self.T, history, dtype=torch.float64)   # the last `history` losses per t
        self.count = torch.zeros(self.T, dtype=torch.int64)                # how many of them are filled

    @property
    def warmed_up(self) -> bool:
        return bool((self.count == self.history.shape[1]).all())

    def probabilities(self) -> torch.Tensor:
        """p_t (float64, sums to 1): uniform before warm-up or for uniform sampling, else ∝ sqrt(E[L_t²])."""
        if self.kind == "uniform" or not self.warmed_up:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        rms = self.history.pow(2).mean(1).sqrt()
        if not bool(torch.isfinite(rms).all()) or float(rms.sum()) <= 0:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = rms / rms.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n timesteps (int64) and their loss weights 1/(T·p_t) (float32; all 1 while t is uniform)."""
        if self.kind == "uniform" or not self.warmed_up:
            # the same draw as DDPM's t ~ U{0..T-1}, so uniform runs keep their random stream
            return torch.randint(0, self.T, (n,), generator=generator), torch.ones(n)
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1.0 / (self.T * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record each example's (unweighted) loss at its t, oldest out first once a t has `history` of them."""
        if self.kind == "uniform":
            return
        size = self.history.shape[1]
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            filled = int(self.count[ti])
            if filled == size:
                self.history[ti, :-1] = self.history[ti, 1:].clone()
                self.history[ti, -1] = loss
            else:
                self.history[ti, filled] = loss
                self.count[ti] = filled + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        history, count = state.get("history"), state.get("count")
        if history is None or count is None or tuple(history.shape) != tuple(self.history.shape) \
                or tuple(count.shape) != tuple(self.count.shape):
            raise NoisecraftError("the saved timestep sampler state does not fit this run's T; the run directory "
                                  "is inconsistent.")
        self.history = history.to(torch.float64).clone()
        self.count = count.to(torch.int64).clone()
