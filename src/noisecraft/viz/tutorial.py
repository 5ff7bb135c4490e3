"""Pictures for the guide's chapters: the σ a sampler visits per step, and one denoising step (x_t, the true and the
predicted noise, and x̂0 = x_t minus the scaled prediction). Pure pictures: tensors in, files out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import NoisecraftError
from .images import save_strip


def plot_sigmas(curves: dict[str, object], path: str | os.PathLike, title: str | None = None) -> Path:
    """σ_i against the step index i for each named σ sequence (descending, ending in 0), linear and log scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if not curves:
        raise NoisecraftError("plot_sigmas needs at least one sequence of sigmas.")
    fig = Figure(figsize=(9, 3.4), dpi=110)
    ax_lin, ax_log = fig.subplots(1, 2)
    for label, sigmas in curves.items():
        s = np.asarray(torch.as_tensor(sigmas, dtype=torch.float64).cpu())
        steps = np.arange(len(s))
        ax_lin.plot(steps, s, marker=".", markersize=3, label=label)
        ax_log.semilogy(steps[s > 0], s[s > 0], marker=".", markersize=3, label=label)
    ax_lin.set(xlabel="sampling step i", ylabel="σ_i", title="σ per step")
    ax_log.set(xlabel="sampling step i", ylabel="σ_i (log scale)", title="the same, log scale (final 0 left out)")
    for ax in (ax_lin, ax_log):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def show_noise(noise: torch.Tensor) -> torch.Tensor:
    """A noise tensor (≈ N(0, 1) per entry) as an image in [-1, 1]: divided by 3, so ±3σ spans the grey range."""
    return (noise / 3).clamp(-1, 1)


def denoise_step_figure(x0: torch.Tensor, xt: torch.Tensor, noise: torch.Tensor, eps_hat: torch.Tensor,
                        x0_hat: torch.Tensor, path: str | os.PathLike, t: int,
                        rows: list[str] | None = None) -> Path:
    """One row per image: x0, x_t, the noise ε that was added, the network's ε̂, and x̂0 = (x_t − sqrt(1−ᾱ_t) ε̂) /
    sqrt(ᾱ_t). Every argument is N×C×H×W on the image scale ([-1, 1]; the noises as drawn, shown by `show_noise`)."""
    if not (x0.shape == xt.shape == noise.shape == eps_hat.shape == x0_hat.shape):
        raise NoisecraftError("denoise_step_figure needs x0, x_t, ε, ε̂ and x̂0 of one shape.")
    cells = torch.stack([x0.clamp(-1, 1), xt.clamp(-1, 1), show_noise(noise), show_noise(eps_hat),
                         x0_hat.clamp(-1, 1)], dim=1).cpu().float()
    captions = ["x0", f"x_t, t={t}", "noise eps", "eps_hat", "x0_hat"]   # ASCII: PIL's default font
    return save_strip(cells, path, captions=captions, rows=rows)
