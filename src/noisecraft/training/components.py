"""The frozen parts of a latent or text-conditional run: its VAE and its text encoder.

A run stays self-describing: `attach_components` copies the VAE run into `<run>/vae/` and saves the text encoder
into `<run>/text_encoder/` (our own CLIP weights are copied; a Hugging Face encoder is stored as a reference to
its local folder). Training then caches, in `<run>/cache/`, the VAE posterior of every training image and the
text embeddings of every distinct caption, so those networks run once per run, not once per step.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from ..errors import NoisecraftError
from ..io.checkpoint import atomic_write_bytes, load_weights, save_weights
from .batches import ClassLabels, LatentImages, PixelImages, TextContexts, TrainingBatches
from .config import LatentConfig, RunConfig, TextConfig

VAE_DIR, TEXT_DIR, CACHE_DIR = "vae", "text_encoder", "cache"


def attach_components(out_dir: str | Path, image_shape, vae_run: str | Path | None = None,
                      text_encoder: str | Path | None = None,
                      write: bool = True) -> tuple[LatentConfig | None, TextConfig | None]:
    """Copy the VAE and save the text encoder into the run directory; return the config sections they imply.
    write=False only computes the sections (the other processes of a distributed run: rank 0 writes)."""
    out_dir = Path(out_dir)
    latent = text = None
    if vae_run is not None:
        from .vae_trainer import load_vae
        vae, scaling_factor, _ = load_vae(vae_run)
        with torch.no_grad():
            shape = vae.encode(torch.zeros(1, *image_shape)).mean.shape[1:]
        for name in ("config.json", "model.safetensors") if write else ():
            atomic_write_bytes(out_dir / VAE_DIR / name, (Path(vae_run) / name).read_bytes())
        latent = LatentConfig(scaling_factor=float(scaling_factor), latent_shape=tuple(int(s) for s in shape))
    if text_encoder is not None:
        from ..models.text_encoders import load_text_encoder
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
    from .vae_trainer import load_vae
    path = Path(run_dir) / VAE_DIR
    if not path.is_dir():
        raise NoisecraftError(f"{run_dir} is a latent run but has no {VAE_DIR}/ folder; copy the VAE run there "
                              f"(or retrain with --latent VAE_RUN).")
    vae, scaling_factor, _ = load_vae(path)
    return vae.eval().requires_grad_(False), float(scaling_factor)


def load_text_component(run_dir: str | Path):
    """The frozen text encoder of a text-conditional run."""
    from ..models.text_encoders import load_text_encoder
    path = Path(run_dir) / TEXT_DIR
    if not path.is_dir():
        raise NoisecraftError(f"{run_dir} is a text-conditional run but has no {TEXT_DIR}/ folder; retrain with "
                              f"--text-encoder.")
    return load_text_encoder(path).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(encoder, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Token embeddings (N×L×D) of prompts through a frozen text encoder, in batches."""
    parts = [encoder(prompts[i:i + batch_size])[0].float() for i in range(0, len(prompts), batch_size)]
    return torch.cat(parts)


def _folder_digest(folder: Path) -> str:
    """SHA-256 over a folder's files (names and contents): a cache made with other weights is not reused."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _cached(path: Path, fingerprint: dict, compute) -> dict[str, torch.Tensor]:
    """Tensors from `path` if it was written for the same fingerprint, else compute() and write them."""
    if path.exists():
        try:
            stored = load_weights(path)
            meta = json.loads(bytes(stored.pop("__fingerprint__").tolist()).decode())
            if meta == fingerprint:
                return stored
        except (NoisecraftError, KeyError, ValueError):
            pass  # an unreadable or stale cache is recomputed, never trusted
    tensors = compute()
    blob = torch.tensor(list(json.dumps(fingerprint, sort_keys=True).encode()), dtype=torch.uint8)
    save_weights({**tensors, "__fingerprint__": blob}, path)
    return tensors


def latent_text_batches(config: RunConfig, dataset, run_dir: str | Path) -> TrainingBatches:
    """Training batches of a latent and/or text-conditional run, from (or into) the run's cache."""
    run_dir = Path(run_dir)
    if config.latent is not None:
        from .vae_trainer import encode_dataset
        vae, _ = load_vae_component(run_dir)
        fingerprint = {"dataset": dataset.name, "n": len(dataset), "shape": list(dataset.image_shape),
                       "vae": _folder_digest(run_dir / VAE_DIR)}

        def encode():
            mean, std = encode_dataset(vae, dataset)
            return {"mean": mean.contiguous(), "std": std.contiguous()}

        cache = _cached(run_dir / CACHE_DIR / "latents.safetensors", fingerprint, encode)
        images = LatentImages(cache["mean"], cache["std"], config.latent.scaling_factor)
    else:
        images = PixelImages(dataset)

    if config.text is not None:
        from .captions import captions_for
        captions = captions_for(dataset)
        texts = list(captions.texts) + [""]          # the last row is the empty prompt: "no caption"
        encoder = load_text_component(run_dir)
        cache = _cached(run_dir / CACHE_DIR / "text.safetensors",
                        {"texts": texts, "encoder": _folder_digest(run_dir / TEXT_DIR)},
                        lambda: {"contexts": encode_prompts(encoder, texts).contiguous()})
        condition = TextContexts(cache["contexts"], captions, len(texts) - 1)
    elif config.data.conditional:
        condition = ClassLabels(dataset.labels, config.model.num_classes)
    else:
        condition = None
    return TrainingBatches(images, condition)
