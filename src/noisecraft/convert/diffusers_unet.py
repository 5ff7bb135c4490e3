"""Stable Diffusion's U-Net in diffusers form (UNet2DConditionModel folders) <-> noisecraft's own UNet.

Our UNet has the block structure of latent diffusion's U-Net (Rombach et al. 2022, appendix E; diffusers'
UNet2DConditionModel): the same ResBlocks, spatial transformers, stride-2 downsamplers, nearest-neighbour
upsamplers and sinusoidal time embedding (cos first, frequencies 10000^(-i/half): flip_sin_to_cos=True,
freq_shift=0). Only the module names differ, so loading is a translation of config.json into a UNetConfig and a
pure rename of the state-dict keys, one rule per module kind (`diffusers_unet_key_map`); no tensor is reshaped.

    ours                                   diffusers
    time_embed.mlp.0 / .2                  time_embedding.linear_1 / linear_2
    down.i.blocks.j.{emb, skip, …}         down_blocks.i.resnets.j.{time_emb_proj, conv_shortcut, …}
    down.i.attentions.j.…                  down_blocks.i.attentions.j.…
    downsamplers.i.conv                    down_blocks.i.downsamplers.0.conv
    mid_block1 / mid_attn / mid_block2     mid_block.resnets.0 / attentions.0 / resnets.1
    up.i.… / upsamplers.i.conv             up_blocks.i.… / up_blocks.i.upsamplers.0.conv
    norm_out                               conv_norm_out
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import NoisecraftError
from ..io.checkpoint import save_json, save_weights
from ..models.unet import UNet, UNetConfig
from .hf_format import load_into, read_component

# UNet2DConditionModel settings that every U-Net we read or write has (SD's, and our own): SiLU, sinusoidal time
# embedding with cos first and no frequency shift, stride-2 padded downsampling, no extra scalings or attention modes.
WRITTEN_SETTINGS = {"act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
                    "downsample_padding": 1, "mid_block_scale_factor": 1, "only_cross_attention": False,
                    "dual_cross_attention": False, "upcast_attention": False}

CLASS_NAME = "UNet2DConditionModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Block types we can represent: (down, up) with and without cross-attention.
ATTENTION_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
PLAIN_BLOCKS = ("DownBlock2D", "UpBlock2D")

# Settings whose diffusers default is the only value our UNet implements: name -> accepted values.
FIXED_SETTINGS = {
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "reverse_transformer_layers_per_block": (None,),
}

TIME_CONDITIONING = {"default": "additive", "scale_shift": "scale_shift"}


def _unsupported(source, name: str, value, why: str = "") -> NoisecraftError:
    return NoisecraftError(f"{source}: the setting {name}={value!r} is not supported by noisecraft's UNet"
                           f"{why}; only Stable Diffusion 1.x/2.x-style U-Nets convert.")


def _same_per_level(config: dict, name: str, default, levels: int, source):
    """A setting given as one value or one per level (all equal, which is all our UNet represents)."""
    value = config.get(name, default)
    if isinstance(value, (list, tuple)):
        if len(value) != levels or len(set(map(repr, value))) != 1:
            raise _unsupported(source, name, value, " (it must be the same at every level)")
        value = value[0]
    return value


def unet_config_from_diffusers(config: dict, source="config.json") -> UNetConfig:
    """Our UNetConfig for a diffusers UNet2DConditionModel config.json (e.g. Stable Diffusion 1.5's unet/).

    Note diffusers' historical naming: `attention_head_dim` is the NUMBER of heads when `num_attention_heads` is
    null (SD 1.x: 8 heads at every level, head dims 40/80/160; SD 2.x: [5, 10, 20, 20], head dim 64).
    """
    if not isinstance(config, dict):
        raise NoisecraftError(f"{source} must be a JSON object, got {type(config).__name__}.")
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise NoisecraftError(f"{source} describes a {name}, not a {CLASS_NAME}; pass the unet/ folder of a "
                              f"Stable Diffusion model.")
    absent = [k for k in ("block_out_channels", "down_block_types", "up_block_types") if k not in config]
    if absent:
        raise NoisecraftError(f"{source} lacks {', '.join(absent)}; it is not a {CLASS_NAME} config.")
    for key, accepted in FIXED_SETTINGS.items():
        if key in config and config[key] not in accepted:
            raise _unsupported(source, key, config[key])
    if config.get("norm_num_groups", 32) is None:
        raise _unsupported(source, "norm_num_groups", None)
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in TIME_CONDITIONING:
        raise _unsupported(source, "resnet_time_scale_shift", shift)

    widths = [int(w) for w in config["block_out_channels"]]
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(widths)
    if not widths or len(down) != levels or len(up) != levels:
        raise NoisecraftError(f"{source}: block_out_channels, down_block_types and up_block_types must have one "
                              f"entry per level; the config is inconsistent.")
    base = widths[0]
    if any(w % base for w in widths):
        raise _unsupported(source, "block_out_channels", widths, " (every width must be a multiple of the first)")
    attention_levels = []
    for level, kind in enumerate(down):
        if kind not in ATTENTION_BLOCKS[:1] + PLAIN_BLOCKS[:1]:
            raise _unsupported(source, "down_block_types", down, f" (block type {kind})")
        mirror = ATTENTION_BLOCKS[1] if kind == ATTENTION_BLOCKS[0] else PLAIN_BLOCKS[1]
        if up[levels - 1 - level] != mirror:
            raise _unsupported(source, "up_block_types", up, " (the up blocks must mirror the down blocks)")
        if kind == ATTENTION_BLOCKS[0]:
            attention_levels.append(level)

    only_cross = config.get("only_cross_attention", False)
    if only_cross is True or (isinstance(only_cross, (list, tuple)) and any(only_cross)):
        raise _unsupported(source, "only_cross_attention", only_cross)
    layers = _same_per_level(config, "layers_per_block", 2, levels, source)
    context_dim = _same_per_level(config, "cross_attention_dim", 1280, levels, source)
    depth = _same_per_level(config, "transformer_layers_per_block", 1, levels, source)
    if isinstance(depth, (list, tuple)):
        raise _unsupported(source, "transformer_layers_per_block", config["transformer_layers_per_block"])
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = tuple(int(h) for h in heads) if isinstance(heads, (list, tuple)) else int(heads)

    try:
        return UNetConfig(
            in_channels=int(config.get("in_channels", 4)), out_channels=int(config.get("out_channels", 4)),
            base_channels=base, channel_mults=tuple(w // base for w in widths), num_res_blocks=int(layers),
            attention_levels=tuple(attention_levels), num_heads=heads, dropout=float(config.get("dropout", 0.0)),
            groups=int(config.get("norm_num_groups", 32)), context_dim=int(context_dim), transformer_depth=int(depth),
            time_conditioning=TIME_CONDITIONING[shift],
            linear_projection=bool(config.get("use_linear_projection", False)),
            norm_eps=float(config.get("norm_eps", 1e-5)))
    except NoisecraftError as e:
        raise NoisecraftError(f"{source}: {e}") from None


def _check_exportable(config: UNetConfig) -> None:
    # Our pixel models always have a SelfAttention2d in the middle (UNet2DConditionModel has no such block), and
    # diffusers' class embeddings are another design than our label table: neither maps by a rename.
    if config.context_dim is None or config.num_classes:
        raise NoisecraftError("this UNet is " + ("class-conditional" if config.num_classes else "a pixel model with "
                              "self-attention blocks") + "; only text-conditional models export to "
                              "UNet2DConditionModel.")


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """The diffusers UNet2DConditionModel config.json of a text-conditional UNetConfig (the inverse of
    `unet_config_from_diffusers`)."""
    _check_exportable(config)
    levels = len(config.channel_mults)
    heads = [config.heads_at(level) for level in range(levels)]
    attn = set(config.attention_levels)
    return {
        "_class_name": CLASS_NAME,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": [config.base_channels * m for m in config.channel_mults],
        "layers_per_block": config.num_res_blocks,
        "down_block_types": [ATTENTION_BLOCKS[0] if lv in attn else PLAIN_BLOCKS[0] for lv in range(levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [ATTENTION_BLOCKS[1] if lv in attn else PLAIN_BLOCKS[1] for lv in reversed(range(levels))],
        "cross_attention_dim": config.context_dim,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,   # = number of heads (diffusers naming)
        "transformer_layers_per_block": config.transformer_depth,
        "use_linear_projection": config.linear_projection,
        "norm_num_groups": config.groups,
        "norm_eps": config.norm_eps,
        "resnet_time_scale_shift": "default" if config.time_conditioning == "additive" else "scale_shift",
        "dropout": config.dropout,
        **WRITTEN_SETTINGS,
    }


# One rule per module kind; the captured prefix is renamed, the rest of the key is kept.
RESNET_PARTS = {"emb": "time_emb_proj", "skip": "conv_shortcut"}
RULES = [
    (r"time_embed\.mlp\.0\.(.*)", lambda m: f"time_embedding.linear_1.{m[1]}"),
    (r"time_embed\.mlp\.2\.(.*)", lambda m: f"time_embedding.linear_2.{m[1]}"),
    (r"(down|up)\.(\d+)\.blocks\.(\d+)\.(\w+)\.(.*)",
     lambda m: f"{m[1]}_blocks.{m[2]}.resnets.{m[3]}.{RESNET_PARTS.get(m[4], m[4])}.{m[5]}"),
    (r"(down|up)\.(\d+)\.attentions\.(\d+)\.(.*)", lambda m: f"{m[1]}_blocks.{m[2]}.attentions.{m[3]}.{m[4]}"),
    (r"downsamplers\.(\d+)\.conv\.(.*)", lambda m: f"down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (r"upsamplers\.(\d+)\.conv\.(.*)", lambda m: f"up_blocks.{m[1]}.upsamplers.0.conv.{m[2]}"),
    (r"mid_block([12])\.(\w+)\.(.*)",
     lambda m: f"mid_block.resnets.{int(m[1]) - 1}.{RESNET_PARTS.get(m[2], m[2])}.{m[3]}"),
    (r"mid_attn\.(.*)", lambda m: f"mid_block.attentions.0.{m[1]}"),
    (r"norm_out\.(.*)", lambda m: f"conv_norm_out.{m[1]}"),
    (r"(conv_in|conv_out)\.(.*)", lambda m: f"{m[1]}.{m[2]}"),
]


def diffusers_unet_key_map(model_or_config: UNet | UNetConfig) -> dict[str, str]:
    """Our state-dict key -> the diffusers UNet2DConditionModel key, for every key of UNet(config).state_dict()."""
    model = model_or_config
    _check_exportable(model.config if isinstance(model, UNet) else model)
    if not isinstance(model, UNet):
        with torch.device("meta"):      # only the key names are needed: allocate nothing
            model = UNet(model_or_config)
    mapping = {}
    for key in model.state_dict():
        for pattern, rename in RULES:
            match = re.fullmatch(pattern, key)
            if match:
                mapping[key] = rename(match)
                break
        else:
            raise AssertionError(f"no diffusers name for the UNet key {key}")   # a module added without a rule
    return mapping


class _RenamedView:
    """The model's state dict under diffusers names, for hf_format.load_into: its missing / unexpected / shape
    messages then name the keys as they appear in the diffusers file."""

    def __init__(self, model: UNet, key_map: dict[str, str], copy: bool):
        self.model, self.key_map, self.copy = model, key_map, copy

    def state_dict(self) -> dict[str, torch.Tensor]:
        own = self.model.state_dict()
        return {theirs: own[ours] for ours, theirs in self.key_map.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        # Built on the meta device: assign the loaded tensors (in the model's dtype) instead of copying into them;
        # copy=True keeps the model from sharing memory with the caller's tensors.
        renamed = {ours: weights[theirs].to(own[ours].dtype, copy=self.copy) for ours, theirs in self.key_map.items()}
        self.model.load_state_dict(renamed, assign=True)


def unet_from_diffusers_state_dict(config: UNetConfig, weights: dict[str, torch.Tensor], source="weights",
                                   *, copy: bool = True) -> UNet:
    """Our UNet (float32) with the weights of a diffusers UNet2DConditionModel state dict (strict: every key, every
    shape). copy=False lets the model take over float32 tensors of `weights` instead of copying them."""
    _check_exportable(config)
    with torch.device("meta"):          # skip the random initialisation of up to a billion weights
        model = UNet(config)
    load_into(_RenamedView(model, diffusers_unet_key_map(model), copy), weights, source)
    # Every tensor must now be real; a buffer outside the state dict would still be on the meta device.
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "a UNet tensor was not loaded"
    return model.to(memory_format=torch.channels_last)


def unet_to_diffusers_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """The model's weights under diffusers UNet2DConditionModel names."""
    key_map = diffusers_unet_key_map(model)
    return {key_map[k]: v for k, v in model.state_dict().items()}


def load_diffusers_unet(folder: str | Path) -> UNet:
    """Our UNet (eval mode, float32) from a diffusers UNet2DConditionModel folder (config.json + weights),
    e.g. the unet/ folder of Stable Diffusion 1.5."""
    config, weights = read_component(folder)
    unet_config = unet_config_from_diffusers(config, Path(folder) / "config.json")
    return unet_from_diffusers_state_dict(unet_config, weights, folder, copy=False).eval()


def save_diffusers_unet(model: UNet, folder: str | Path) -> Path:
    """Write a diffusers UNet2DConditionModel folder (config.json + diffusion_pytorch_model.safetensors) that
    diffusers' from_pretrained and `load_diffusers_unet` read back; returns the folder."""
    folder = Path(folder).expanduser()
    config = unet_config_to_diffusers(model.config)
    weights = unet_to_diffusers_state_dict(model)
    save_weights(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    save_json(config, folder / "config.json")
    return folder


def sd_unet_config(version: str = "1.x", in_channels: int = 4) -> UNetConfig:
    """The exact U-Net of Stable Diffusion 1.x (860M weights; in_channels=9 for the inpainting model: latents,
    mask and masked-image latents) or 2.x (heads of 64 channels, linear projections, OpenCLIP's 1024-wide text)."""
    shared = dict(in_channels=in_channels, out_channels=4, base_channels=320, channel_mults=(1, 2, 4, 4),
                  num_res_blocks=2, attention_levels=(0, 1, 2), dropout=0.0, groups=32, transformer_depth=1,
                  time_conditioning="additive", norm_eps=1e-5)
    if version == "1.x":
        return UNetConfig(**shared, num_heads=8, context_dim=768, linear_projection=False)
    if version == "2.x":
        return UNetConfig(**shared, num_heads=(5, 10, 20, 20), context_dim=1024, linear_projection=True)
    raise NoisecraftError(f"unknown Stable Diffusion version {version!r}; use \"1.x\" or \"2.x\".")
