"""What a latent or text-conditional run trains on: VAE latents and caption embeddings, computed once.

Training caches, in `<run>/cache/`, the VAE posterior of every training image and the text embeddings of every
distinct caption, so those frozen networks run once per run, not once per step. A cache is fingerprinted by the
dataset and the component's files, so one made with other weights is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..components import TEXT_DIR, VAE_DIR, load_text_component, load_vae_component
from ..config import RunConfig
from ..errors import NoisecraftError
from ..io.checkpoint import load_weights, save_weights
from .batches import (
    ClassLabels,
    LatentImages,
    PixelImages,
    TextContexts,
    TrainingBatches,
)
from .datasets import ImageDataset

CACHE_DIR = "cache"



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


def build_batches(config: RunConfig, dataset: ImageDataset, run_dir: str | Path) -> TrainingBatches:
    """The training batches a run needs: pixels or (for a latent run) the VAE latents of `dataset`, with class
    labels or (for a text run) caption embeddings; latents and embeddings come from (or go into) the run's cache."""
    run_dir = Path(run_dir)
    if config.latent is not None:
        from ..models.vae_loading import encode_dataset
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
