"""Plots for understanding a run: noise schedules side by side, and the training loss curve.

Figures are drawn with matplotlib's object API on the Agg (PNG) canvas: no window opens, nothing needs a
display, and pyplot's global state (and the backend a notebook user has chosen) is left untouched.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..errors import NoisecraftError
from ..io.checkpoint import atomic_write


def _numpy(values) -> np.ndarray:
    """A 1-D float64 numpy copy of a tensor, array or list."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a figure as a PNG, atomically, creating parent directories."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_schedules(schedules: dict[str, object], path) -> Path:
    """Compare noise schedules in a 2 x 2 figure: β_t, ᾱ_t, σ_t and SNR_t = ᾱ_t / (1 - ᾱ_t) against t.

    Each value needs 1-D tensors `.betas`, `.alphas_cumprod`, `.sigmas` and `.log_snr` of length T
    (a `NoiseSchedule` has them); the dict key is its label. σ_t and SNR span many orders of
    magnitude, so those panels use a log y axis. Returns the PNG path written.
    """
    if not schedules:
        raise NoisecraftError("plot_schedules got no schedules; pass a dict such as {'linear': schedule}.")
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [  # (axes, title, how to get the curve, log y axis?)
        (axes[0, 0], "β_t", lambda s: _numpy(s.betas), False),
        (axes[0, 1], "ᾱ_t (signal kept)", lambda s: _numpy(s.alphas_cumprod), False),
        (axes[1, 0], "σ_t = √((1 − ᾱ_t) / ᾱ_t)", lambda s: _numpy(s.sigmas), True),
        (axes[1, 1], "SNR_t = exp(log-SNR)", lambda s: np.exp(_numpy(s.log_snr)), True),
    ]
    for ax, title, curve, log_y in panels:
        for name, schedule in schedules.items():
            y = curve(schedule)
            ax.plot(np.arange(len(y)), y, label=name)
        ax.set_title(title)
        ax.set_xlabel("t")
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save_figure(fig, path)


def _read_loss_log(csv_path) -> tuple[np.ndarray, np.ndarray]:
    """Steps and losses from the trainer's CSV log (header step,loss,lr,images_per_s,elapsed_s).

    Rows with a non-finite loss (NaN/inf) are skipped: they cannot be drawn and would poison the average.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise NoisecraftError(f"Loss log {str(csv_path)!r} does not exist; pass the log.csv of a training run.")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"step", "loss"} <= set(reader.fieldnames or []):
            raise NoisecraftError(
                f"{str(csv_path)!r} has no 'step' and 'loss' columns; pass the CSV log written by the trainer."
            )
        try:
            pairs = [(float(row["step"]), float(row["loss"])) for row in reader]
        except (TypeError, ValueError) as e:
            raise NoisecraftError(
                f"{str(csv_path)!r} has a malformed row ({e}); delete that line or the file and log again."
            ) from None
    pairs = [(s, l) for s, l in pairs if math.isfinite(l)]
    if not pairs:
        raise NoisecraftError(f"{str(csv_path)!r} holds no finite loss values yet; train for a few steps first.")
    steps, losses = np.array(pairs).T
    return steps, losses


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start), same length as `values`."""
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def plot_loss_curve(csv_path, path) -> Path:
    """Plot the training loss against step: raw values faintly, a moving average on top.

    The averaging window is about 5 % of the logged points (1 to 200). The y axis is logarithmic when all
    losses are positive, since diffusion losses fall by orders of magnitude. Returns the PNG path written.
    """
    steps, losses = _read_loss_log(csv_path)
    window = int(min(200, max(1, round(0.05 * len(losses)))))
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=2, label=f"mean of last {window}")
    if np.all(losses > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)
