"""The order in which every trainer visits the data (diffusion, VAE, CLIP, VDM).

Step k takes the k-th consecutive slice of its epoch's permutation (the last, incomplete slice is dropped); epoch e's
permutation comes from the seed seed·1000003 + e. The order is therefore a function of (seed, step) alone, which
is what makes resume exact without checkpointing any data-loader state."""

from __future__ import annotations

import torch


class EpochOrder:
    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        """The dataset indices of the batch of `step`."""
        bs = self.batch_size
        epoch, i = divmod(step, self.n // bs)
        if epoch != self._epoch:     # one permutation per epoch, made when the epoch starts
            g = torch.Generator("cpu").manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[i * bs:(i + 1) * bs]
