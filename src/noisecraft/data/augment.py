"""Training-time augmentation, drawn from the trainer's generator so that resume stays exact and every process of a
torchrun job draws the same numbers."""

from __future__ import annotations

import torch


def random_hflip(x0: torch.Tensor, generator: torch.Generator, n: int, shard: slice) -> torch.Tensor:
    """Mirror each image left-right with probability ½ (DDPM's CIFAR-10 recipe, Ho et al. 2020, Appendix B).

    x0 is this process's `shard` of a global batch of n: the n coin flips are drawn for the whole batch, as every
    other random number of a step is, and each process keeps its slice."""
    flip = (torch.rand(n, generator=generator) < 0.5)[shard].to(x0.device)
    return torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
