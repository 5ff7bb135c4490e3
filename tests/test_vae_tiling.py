"""Tiled VAE decoding/encoding: same numbers as diffusers' enable_tiling(), untiled when the input fits one tile."""

import pytest
import torch

from noisecraft.convert.hf_format import load_diffusers_vae
from noisecraft.errors import NoisecraftError
from noisecraft.models.vae_tiling import TiledVAE, tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers AutoencoderKL with tiling on, 32-pixel / 16-latent tiles; the same weights in ours)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, sample_size=32,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():   # GroupNorm affine parameters start at 1/0; perturb them so they matter
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    ours, _ = load_diffusers_vae(folder)
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = 32, 16, 0.25
    return ref, ours


def test_tiled_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(2, 4, 40, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = tiled_decode(ours, z, tile_latent=16)
        untiled = ours.decode(z)
    assert got.shape == expected.shape == (2, 3, 80, 48)
    assert (got - expected).abs().max() < 1e-4
    assert (got - untiled).abs().max() > 1e-3       # tiling really happened


def test_tiled_encode_matches_diffusers(pair):
    ref, ours = pair
    x = torch.rand(1, 3, 80, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist
        got = tiled_encode(ours, x, tile_sample=32)
        untiled = ours.encode(x)
    assert got.mean.shape == expected.mean.shape == (1, 4, 40, 24)
    assert (got.mean - expected.mean).abs().max() < 1e-4
    assert (got.logvar - expected.logvar).abs().max() < 1e-4
    assert (got.mean - untiled.mean).abs().max() > 1e-3


def test_inputs_within_one_tile_are_not_tiled(pair):
    _, ours = pair
    z = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(3))
    x = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiled_decode(ours, z, tile_latent=16), ours.decode(z))
        assert torch.equal(tiled_encode(ours, x, tile_sample=32).mean, ours.encode(x).mean)
        wrapped = TiledVAE(ours, tile_latent=16)
        assert wrapped.tile_sample == 32 and wrapped.config is ours.config
        big = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(5))
        assert torch.equal(wrapped.decode(big), tiled_decode(ours, big, tile_latent=16))


def test_bad_arguments_raise(pair):
    _, ours = pair
    z, x = torch.zeros(1, 4, 20, 20), torch.zeros(1, 3, 40, 40)
    for kwargs in ({"tile_latent": 4}, {"tile_latent": 16.0}, {"overlap": 1.0}, {"overlap": -0.1}):
        with pytest.raises(NoisecraftError):
            tiled_decode(ours, z, **kwargs)
    for kwargs in ({"tile_sample": 33}, {"tile_sample": 6}, {"overlap": 1}):
        with pytest.raises(NoisecraftError):
            tiled_encode(ours, x, **kwargs)
    with pytest.raises(NoisecraftError, match="no step"):
        tiled_decode(ours, z, tile_latent=8, overlap=0.95)
    with pytest.raises(NoisecraftError, match="latents of shape"):
        tiled_decode(ours, torch.zeros(1, 3, 20, 20), tile_latent=16)
    with pytest.raises(NoisecraftError):
        TiledVAE(ours, tile_latent=16, tile_sample=31)
