"""A trained autoencoder put to use: load a `noisecraft train-vae` run, encode a dataset to its latents, measure the
reconstruction, and find the latent scaling factor that latent diffusion divides by (Rombach et al. 2022, §4.3.2)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import NoisecraftError, brief
from ..io.checkpoint import load_kind_config, load_weights
from ..settings import check_data_section
from .vae import AutoencoderKL, VAEConfig

KIND = "vae"


def _as_uint8_images(images) -> torch.Tensor | None:
    """The N×C×H×W tensor behind an ImageDataset (anything with an `images` tensor), a tensor or a numpy array
    (uint8, or float in [-1, 1])."""
    if isinstance(getattr(images, "images", None), torch.Tensor):
        return images.images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise NoisecraftError(f"expected images as an ImageDataset, a tensor or a numpy array, got "
                              f"{type(images).__name__}.")
    if images.ndim == 3:
        images = images.unsqueeze(1)              # N×H×W grey images
    if images.ndim != 4:
        raise NoisecraftError(f"expected images of shape N×C×H×W, got {tuple(images.shape)}.")
    return images


def _to_float(batch: torch.Tensor, device) -> torch.Tensor:
    batch = batch.to(device)
    return batch.float() / 127.5 - 1.0 if batch.dtype == torch.uint8 else batch.float()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of q(z|x) for every image, as float32 CPU tensors N×L×h×w.

    `images`: an ImageDataset, or uint8 N×C×H×W (N×H×W for grey) — float tensors are taken as already in
    [-1, 1]. Latent diffusion caches these once and draws z = mean + std·ε per step.
    """
    data = _as_uint8_images(images)
    if len(data) == 0:
        raise NoisecraftError("encode_dataset got no images; pass at least one.")
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    means, stds = [], []
    try:
        for start in range(0, len(data), batch_size):
            posterior = vae.encode(_to_float(data[start:start + batch_size], device))
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
    finally:
        vae.train(was_training)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images, batch_size: int = 500, limit: int | None = None) -> float:
    """Mean over images of PSNR = 10·log10(1 / MSE), with x and the posterior-mean reconstruction x̂ clamped to
    [-1, 1] and mapped to [0, 1] (so a perfect copy scores at most 100 dB)."""
    data = _as_uint8_images(images)
    data = data[:limit] if limit else data
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    scores = []
    try:
        for start in range(0, len(data), batch_size):
            x = _to_float(data[start:start + batch_size], device)
            recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
            mse = ((recon - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            scores.append((-10.0 * torch.log10(mse)).cpu())
    finally:
        vae.train(was_training)
    return float(torch.cat(scores).mean())


def latent_scaling_factor(vae: AutoencoderKL, images, n: int = 4096, seed: int = 0, batch_size: int = 500) -> float:
    """1 / std of latents z ~ q(z|x) sampled for (up to) n images — SD's 0.18215 was found this way."""
    data = _as_uint8_images(images)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    mean, std = encode_dataset(vae, data[pick], batch_size)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed + 1))
    spread = float(z.std())
    if not math.isfinite(spread) or spread == 0:
        raise NoisecraftError("the latents have no spread (std 0 or not finite), so no scaling factor can be "
                              "computed; the autoencoder is broken — retrain it.")
    return 1.0 / spread


def load_vae(run_dir: str | Path, device: str = "cpu") -> tuple[AutoencoderKL, float, dict]:
    """(autoencoder in eval mode, latent scaling factor, config dict) from a `noisecraft train-vae` run."""
    run_dir = Path(run_dir)
    config = load_kind_config(run_dir, KIND, "an autoencoder", "train-vae")
    if "model" not in config:
        raise NoisecraftError(f"{run_dir / 'config.json'} has no 'model' section; restore it or retrain the autoencoder.")
    try:
        model_config = VAEConfig.from_dict(config["model"])
    except TypeError as e:
        raise NoisecraftError(f"the model section of {run_dir / 'config.json'} is invalid ({brief(e)}).") from None
    check_data_section(config.get("data"), run_dir / "config.json")
    scale = config.get("scaling_factor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise NoisecraftError(f"{run_dir} has no valid latent scaling factor (got {scale!r}): its training did not "
                              f"finish; train it again with `noisecraft train-vae`.")
    model = AutoencoderKL(model_config)
    try:
        model.load_state_dict(load_weights(run_dir / "model.safetensors"))
    except RuntimeError as e:
        raise NoisecraftError(f"the weights in {run_dir / 'model.safetensors'} do not fit the autoencoder in "
                              f"config.json ({brief(e)}); the run directory is inconsistent.") from None
    return model.to(device).eval(), float(scale), config
