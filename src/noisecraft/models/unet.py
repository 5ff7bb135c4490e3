"""A time-conditional U-Net for pixel-space diffusion (the DDPM architecture, Ho et al. 2020, §4 and appendix B).

    input ─ conv ─┬─ [ResBlock (+Attention)] × n ─ Downsample ─ ... ─ middle (Res, Attn, Res) ─┐
                  │            │ skip                                                       │
                  └─ ... ─ [ResBlock(cat skip) (+Attention)] × (n+1) ─ Upsample ─ ... ─ norm ─ conv ─ output

Every ResBlock receives the time embedding (and, for class-conditional models, a label embedding added
to it) through a FiLM scale and shift after its second GroupNorm (improved DDPM, Nichol & Dhariwal 2021).

Text-conditional models (`context_dim` set) replace every attention block, the middle one included, with the
spatial transformer of latent diffusion (Rombach et al. 2022, §3.3): self-attention, then cross-attention from the
image features to the text embeddings τ(y), then a feed-forward layer (models/transformer.py).

The same code takes exactly the shape of Stable Diffusion 1.x/2.x's U-Net (diffusers' UNet2DConditionModel):
a fixed number of heads (`num_heads`), the time embedding added after the first convolution instead of FiLM
(`time_conditioning="additive"`), linear transformer projections (`linear_projection`, 2.x) and GroupNorm eps
(`norm_eps`); io/diffusers_unet.py maps its weights onto ours by renaming keys. Sizes not divisible by
2^(levels-1) work too: each Upsample meets the size of the skip it is joined with, as SD does for any multiple of 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoisecraftError, short_repr as _short
from ..settings import check_fields, settings_from_dict, settings_to_dict
from .attention import SelfAttention2d
from .embeddings import LabelEmbedding, TimeEmbedding
from .size_limits import check_parameter_count, parameter_count
from .transformer import SpatialTransformer

# Bounds far above any real U-Net (Stable Diffusion XL's has 2.6e9 parameters, 3 levels and about 180 blocks), so
# that a corrupted or hostile config fails with a clear sentence instead of exhausting the memory or the patience.
MAX_LEVELS = 12
MAX_BLOCKS = 64                    # residual blocks per level, transformer blocks per attention site
MAX_BUILT_BLOCKS = 500             # residual and attention blocks in all
MAX_IO_CHANNELS = 1024
TIME_CONDITIONING = ("scale_shift", "additive")


@dataclass
class UNetConfig:
    """Everything needed to rebuild a UNet; stored in a run's config.json."""

    in_channels: int = 1                      # image (or latent) channels
    out_channels: int | None = None          # default: in_channels (ε, x0 or v prediction)
    base_channels: int = 32                   # width of level 0; the time embedding is 4× as wide
    channel_mults: tuple[int, ...] = (1, 2, 4)   # width of each level, in multiples of base_channels
    num_res_blocks: int = 2                   # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (2,)  # level 0 is full resolution; each level halves H and W
    head_dim: int = 32                        # channels per attention head (when num_heads is None)
    dropout: float = 0.1                      # in every ResBlock, before its second convolution
    num_classes: int = 0                      # 0: unconditional; >0 adds a label embedding with a null class
    groups: int = 8                           # GroupNorm groups
    context_dim: int | None = None            # None: no text; else the width of the text embeddings (cross-attention)
    transformer_depth: int = 1                # transformer blocks per attention site of a text model
    num_heads: int | tuple[int, ...] | None = None   # None: width // head_dim; int: every block; tuple: per level
    time_conditioning: str = "scale_shift"    # "scale_shift" (FiLM after norm2) or "additive" (SD: added after conv1)
    linear_projection: bool = False           # text models: linear proj_in/proj_out (SD 2.x) instead of 1×1 convs
    norm_eps: float = 1e-5                    # eps of the ResBlock and output GroupNorms

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("in_channels", "int", f"[1, {MAX_IO_CHANNELS}]", False),
        ("out_channels", "int", f"[1, {MAX_IO_CHANNELS}]", False),
        ("base_channels", "int", "[1, inf)", False),
        ("channel_mults", "ints+", "[1, inf)", False),
        ("num_res_blocks", "int", f"[1, {MAX_BLOCKS}]", False),
        ("attention_levels", "ints", "[0, inf)", False),
        ("head_dim", "int", "[1, inf)", False),
        ("dropout", "float", "[0, 1)", False),
        ("num_classes", "int", "[0, inf)", False),
        ("groups", "int", "[1, inf)", False),
        ("context_dim", "int", "[1, inf)", True),
        ("transformer_depth", "int", f"[1, {MAX_BLOCKS}]", False),
        ("time_conditioning", "str", TIME_CONDITIONING, False),
        ("linear_projection", "bool", None, False),
        ("norm_eps", "float", "(0, inf)", False),
    )

    def __post_init__(self):
        if isinstance(self.num_heads, list):      # JSON stores tuples as lists
            self.num_heads = tuple(self.num_heads)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        check_fields(self, self.RULES, "model")
        self.norm_eps = float(self.norm_eps)
        if len(self.channel_mults) > MAX_LEVELS:
            raise NoisecraftError(f"model setting channel_mults has {len(self.channel_mults)} levels, more than the "
                                  f"{MAX_LEVELS} a U-Net can sensibly have; fix or delete the config.")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.groups:
                raise NoisecraftError(
                    f"every width base_channels*mult must be divisible by groups={self.groups}; "
                    f"{self.base_channels}*{m} is not.")
        if any(level not in range(len(self.channel_mults)) for level in self.attention_levels):
            raise NoisecraftError(
                f"attention_levels {_short(self.attention_levels)} must index channel_mults "
                f"(0..{len(self.channel_mults) - 1}).")
        self._check_heads()
        if self.num_classes and self.context_dim is not None:
            raise NoisecraftError("a model takes class labels (num_classes) or text (context_dim), not both; "
                                  "set one of them to its default (0 or None).")
        # Size the network before a single weight is allocated (base_channels = 10^9 must be a clear error, not an
        # attempt to allocate 10^19 floats): coarsely from the settings, then exactly on the meta device.
        blocks = self._blocks()
        if blocks > MAX_BUILT_BLOCKS:
            raise NoisecraftError(f"these settings give a U-Net of {blocks} residual and attention blocks, more than "
                                  f"the {MAX_BUILT_BLOCKS} noisecraft builds; lower num_res_blocks, transformer_depth "
                                  f"or the number of levels.")
        check_parameter_count(lambda: UNet(self), self._fewest_parameters(), "a U-Net",
                              "lower base_channels, channel_mults, num_res_blocks, num_classes or context_dim")

    def _blocks(self) -> int:
        """The residual and attention (or transformer) blocks UNet(self) has."""
        per_level = 2 * self.num_res_blocks + 1                   # down and up
        attention = (len(self.attention_levels) * per_level + 1) * (self.transformer_depth if self.context_dim else 1)
        return len(self.channel_mults) * per_level + 2 + attention

    def _fewest_parameters(self) -> int:
        """A lower bound of UNet(self)'s parameter count from its largest weights alone: the second 3×3 convolution
        of every residual block, the label table, the middle block's cross-attention keys and values."""
        widths = [self.base_channels * m for m in self.channel_mults]
        total = (2 * self.num_res_blocks + 1) * sum(9 * w * w for w in widths)
        total += (self.num_classes + 1) * 4 * self.base_channels if self.num_classes else 0
        return total + (2 * (self.context_dim or 0) * widths[-1] * self.transformer_depth)

    def parameter_count(self) -> int:
        """The parameters of UNet(self), counted on the meta device (no memory)."""
        return parameter_count(lambda: UNet(self))

    def _check_heads(self) -> None:
        heads = self.num_heads
        if heads is None:
            return
        n = len(self.channel_mults)
        per_level = (heads,) * n if isinstance(heads, int) else heads
        if (not isinstance(per_level, tuple) or len(per_level) != n
                or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in per_level)):
            raise NoisecraftError(f"num_heads must be None, a positive integer or one positive integer per level "
                                  f"({n} levels), got {_short(heads)}.")
        for level in sorted(set(self.attention_levels) | {n - 1}):   # the middle block uses the last level's
            width = self.base_channels * self.channel_mults[level]
            if width % per_level[level]:
                raise NoisecraftError(f"the width {width} of level {level} is not divisible by its num_heads "
                                      f"{per_level[level]}; choose a head count that divides it.")

    def heads_at(self, level: int) -> int:
        """Attention heads at a level (the middle block uses the last level's)."""
        width = self.base_channels * self.channel_mults[level]
        if self.num_heads is None:
            return width // self.head_dim if width % self.head_dim == 0 else 1   # one head for odd widths
        return self.num_heads if isinstance(self.num_heads, int) else self.num_heads[level]

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        return settings_from_dict(cls, data, "model")

    def to_dict(self) -> dict:
        return settings_to_dict(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, then GroupNorm with a FiLM (scale, shift) from the embedding → SiLU → dropout → conv,
    plus a (1×1 if the width changes) skip connection.

    time_conditioning="additive" instead adds a projection of the embedding after the first convolution (the DDPM
    original and Stable Diffusion's U-Net: h = conv1(·) + W·emb, then GroupNorm → SiLU → dropout → conv)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int,
                 time_conditioning: str = "scale_shift", eps: float = 1e-5):
        super().__init__()
        self.additive = time_conditioning == "additive"
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch if self.additive else 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # a fresh block is the identity: stabler early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.additive:
            h = self.norm2(h + self.emb(emb)[:, :, None, None])
        else:
            scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour), then a 3×3 convolution. `size` (H, W) overrides the doubling, so an odd
    size halved on the way down (15 -> 8) comes back to the size of the skip it meets (8 -> 15)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size: tuple[int, int] | None = None):
        if size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3]):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class Level(nn.Module):
    """The residual blocks (and optional attention) of one resolution level on one side of the U."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)


class UNet(nn.Module):
    """ε/x0/v-prediction network f(x_t, t, cond) with the shape of its input.

    `t` is a float tensor of timesteps (shape N, fractional values allowed). `cond` depends on the model:
    - class-conditional (num_classes > 0): an int tensor of labels (shape N), where `num_classes` is the null
      label, or None (unconditional); float mixing weights of shape N×(num_classes + 1) blend class embeddings;
    - text-conditional (context_dim set): the text embeddings, N×L×context_dim; required — pass the empty
      prompt's embedding for the unconditional model;
    - unconditional: ignored.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        widths = [c.base_channels * m for m in c.channel_mults]
        emb_dim = 4 * c.base_channels
        self.time_embed = TimeEmbedding(c.base_channels, emb_dim)
        self.label_embed = LabelEmbedding(c.num_classes, emb_dim) if c.num_classes else None
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)

        def attention_block(level: int, ch: int) -> nn.Module:
            heads = c.heads_at(level)
            if c.context_dim is None:
                return SelfAttention2d(ch, ch // heads, c.groups)
            return SpatialTransformer(ch, heads, ch // heads, c.context_dim, c.transformer_depth, c.groups,
                                      use_linear_projection=c.linear_projection)

        def attention(level: int, ch: int) -> nn.Module:
            return attention_block(level, ch) if level in c.attention_levels else nn.Identity()

        def res_block(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_dim, c.dropout, c.groups, c.time_conditioning, c.norm_eps)

        # Down path: remember the width of every skip connection it produces.
        self.down, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        skip_widths, ch = [widths[0]], widths[0]
        for level, width in enumerate(widths):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(res_block(ch, width))
                attns.append(attention(level, width))
                ch = width
                skip_widths.append(ch)
            self.down.append(Level(blocks, attns))
            last = level == len(widths) - 1
            self.downsamplers.append(nn.Identity() if last else Downsample(ch))
            if not last:
                skip_widths.append(ch)

        self.mid_block1 = res_block(ch, ch)
        self.mid_attn = attention_block(len(widths) - 1, ch)
        self.mid_block2 = res_block(ch, ch)

        # Up path: each block consumes one skip connection, in reverse order.
        self.up, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(res_block(ch + skip_widths.pop(), widths[level]))
                attns.append(attention(level, widths[level]))
                ch = widths[level]
            self.up.append(Level(blocks, attns))
            self.upsamplers.append(Upsample(ch) if level > 0 else nn.Identity())

        self.norm_out = nn.GroupNorm(c.groups, ch, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # Channels-last (NHWC) memory: oneDNN's CPU convolutions, their backward pass above all, run several
        # times faster in it than in NCHW (measured in benchmarks/unet_throughput.py); GPUs like it too.
        self.to(memory_format=torch.channels_last)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for inputs the network cannot take."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise NoisecraftError(
                f"the model expects images of shape N×{c.in_channels}×H×W, got {tuple(x.shape)}; "
                f"check the channel count of your data.")

    def check_context(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        """Raise a clear error for a missing or mis-shaped text context."""
        c = self.config
        if context is None:
            raise NoisecraftError(
                "this text-conditional model needs cond: text embeddings of shape N×L×"
                f"{c.context_dim} (for the unconditional model pass the empty prompt's embedding).")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != c.context_dim:
            raise NoisecraftError(
                f"the text context must have shape {x.shape[0]}×L×{c.context_dim} (batch × tokens × "
                f"context_dim), got {tuple(context.shape)}; check the text encoder's width and the batch size.")

    def attend(self, attn: nn.Module, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return attn(h, context) if isinstance(attn, SpatialTransformer) else attn(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        # The weights may be bfloat16/float16 (model.to(torch.bfloat16)): inputs follow the weights' dtype, the
        # output comes back in the input's.
        in_dtype, dtype = x.dtype, self.conv_in.weight.dtype
        x = x.to(dtype)
        context = None
        if self.config.context_dim is not None:
            self.check_context(x, cond)
            context = cond.to(dtype)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t)
        if self.label_embed is not None:
            labels = cond
            if labels is None:  # no label given: the unconditional model
                labels = torch.full((x.shape[0],), self.label_embed.null_label, device=x.device)
            emb = emb + self.label_embed(labels)
        emb = F.silu(emb)

        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        skips = [h]
        for level, down in zip(self.down, self.downsamplers):
            for block, attn in zip(level.blocks, level.attentions):
                h = self.attend(attn, block(h, emb), context)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)

        h = self.mid_block2(self.attend(self.mid_attn, self.mid_block1(h, emb), context), emb)

        for level, up in zip(self.up, self.upsamplers):
            for block, attn in zip(level.blocks, level.attentions):
                h = self.attend(attn, block(torch.cat([h, skips.pop()], dim=1), emb), context)
            if isinstance(up, Upsample):
                h = up(h, skips[-1].shape[2:])   # the size of the skip it is joined with next

        return self.conv_out(F.silu(self.norm_out(h))).contiguous().to(in_dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
