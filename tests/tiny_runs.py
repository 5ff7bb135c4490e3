"""Tiny trained components shared by the tests: a VAE and a CLIP text encoder on the bundled 16×16 digits,
trained for a few steps through the command line (what a user would run), in seconds."""

from __future__ import annotations

from pathlib import Path

from noisecraft.cli import main


def train_tiny_vae_and_clip(root: Path, steps: int = 3, batch_size: int = 32) -> tuple[Path, Path]:
    """(VAE run, CLIP run) under root."""
    assert main(["train-vae", "--dataset", "digits", "--out", str(root / "vae"), "--steps", str(steps),
                 "--channels", "8,16", "--norm-groups", "4", "--batch-size", str(batch_size)]) == 0
    assert main(["train-clip", "--dataset", "digits", "--out", str(root / "clip"), "--steps", str(steps),
                 "--width", "32", "--layers", "1", "--heads", "2", "--max-length", "12", "--embed-dim", "16",
                 "--batch-size", str(batch_size)]) == 0
    return root / "vae", root / "clip"
