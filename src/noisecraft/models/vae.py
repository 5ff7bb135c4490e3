"""A KL-regularised autoencoder: the first stage of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", §3.1 and appendix G), laid out exactly like Stable Diffusion's AutoencoderKL.

    x ─ conv_in ─ [ResBlock × n ─ Downsample] per level ─ mid (Res, Attn, Res) ─ norm ─ SiLU ─ conv_out ─ quant_conv
      ─> (mean, logvar) of q(z|x) = N(μ, σ²) ─ z ─ post_quant_conv ─ conv_in ─ mid ─ [ResBlock × (n+1) ─ Upsample]
      per level ─ norm ─ SiLU ─ conv_out ─> x̂

Module names mirror the keys of diffusers' AutoencoderKL state dict (encoder.down_blocks.0.resnets.0.conv1.weight,
encoder.mid_block.attentions.0.to_q.weight, quant_conv.weight, ...), so Stable Diffusion weights load with
load_state_dict and no key table. The encoder halves H and W between consecutive levels: 28×28 with three levels
gives a 7×7 latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoisecraftError
from ..settings import check_fields, settings_from_dict, settings_to_dict
from .size_limits import check_parameter_count

# Bounds far above any real autoencoder (Stable Diffusion's has 8.4e7 parameters), so that a corrupted or hostile
# config fails with a clear sentence instead of exhausting the memory.
MAX_LEVELS, MAX_BLOCKS, MAX_IO_CHANNELS = 12, 64, 1024
NORM_EPS = 1e-6                    # GroupNorm epsilon of Stable Diffusion's autoencoder
LOGVAR_RANGE = (-30.0, 20.0)       # log σ² is clamped here, as in SD, so exp() never overflows


@dataclass
class VAEConfig:
    """Everything needed to rebuild an AutoencoderKL; stored in a VAE run's config.json under "model"."""

    in_channels: int = 1                                  # image channels
    latent_channels: int = 4                              # L: the latent z is L×H/f×W/f
    block_out_channels: tuple[int, ...] = (32, 64, 64)   # one level each; H and W halve between levels
    layers_per_block: int = 1                             # ResNet blocks per encoder level (the decoder has one more)
    norm_groups: int = 8                                  # GroupNorm groups
    mid_attention: bool = True                            # self-attention between the two middle ResNet blocks

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("in_channels", "int", f"[1, {MAX_IO_CHANNELS}]", False),
        ("latent_channels", "int", f"[1, {MAX_IO_CHANNELS}]", False),
        ("block_out_channels", "ints+", "[1, inf)", False),
        ("layers_per_block", "int", f"[1, {MAX_BLOCKS}]", False),
        ("norm_groups", "int", "[1, inf)", False),
        ("mid_attention", "bool", None, False),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "VAE")
        widths = self.block_out_channels
        if len(widths) > MAX_LEVELS:
            raise NoisecraftError(f"VAE setting block_out_channels has {len(widths)} levels, more than the "
                                  f"{MAX_LEVELS} an autoencoder can sensibly have; fix or delete the config.")
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise NoisecraftError(f"every VAE width must be divisible by norm_groups={self.norm_groups}; "
                                  f"{bad} are not (change block_out_channels or norm_groups).")
        # Size the network before a single weight is allocated: coarsely from the second 3×3 convolution of every
        # ResNet block (encoder and decoder), then exactly on the meta device.
        at_least = (2 * self.layers_per_block + 1) * sum(9 * w * w for w in widths)
        check_parameter_count(lambda: AutoencoderKL(self), at_least, "an autoencoder", "lower block_out_channels")

    @classmethod
    def from_dict(cls, data: dict) -> "VAEConfig":
        return settings_from_dict(cls, data, "VAE")

    def to_dict(self) -> dict:
        return settings_to_dict(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(μ, diag(σ²)) (Kingma & Welling 2014), built from its 2·L output channels."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split N×2L×h×w encoder moments into the mean (first L channels) and log-variance (last L)."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε with ε ~ N(0, I) (the reparameterisation trick, so gradients reach μ and σ)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), in closed form, summed over each example (shape N)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a 1×1 conv_shortcut when the width changes (no time embedding)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEMidAttention(nn.Module):
    """The middle block's single-head self-attention over the H·W positions, softmax(QKᵀ/√C)V, with a residual connection.

    Linear projections act on the channel vector of each position (to_q, to_k, to_v, to_out.0 as in diffusers;
    the original SD checkpoints store them as 1×1 convolutions, the same numbers with two trailing unit dims).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])   # index 0 keeps diffusers' key name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)          # N × HW × C
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class VAEDownsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3×3 convolution without padding (SD's asymmetric down-sampler)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEUpsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResnetLevel(nn.Module):
    """The ResNet blocks of one resolution, then an optional resampler, kept at index 0 of a list named
    `resampler_key` (diffusers' key: down_blocks.i.downsamplers.0, up_blocks.i.upsamplers.0)."""

    resampler_key = ""

    def __init__(self, resnets: list[ResnetBlock], resampler: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if resampler is not None:
            setattr(self, self.resampler_key, nn.ModuleList([resampler]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        resampler = getattr(self, self.resampler_key, None)
        return x if resampler is None else resampler[0](x)


class EncoderLevel(ResnetLevel):
    """One level of the encoder, halving H and W but at the last level (diffusers' DownEncoderBlock2D)."""

    resampler_key = "downsamplers"


class DecoderLevel(ResnetLevel):
    """One level of the decoder, doubling H and W but at the last level (diffusers' UpDecoderBlock2D)."""

    resampler_key = "upsamplers"


class MidBlock(nn.Module):
    """ResNet → attention → ResNet at the coarsest resolution (attention optional)."""

    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([VAEMidAttention(ch, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (N×C×H×W) → 2·L moment channels at H/f × W/f."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, g = c.block_out_channels, c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        ch = widths[0]
        for i, width in enumerate(widths):
            resnets = []
            for _ in range(c.layers_per_block):
                resnets.append(ResnetBlock(ch, width, g))
                ch = width
            last = i == len(widths) - 1
            self.down_blocks.append(EncoderLevel(resnets, None if last else VAEDownsample(ch)))
        self.mid_block = MidBlock(ch, g, c.mid_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """z (N×L×h×w) → x̂ at h·f × w·f; levels run from the coarsest width back to the first, with one more
    ResNet block per level than the encoder."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, g = tuple(reversed(c.block_out_channels)), c.norm_groups
        ch = widths[0]
        self.conv_in = nn.Conv2d(c.latent_channels, ch, 3, padding=1)
        self.mid_block = MidBlock(ch, g, c.mid_attention)
        self.up_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            resnets = []
            for _ in range(c.layers_per_block + 1):
                resnets.append(ResnetBlock(ch, width, g))
                ch = width
            last = i == len(widths) - 1
            self.up_blocks.append(DecoderLevel(resnets, None if last else VAEUpsample(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL autoencoder: encode(x) → q(z|x), decode(z) → x̂, forward(x) → (x̂ from a sampled z, q(z|x)).

    Images are N×C×H×W in [-1, 1] with H and W divisible by `config.downsample_factor`; latents are
    N×latent_channels×H/f×W/f on the encoder's own scale (multiply by the run's scaling factor before diffusion).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for images the autoencoder cannot take."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise NoisecraftError(f"the autoencoder expects images of shape N×{c.in_channels}×H×W, got "
                                  f"{tuple(x.shape)}; check the channel count of your images.")
        f = c.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise NoisecraftError(
                f"image size {x.shape[2]}×{x.shape[3]} is not divisible by {f} (the autoencoder halves it "
                f"{len(c.block_out_channels) - 1} times); resize or crop the images, or use fewer block_out_channels.")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self.check_input(x)
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise NoisecraftError(f"the decoder expects latents of shape N×{self.config.latent_channels}×h×w, "
                                  f"got {tuple(z.shape)}.")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled latent (sample=False: through the posterior mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
