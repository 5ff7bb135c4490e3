"""What the trainer feeds the U-Net: clean inputs x0 (pixels, or VAE latents) and their condition (none, class
labels, or text embeddings), with the condition dropped at random for classifier-free guidance.

Latent diffusion (Rombach et al. 2022, eq. 2) trains on z = s·E(x): the VAE encoder runs once over the whole
dataset, and its posterior N(μ, σ²) per image is cached, so that every step draws a fresh z = μ + σ·ε for the
price of one multiply-add. Text works the same way: the frozen text encoder runs once over the dataset's
distinct captions, and a step only gathers rows of that table.

Sharding (distributed training, gradient accumulation): `batch(indices, generator, drop, shard)` draws the random
numbers of the WHOLE batch — so the generator advances the same way in every process — but gathers data only for
`indices[shard]`. A batch split over processes is then the same batch as in one process.
"""

from __future__ import annotations

import torch

from .datasets import ImageDataset


class PixelImages:
    """x0 = the images themselves, in [-1, 1]."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __call__(self, indices: torch.Tensor, generator: torch.Generator, shard: slice) -> torch.Tensor:
        return self.dataset.batch(indices[shard])[0]


class LatentImages:
    """x0 = z = s·(μ + σ·ε): a fresh sample of each image's cached VAE posterior, times the scaling factor s
    that gives the latents unit variance (the diffusion schedule assumes data of about that scale)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float):
        self.mean, self.std, self.scaling_factor = mean, std, float(scaling_factor)

    def __call__(self, indices: torch.Tensor, generator: torch.Generator, shard: slice) -> torch.Tensor:
        eps = torch.randn((len(indices), *self.mean.shape[1:]), generator=generator)[shard]
        mine = indices[shard]
        return (self.mean[mine] + self.std[mine] * eps) * self.scaling_factor


class ClassLabels:
    """cond = the class label, replaced by the null label `num_classes` with probability p."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.labels, self.null = labels, num_classes

    def __call__(self, indices: torch.Tensor, generator: torch.Generator, drop: float, shard: slice) -> torch.Tensor:
        labels = self.labels[indices[shard]]
        dropped = (torch.rand(len(indices), generator=generator) < drop)[shard]
        return torch.where(dropped, torch.full_like(labels, self.null), labels)


class TextContexts:
    """cond = the text encoder's token embeddings (L×D) of one of the example's captions, drawn uniformly; with
    probability p the empty prompt's embeddings instead (caption dropout, so the model also learns p(x))."""

    def __init__(self, contexts: torch.Tensor, captions, empty_index: int):
        self.contexts, self.captions, self.empty = contexts, captions, empty_index

    def __call__(self, indices: torch.Tensor, generator: torch.Generator, drop: float, shard: slice) -> torch.Tensor:
        chosen = self.captions.sample(indices, generator)
        dropped = torch.rand(len(indices), generator=generator) < drop
        chosen = torch.where(dropped, torch.full_like(chosen, self.empty), chosen)
        return self.contexts[chosen[shard]]


class TrainingBatches:
    """One training batch: batch(indices, generator, drop) -> (x0, cond). Random draws (latent noise, caption
    choice, dropout) come only from `generator`, so a checkpointed generator state makes resume exact."""

    def __init__(self, images, condition=None):
        self.images, self.condition = images, condition

    def batch(self, indices: torch.Tensor, generator: torch.Generator, drop: float, shard: slice = slice(None)):
        x0 = self.images(indices, generator, shard)
        cond = None if self.condition is None else self.condition(indices, generator, drop, shard)
        return x0, cond
