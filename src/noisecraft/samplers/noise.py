"""Where a sampler's random numbers come from.

Reproducibility rule: the same seed gives the same picture whatever the batch size. `SeededNoise`
keeps one generator per sample (seed, seed+1, ...), so sample i always draws the same numbers, no matter
which batch it is in or how many samples are drawn beside it.
"""

from __future__ import annotations

import torch


class SeededNoise:
    """Standard normal noise drawn sample by sample, from generator seed + index (one per sample)."""

    def __init__(self, seeds: list[int] | range, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def __len__(self):
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        """One draw of `shape` (first dim = number of samples). Drawn on the CPU so devices agree."""
        if shape[0] != len(self.generators):
            raise ValueError(f"SeededNoise holds {len(self.generators)} generators, asked for {shape[0]} samples")
        draws = [torch.randn(shape[1:], generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(draws).to(self.device)


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Noise shaped like x from a SeededNoise, a torch.Generator, or the global RNG (None)."""
    if isinstance(generator, SeededNoise):
        return generator.randn(tuple(x.shape), x.dtype).to(x.device)
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def prior_noise(shape, sigma_max: float, generator=None, device="cpu", z: torch.Tensor | None = None) -> torch.Tensor:
    """x_T ~ N(0, I) on the DDPM (VP) scale, i.e. sqrt(1 + σ_max²)·z on the σ scale (x = x_T / c_in). z: the
    standard normal draw (shape `shape`) to use, else one drawn from `generator` (see `randn_like`)."""
    if z is None:
        z = randn_like(torch.empty(shape, device=device), generator)
    return z * (1.0 + sigma_max**2) ** 0.5
