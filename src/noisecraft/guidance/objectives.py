"""Example losses for loss guidance (`noisecraft sample RUN --guide noisecraft.guidance.objectives:brightness`).

A guide is any function loss(x0) -> one value per sample, where x0 is the model's predicted clean image
(N×C×H×W in [-1, 1]) and lower is better; sampling is pushed down its gradient (see `LossGuidance`).
These sum over pixels, so `--guide-scale` is a step size in pixel units: 0.01–0.1 is gentle, 1 is strong.
Write your own in a file and pass `--guide path/to/file.py:function`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import NoisecraftError

__all__ = ["blue_loss", "brightness", "less_blue", "match_reference"]


def brightness(x0: torch.Tensor) -> torch.Tensor:
    """-Σ pixels / C: lower when the image is brighter ("make it brighter")."""
    return -x0.flatten(1).sum(1) / x0.shape[1]


def less_blue(x0: torch.Tensor) -> torch.Tensor:
    """Σ of the blue channel: lower when the image is less blue. Needs RGB images."""
    if x0.ndim != 4 or x0.shape[1] != 3:
        raise NoisecraftError(f"the less_blue guide needs RGB images (N×3×H×W), got shape {tuple(x0.shape)}; "
                              "use it with a colour model, or try noisecraft.guidance.objectives:brightness.")
    return x0[:, 2].flatten(1).sum(1)


def blue_loss(x0: torch.Tensor) -> torch.Tensor:
    """The tutorials' loss, literally: |blue - 0.9| averaged over the pixels of each image, with the image mapped to
    [0, 1] as they decode it (x/2 + 0.5). Lower when the picture is bluer. Use it with guide mode "latents" and a
    scale around 75 to follow the recipe (guidance/loss.py: LatentSteering). Needs RGB images."""
    if x0.ndim != 4 or x0.shape[1] != 3:
        raise NoisecraftError(f"the blue_loss guide needs RGB images (N×3×H×W), got shape {tuple(x0.shape)}.")
    return (x0[:, 2] / 2 + 0.5 - 0.9).abs().flatten(1).mean(1)


def match_reference(reference: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A guide ½·Σ (x0 - reference)²: lower when the sample looks like `reference` (C×H×W or N×C×H×W,
    in [-1, 1]). In Python: `pipe.sample(8, guide=match_reference(img), guide_scale=0.1)`."""
    reference = torch.as_tensor(reference, dtype=torch.float32)

    def loss(x0: torch.Tensor) -> torch.Tensor:
        ref = reference.to(x0.device, x0.dtype)
        if ref.shape[-3:] != x0.shape[-3:]:
            raise NoisecraftError(f"the reference image has shape {tuple(ref.shape[-3:])} but samples have "
                                  f"{tuple(x0.shape[-3:])}; resize the reference to the model's image size.")
        return 0.5 * (x0 - ref).pow(2).flatten(1).sum(1)

    return loss
