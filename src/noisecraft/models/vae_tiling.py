"""Tiled encoding and decoding for the KL autoencoder, so large images fit in little memory.

The decoder of Stable Diffusion's autoencoder (Rombach et al. 2022, §3.1) keeps 128-channel activations at full
resolution: a 1024×1024 picture needs several GB. Here the input is cut into overlapping square tiles, each tile goes
through the network alone, and the seams are hidden by a linear cross-fade over the overlap. This is the scheme of
diffusers' `AutoencoderKL.enable_tiling()` and gives the same numbers:

- tiles start every `stride = int(tile · (1 − overlap))` latent positions (0, stride, 2·stride, ... while inside the
  input, so the last tiles may be narrower than `tile`, and a last sliver may lie inside the one before it);
- in raster order, each output tile first fades in from the (already blended) tile above over its top `blend` rows,
  then from the (already blended) tile to its left over its first `blend` columns, with weight k/blend for the new
  tile and 1 − k/blend for the old one at offset k (blend shrinks to a narrower neighbour's size);
- of each blended tile only the top-left `tile − blend` = stride (in output units) is kept; the pieces abut.

Geometry is worked out in latent units and scaled by the downsample factor f, so tile starts always fall on whole
latents (diffusers derives the sample- and latent-side sizes separately; they agree for the usual sizes, e.g.
tile_latent=64, overlap=0.25, and there the results are identical).

Each tile sees only its own neighbourhood (the mid-block attention and GroupNorm statistics are per tile), so the tiled
result is close to, not equal to, the untiled one; inputs that fit one tile are passed straight to the VAE.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import NoisecraftError
from .vae import AutoencoderKL, DiagonalGaussian

MIN_TILE = 8


def _check_overlap(overlap) -> float:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise NoisecraftError(f"tile overlap must be a fraction with 0 <= overlap < 1, got {overlap!r}.")
    return float(overlap)


def _check_tile(name: str, size, multiple: int = 1) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_TILE or size % multiple:
        need = f"an integer >= {MIN_TILE}" + (f" and a multiple of {multiple} (the VAE's downsample factor)"
                                             if multiple > 1 else "")
        raise NoisecraftError(f"{name} must be {need}, got {size!r}.")
    return size


def _stride(tile_latent: int, overlap: float) -> int:
    """Distance between tile starts in latents; the tiles overlap by tile_latent − stride."""
    stride = int(tile_latent * (1 - overlap))
    if stride < 1:
        raise NoisecraftError(f"overlap {overlap} leaves no step between tiles of {tile_latent} latents; "
                              f"use a smaller overlap or a larger tile.")
    return stride


def _fade_weights(extent: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (old, new) = (1 − k/extent, k/extent) for k = 0..extent−1, computed in float64 and then rounded, as
    Python scalars would be."""
    new = torch.arange(extent, dtype=torch.float64, device=like.device) / extent
    return (1 - new).to(like.dtype), new.to(like.dtype)


def _blend_top(above: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """Cross-fade the first rows of `tile` from the last rows of the tile above it."""
    extent = min(above.shape[2], tile.shape[2], extent)
    if extent == 0:
        return tile
    old, new = (w.view(1, 1, extent, 1) for w in _fade_weights(extent, tile))
    faded = above[:, :, -extent:] * old + tile[:, :, :extent] * new
    return torch.cat([faded, tile[:, :, extent:]], dim=2)


def _blend_left(left: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """Cross-fade the first columns of `tile` from the last columns of the tile to its left."""
    extent = min(left.shape[3], tile.shape[3], extent)
    if extent == 0:
        return tile
    old, new = (w.view(1, 1, 1, extent) for w in _fade_weights(extent, tile))
    faded = left[:, :, :, -extent:] * old + tile[:, :, :, :extent] * new
    return torch.cat([faded, tile[:, :, :, extent:]], dim=3)


def _run_tiled(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int,
               blend: int, keep: int) -> torch.Tensor:
    """Apply `run` to overlapping tile×tile windows of x that start every `stride` pixels, blend the outputs over
    `blend` output pixels and stitch the top-left keep×keep of each. Only the previous row of tiles is held."""
    rows, above = [], None
    for top in range(0, x.shape[2], stride):
        row = []
        for left in range(0, x.shape[3], stride):
            out = run(x[:, :, top:top + tile, left:left + tile])
            if above is not None:
                out = _blend_top(above[len(row)], out, blend)
            if row:
                out = _blend_left(row[-1], out, blend)
            row.append(out)
        rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row
    return torch.cat(rows, dim=2)


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, tile_latent: int = 64, overlap: float = 0.25) -> torch.Tensor:
    """Decode latents z (N×L×h×w, on the encoder's scale, as for `vae.decode`) tile by tile.

    Tiles are tile_latent×tile_latent latents (64 → 512×512 pixels for SD); neighbouring tiles overlap by
    `overlap` of a tile and their pictures are cross-faded there. If h and w are at most tile_latent this is
    exactly `vae.decode(z)`.
    """
    tile_latent = _check_tile("tile_latent", tile_latent)
    overlap = _check_overlap(overlap)
    if z.ndim != 4 or z.shape[1] != vae.config.latent_channels:
        raise NoisecraftError(f"the decoder expects latents of shape N×{vae.config.latent_channels}×h×w, "
                              f"got {tuple(z.shape)}.")
    if z.shape[2] <= tile_latent and z.shape[3] <= tile_latent:
        return vae.decode(z)
    f = vae.config.downsample_factor
    stride = _stride(tile_latent, overlap)
    return _run_tiled(lambda t: vae.decoder(vae.post_quant_conv(t)), z, tile_latent, stride,
                      blend=(tile_latent - stride) * f, keep=stride * f)


def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, tile_sample: int = 512,
                 overlap: float = 0.25) -> DiagonalGaussian:
    """Encode images x (N×C×H×W in [-1, 1], as for `vae.encode`) tile by tile into q(z|x).

    The moments (after quant_conv) of tile_sample×tile_sample windows are cross-faded over the overlap, then split
    into mean and log-variance. If H and W are at most tile_sample this is exactly `vae.encode(x)`.
    """
    f = vae.config.downsample_factor
    tile_sample = _check_tile("tile_sample", tile_sample, f)
    overlap = _check_overlap(overlap)
    vae.check_input(x)
    if x.shape[2] <= tile_sample and x.shape[3] <= tile_sample:
        return vae.encode(x)
    tile_latent = tile_sample // f
    stride = _stride(tile_latent, overlap)
    moments = _run_tiled(lambda t: vae.quant_conv(vae.encoder(t)), x, tile_sample, stride * f,
                         blend=tile_latent - stride, keep=stride)
    return DiagonalGaussian.from_moments(moments)


class TiledVAE(nn.Module):
    """An AutoencoderKL whose encode/decode run tile by tile; a drop-in for a pipeline's VAE to save memory.

    tile_sample defaults to tile_latent × the downsample factor (the same window on both sides, as in diffusers).
    """

    def __init__(self, vae: AutoencoderKL, tile_latent: int = 64, tile_sample: int | None = None,
                 overlap: float = 0.25):
        super().__init__()
        f = vae.config.downsample_factor
        self.vae = vae
        self.tile_latent = _check_tile("tile_latent", tile_latent)
        self.tile_sample = _check_tile("tile_sample", tile_latent * f if tile_sample is None else tile_sample, f)
        self.overlap = _check_overlap(overlap)
        _stride(self.tile_latent, self.overlap)
        _stride(self.tile_sample // f, self.overlap)

    @property
    def config(self):
        return self.vae.config

    def check_input(self, x: torch.Tensor) -> None:
        self.vae.check_input(x)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return tiled_encode(self.vae, x, self.tile_sample, self.overlap)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return tiled_decode(self.vae, z, self.tile_latent, self.overlap)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled latent (sample=False: the posterior mean), as AutoencoderKL.forward."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
