"""The frozen parts of a latent or text-conditional run: its VAE and its text encoder.

A run stays self-describing: `attach_components` copies the VAE run into `<run>/vae/` and saves the text encoder
into `<run>/text_encoder/` (our own CLIP weights are copied; a Hugging Face encoder is stored as a reference to
its local folder). Sampling loads them back with `load_vae_component` / `load_text_component`; training also
caches what they compute (data/encoded.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .config import LatentConfig, TextConfig
from .errors import NoisecraftError
from .io.checkpoint import atomic_write_bytes

VAE_DIR, TEXT_DIR = "vae", "text_encoder"


def attach_components(out_dir: str | Path, image_shape, vae_run: str | Path | None = None,
                      text_encoder: str | Path | None = None,
                      write: bool = True) -> tuple[LatentConfig | None, TextConfig | None]:
    """Copy the VAE and save the text encoder into the run directory; return the config sections they imply.
    write=False only computes the sections (the other processes of a distributed run: rank 0 writes)."""
    out_dir = Path(out_dir)
    latent = text = None
    if vae_run is not None:
        from .models.vae_loading import load_vae
        vae, scaling_factor, _ = load_vae(vae_run)
        with torch.no_grad():
            shape = vae.encode(torch.zeros(1, *image_shape)).mean.shape[1:]
        for name in ("config.json", "model.safetensors") if write else ():
            atomic_write_bytes(out_dir / VAE_DIR / name, (Path(vae_run) / name).read_bytes())
        latent = LatentConfig(scaling_factor=float(scaling_factor), latent_shape=tuple(int(s) for s in shape))
    if text_encoder is not None:
        from .models.text_encoders import load_text_encoder
        encoder = load_text_encoder(text_encoder)
        target = out_dir / TEXT_DIR
        if write:
            if target.exists():
                shutil.rmtree(target)
            encoder.save(target)
        text = TextConfig(max_length=int(encoder.max_length), dim=int(encoder.dim))
    return latent, text


def load_vae_component(run_dir: str | Path):
    """(VAE, scaling factor) of a latent run."""
    from .models.vae_loading import load_vae
    path = Path(run_dir) / VAE_DIR
    if not path.is_dir():
        raise NoisecraftError(f"{run_dir} is a latent run but has no {VAE_DIR}/ folder; copy the VAE run there "
                              f"(or retrain with --latent VAE_RUN).")
    vae, scaling_factor, _ = load_vae(path)
    return vae.eval().requires_grad_(False), float(scaling_factor)


def load_text_component(run_dir: str | Path):
    """The frozen text encoder of a text-conditional run."""
    from .models.text_encoders import load_text_encoder
    path = Path(run_dir) / TEXT_DIR
    if not path.is_dir():
        raise NoisecraftError(f"{run_dir} is a text-conditional run but has no {TEXT_DIR}/ folder; retrain with "
                              f"--text-encoder.")
    return load_text_encoder(path).eval().requires_grad_(False)
