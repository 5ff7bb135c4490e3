"""Stable Diffusion 1.x single-file checkpoints (the original CompVis / latent-diffusion layout) and the diffusers
layout, translated both ways at the level of state dicts and config dicts.

One file holds the three networks of latent diffusion (Rombach et al. 2022, §3) under three prefixes:

    model.diffusion_model.*          the denoising U-Net ε_θ(z_t, t, τ(y))     (openaimodel.UNetModel)
    first_stage_model.*              the KL autoencoder E / D                    (autoencoder.AutoencoderKL)
    cond_stage_model.transformer.*   the CLIP text transformer τ                 (transformers' CLIPTextModel)

and carries no configuration, so the configuration is read off the tensor shapes. The key tables are not written
out by hand: `unet_ldm_key_map` and `vae_ldm_key_map` walk the architecture (levels, then blocks, then the
parameters of each block) and name every parameter in both layouts. The same walk, run on a config inferred from
the file, is the check that the file really has that architecture: any key left over or missing is an error.

What the file does not store, and is therefore a convention here (edit the returned config to change it; no tensor
shape depends on it): the number of attention heads (SD 1.x: 8 heads when the text width is 768; otherwise 64-wide
heads, or one head when the width is not a multiple of 64), GroupNorm group counts (32), the sample size (64
latents, i.e. 512 px), the prediction type (ε; SD 2.x 768-v files are v-prediction) and the latent scaling factor
(0.18215).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NoisecraftError
from ..io.checkpoint import load_torch, load_weights, save_torch, save_weights
from .diffusers_unet import WRITTEN_SETTINGS
from .hf_format import key_mismatch

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}

VAE_SCALING_FACTOR = 0.18215            # SD 1.x's scale_factor: unit variance of the latents
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WB = ("weight", "bias")



# --- reading and writing the file -------------------------------------------------------------------------------

def _sniff(path: Path) -> str:
    """"safetensors", "torch" (zip archive or legacy pickle) or "unknown", from the first bytes, not the name."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":     # torch.save's zip format / pickle protocol >= 2
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"                                  # u64 header length, then the JSON header
    return "unknown"


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded .ckpt: latent-diffusion's Lightning checkpoints nest them under "state_dict"
    beside entries such as global_step, which are not weights."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise NoisecraftError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors; it is not a "
                              f"Stable Diffusion checkpoint.")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise NoisecraftError(f"{path} holds no tensors; it is not a Stable Diffusion checkpoint.")
    return tensors


def _load_torch(path: Path):
    """load_torch, except that torch.load itself would read a file named .safetensors as safetensors whatever
    it holds, so a misnamed one is handed over as an open file (still weights_only=True)."""
    if path.suffix.lower() != ".safetensors":
        return load_torch(path)
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; all mean the same to a user
        raise NoisecraftError(f"{path} could not be loaded safely ({type(e).__name__}); it is damaged or holds "
                              f"objects other than tensors, so it was refused.") from None


def read_single_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or .ckpt file, whatever its name says (the content decides); a .ckpt is
    read with torch.load(weights_only=True), so a file that would run code is refused, never executed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NoisecraftError(f"{path} does not exist or is not a file; check the path.")
    kind = _sniff(path)
    if kind == "safetensors":
        return load_weights(path)
    if kind == "torch":
        return _unwrap(_load_torch(path), path)
    for load in (load_weights, _load_torch):   # no known header: try both before giving up
        try:
            return _unwrap(load(path), path)
        except NoisecraftError:
            pass
    raise NoisecraftError(f"{path} is neither a safetensors file nor a PyTorch checkpoint (it may be truncated or "
                          f"damaged); download it again.")


def _compact(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that each own their storage (views and shared storages are copied), so
    safetensors accepts them and torch.save does not write a larger storage behind a view."""
    out, seen = {}, set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise NoisecraftError(f"cannot write {k!r}: it is a {type(v).__name__}, not a tensor.")
        v = v.detach().cpu().contiguous()
        storage = v.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != v.numel() * v.element_size():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def write_single_file(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a single-file state dict atomically: safetensors for .safetensors, else (.ckpt, .pt, .pth, .bin)
    torch.save of {"state_dict": tensors}, the layout of latent diffusion's checkpoints."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise NoisecraftError(f"cannot tell the format of {path.name!r}; name the file .safetensors (recommended) "
                              f"or .ckpt.")
    tensors = _compact(tensors)
    if suffix == ".safetensors":
        return save_weights(tensors, path, metadata={"format": "pt"})
    return save_torch({"state_dict": tensors}, path)


# --- key tables, by walking the architecture --------------------------------------------------------------------

def _wb(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{p}": f"{theirs}.{p}" for p in WB}


def _unet_resnet(ours: str, theirs: str, c_in: int, c_out: int) -> dict[str, str]:
    """ResBlock: GroupNorm, SiLU, conv (in_layers.0/.2), time embedding (emb_layers.1), GroupNorm, SiLU, dropout,
    conv (out_layers.0/.3), and a 1×1 skip conv when the width changes."""
    parts = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
             ("norm2", "out_layers.0"), ("conv2", "out_layers.3")]
    if c_in != c_out:
        parts.append(("conv_shortcut", "skip_connection"))
    return {k: v for a, b in parts for k, v in _wb(f"{ours}.{a}", f"{theirs}.{b}").items()}


def _spatial_transformer(ours: str, theirs: str, depth: int) -> dict[str, str]:
    """SpatialTransformer (LDM §3.3): the two layouts use the same names below the block, so only the prefix moves.
    Per block: self-attention (attn1), cross-attention (attn2), GEGLU feed-forward; q/k/v carry no bias."""
    leaves = [f"{n}.{p}" for n in ("norm", "proj_in", "proj_out") for p in WB]
    for d in range(depth):
        block = f"transformer_blocks.{d}"
        leaves += [f"{block}.norm{i}.{p}" for i in (1, 2, 3) for p in WB]
        for attn in ("attn1", "attn2"):
            leaves += [f"{block}.{attn}.to_{x}.weight" for x in "qkv"] + [f"{block}.{attn}.to_out.0.{p}" for p in WB]
        leaves += [f"{block}.ff.net.0.proj.{p}" for p in WB] + [f"{block}.ff.net.2.{p}" for p in WB]
    return {f"{ours}.{leaf}": f"{theirs}.{leaf}" for leaf in leaves}


def _per_level(value, levels: int, name: str) -> list[int]:
    values = [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]
    if len(values) != levels:
        raise NoisecraftError(f"the U-Net config's {name} has {len(values)} entries for {levels} levels; give one "
                              f"per entry of block_out_channels.")
    return values


_UNSUPPORTED_UNET = {"class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
                     "encoder_hid_dim": None, "time_cond_proj_dim": None, "dual_cross_attention": False,
                     "only_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
                     "attention_type": "default", "conv_in_kernel": 3, "conv_out_kernel": 3}


def _check_unet_config(config: dict) -> None:
    for name, plain in _UNSUPPORTED_UNET.items():
        value = config.get(name, plain)
        if isinstance(plain, bool):
            used = any(value) if isinstance(value, (list, tuple)) else bool(value)
        else:
            used = value is not None and value != plain
        if used:
            raise NoisecraftError(f"the U-Net config sets {name}={config[name]!r}, which the Stable Diffusion 1.x "
                                  f"single-file layout cannot hold; only plain text-to-image U-Nets convert.")
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    for kind in (*config["down_block_types"], *config["up_block_types"]):
        if kind not in known:
            raise NoisecraftError(f"the U-Net config uses block type {kind!r}; the single-file layout knows only "
                                  f"{', '.join(sorted(known))}.")


def unet_ldm_key_map(unet_config: dict) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> original latent-diffusion key (without "model.diffusion_model.").

    The original numbers its blocks flat: input_blocks.0 is conv_in, then per level `layers_per_block` blocks
    [ResBlock (.0), SpatialTransformer (.1) where the level attends] and, except at the last level, a
    downsampler (input_blocks.k.0.op); middle_block.0/1/2 is Res, Transformer, Res; output_blocks run from the
    coarsest level up with layers_per_block + 1 blocks each (the extra one eats the skip of the downsampler),
    the upsampler sitting after the block's last module (output_blocks.k.1.conv, or .2.conv after attention).
    """
    _check_unet_config(unet_config)
    channels = [int(c) for c in unet_config["block_out_channels"]]
    levels, n = len(channels), int(unet_config.get("layers_per_block", 2))
    down_attn = [t.startswith("CrossAttn") for t in unet_config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]
    if len(down_attn) != levels or len(up_attn) != levels:
        raise NoisecraftError("the U-Net config needs one down and one up block type per entry of block_out_channels.")
    depth = _per_level(unet_config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    up_depth = unet_config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    up_depth = _per_level(up_depth, levels, "reverse_transformer_layers_per_block")

    m = {**_wb("time_embedding.linear_1", "time_embed.0"), **_wb("time_embedding.linear_2", "time_embed.2"),
         **_wb("conv_in", "input_blocks.0.0")}
    k = 1
    for level, c in enumerate(channels):
        for j in range(n):
            c_in = channels[level - 1] if level > 0 and j == 0 else c
            m.update(_unet_resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{k}.0", c_in, c))
            if down_attn[level]:
                m.update(_spatial_transformer(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{k}.1",
                                              depth[level]))
            k += 1
        if level < levels - 1:
            m.update(_wb(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{k}.0.op"))
            k += 1

    c = channels[-1]
    m.update(_unet_resnet("mid_block.resnets.0", "middle_block.0", c, c))
    m.update(_spatial_transformer("mid_block.attentions.0", "middle_block.1", depth[-1]))
    m.update(_unet_resnet("mid_block.resnets.1", "middle_block.2", c, c))

    rev = list(reversed(channels))
    k = 0
    for u, c in enumerate(rev):
        prev, skip_last = rev[max(u - 1, 0)], rev[min(u + 1, levels - 1)]
        for j in range(n + 1):
            # input = the previous block's output concatenated with a skip from the matching input block
            c_in = (prev if j == 0 else c) + (skip_last if j == n else c)
            m.update(_unet_resnet(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0", c_in, c))
            if up_attn[u]:
                m.update(_spatial_transformer(f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1", up_depth[u]))
            if j == n and u < levels - 1:
                m.update(_wb(f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{k}.{2 if up_attn[u] else 1}.conv"))
            k += 1
    m.update(_wb("conv_norm_out", "out.0"))
    m.update(_wb("conv_out", "out.2"))
    return m


def _vae_resnet(ours: str, theirs: str, c_in: int, c_out: int) -> dict[str, str]:
    parts = ["norm1", "conv1", "norm2", "conv2"]
    m = {k: v for p in parts for k, v in _wb(f"{ours}.{p}", f"{theirs}.{p}").items()}
    if c_in != c_out:
        m.update(_wb(f"{ours}.conv_shortcut", f"{theirs}.nin_shortcut"))
    return m


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_mid(side: str, c: int, attention: bool) -> dict[str, str]:
    m = {**_vae_resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", c, c),
         **_vae_resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", c, c)}
    if attention:
        for ours, theirs in VAE_ATTENTION.items():
            m.update(_wb(f"{side}.mid_block.attentions.0.{ours}", f"{side}.mid.attn_1.{theirs}"))
    return m


def vae_ldm_key_map(vae_config: dict) -> dict[str, str]:
    """diffusers AutoencoderKL key -> original key (without "first_stage_model.").

    Encoder: down.{i}.block.{j} (ResBlocks; nin_shortcut is the 1×1 skip), down.{i}.downsample.conv except at the
    last level, mid.block_1 / attn_1 / block_2, norm_out, conv_out. The decoder numbers its levels from the
    coarsest-but-one upwards the other way round: diffusers' up_blocks.{u} is up.{L-1-u}, with
    layers_per_block + 1 ResBlocks and an upsample.conv wherever diffusers has an upsampler.
    """
    channels = [int(c) for c in vae_config["block_out_channels"]]
    levels, n = len(channels), int(vae_config.get("layers_per_block", 1))
    attention = bool(vae_config.get("mid_block_add_attention", True))
    m = _wb("encoder.conv_in", "encoder.conv_in")
    for i, c in enumerate(channels):
        for j in range(n):
            c_in = channels[i - 1] if i > 0 and j == 0 else c
            m.update(_vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", c_in, c))
        if i < levels - 1:
            m.update(_wb(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    m.update(_vae_mid("encoder", channels[-1], attention))
    m.update({**_wb("encoder.conv_norm_out", "encoder.norm_out"), **_wb("encoder.conv_out", "encoder.conv_out")})
    if vae_config.get("use_quant_conv", True):
        m.update(_wb("quant_conv", "quant_conv"))
    if vae_config.get("use_post_quant_conv", True):
        m.update(_wb("post_quant_conv", "post_quant_conv"))
    m.update(_wb("decoder.conv_in", "decoder.conv_in"))
    m.update(_vae_mid("decoder", channels[-1], attention))
    rev = list(reversed(channels))
    for u, c in enumerate(rev):
        i = levels - 1 - u
        for j in range(n + 1):
            c_in = rev[max(u - 1, 0)] if j == 0 else c
            m.update(_vae_resnet(f"decoder.up_blocks.{u}.resnets.{j}", f"decoder.up.{i}.block.{j}", c_in, c))
        if u < levels - 1:
            m.update(_wb(f"decoder.up_blocks.{u}.upsamplers.0.conv", f"decoder.up.{i}.upsample.conv"))
    m.update({**_wb("decoder.conv_norm_out", "decoder.norm_out"), **_wb("decoder.conv_out", "decoder.conv_out")})
    return m


def _is_vae_attention_linear(key: str) -> bool:
    """The mid-block attention projections: Linear (C×C) in diffusers, 1×1 convs (C×C×1×1) in the original."""
    return ".mid_block.attentions.0." in key and key.endswith(".weight") and "group_norm" not in key


def _clip_keys(layers: int) -> set[str]:
    keys = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            *(f"text_model.final_layer_norm.{p}" for p in WB)}
    for i in range(layers):
        layer = f"text_model.encoder.layers.{i}"
        keys |= {f"{layer}.self_attn.{x}_proj.{p}" for x in ("q", "k", "v", "out") for p in WB}
        keys |= {f"{layer}.{part}.{p}" for part in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") for p in WB}
    return keys


# --- configs inferred from shapes -------------------------------------------------------------------------------

def _indices(keys, prefix: str) -> list[int]:
    """The integers i of all keys "prefix{i}.…", sorted."""
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys
                   if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()})


def _need(sd: dict, key: str, part: str) -> torch.Tensor:
    if key not in sd:
        raise NoisecraftError(f"the {part} of this checkpoint lacks {key}; it is not a Stable Diffusion 1.x/2.x "
                              f"{part}, or the file is incomplete.")
    return sd[key]


def _transformer_depth(keys, prefix: str) -> int:
    return len(_indices(keys, prefix + "transformer_blocks."))


def _infer_unet_config(sd: dict[str, torch.Tensor]) -> dict:
    """UNet2DConditionModel config from an original U-Net state dict (prefix removed)."""
    part = "U-Net"
    conv_in = _need(sd, "input_blocks.0.0.weight", part)
    conv_out = _need(sd, "out.2.weight", part)
    mid_attn = _need(sd, "middle_block.1.proj_in.weight", part)
    keys = list(sd)
    # Walk input_blocks: ResBlocks until a downsampler (k.0.op) closes a level.
    levels, current = [], []
    for k in _indices(keys, "input_blocks."):
        if k == 0:
            continue
        if f"input_blocks.{k}.0.op.weight" in sd:
            levels.append(current)
            current = []
            continue
        width = _need(sd, f"input_blocks.{k}.0.out_layers.3.weight", part).shape[0]
        attn = f"input_blocks.{k}.1.proj_in.weight" in sd
        depth = _transformer_depth(keys, f"input_blocks.{k}.1.") if attn else 0
        current.append((width, attn, depth))
    levels.append(current)
    n = len(levels[0])
    if n == 0 or any(len(level) != n or len(set(level)) != 1 for level in levels):
        raise NoisecraftError("this U-Net's input blocks do not form levels of equal, uniform blocks; it is not a "
                              "Stable Diffusion U-Net.")
    channels = [level[0][0] for level in levels]
    down_attn = [level[0][1] for level in levels]
    down_depth = [level[0][2] for level in levels]
    up_attn, up_depth = [], []
    for u in range(len(levels)):
        first = u * (n + 1)
        attn = f"output_blocks.{first}.1.proj_in.weight" in sd
        up_attn.append(attn)
        up_depth.append(_transformer_depth(keys, f"output_blocks.{first}.1.") if attn else 0)
    mid_depth = _transformer_depth(keys, "middle_block.1.")

    # diffusers takes the middle block's depth from the last level's entry; levels without attention are free.
    depth = [d or mid_depth for d in down_depth]
    depth[-1] = depth[-1] if down_attn[-1] else mid_depth
    attended = [d for d, a in zip(down_depth, down_attn) if a]
    if depth[-1] != mid_depth or [d for d in reversed(up_depth) if d] != attended:
        raise NoisecraftError("this U-Net's transformer depths differ between its input, middle and output blocks, "
                              "which the diffusers config cannot describe.")
    context = _need(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", part).shape[1]
    emb = _need(sd, "time_embed.0.weight", part).shape[0]
    time_proj = _need(sd, "input_blocks.1.0.emb_layers.1.weight", part).shape[0]

    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,                                   # not stored: SD 1.x's 512 px / 8
        "in_channels": int(conv_in.shape[1]),                # 4, or 9 for inpainting (latent + mask + masked latent)
        "out_channels": int(conv_out.shape[0]),
        "block_out_channels": channels,
        "layers_per_block": n,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "cross_attention_dim": int(context),
        "attention_head_dim": _unet_heads(channels, context),
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "use_linear_projection": mid_attn.ndim == 2,         # SD 2.x: Linear proj_in/out; SD 1.x: 1×1 conv
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        **WRITTEN_SETTINGS,                                     # upcast_attention is not stored (SD 2.1 sets it)
        # LDM's use_scale_shift_norm doubles the time projection (FiLM scale and shift)
        "resnet_time_scale_shift": "scale_shift" if time_proj == 2 * channels[0] else "default",
    }
    if emb != 4 * channels[0]:
        config["time_embedding_dim"] = int(emb)
    return config


def _unet_heads(channels: list[int], context: int):
    """Head counts (diffusers calls them attention_head_dim): not stored in the file, so the conventions of SD:
    8 heads for SD 1.x (768-wide CLIP text), 64-wide heads for SD 2.x; one head where neither divides."""
    if context == 768 and all(c % 8 == 0 for c in channels):
        return 8
    return [c // 64 if c % 64 == 0 else 1 for c in channels]


def _infer_vae_config(sd: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKL config from an original first-stage state dict (prefix removed)."""
    part = "VAE"
    conv_in = _need(sd, "encoder.conv_in.weight", part)
    levels = _indices(sd, "encoder.down.")
    if not levels:
        raise NoisecraftError("the VAE of this checkpoint has no encoder.down.* blocks; it is not a Stable "
                              "Diffusion KL autoencoder.")
    channels = [int(_need(sd, f"encoder.down.{i}.block.0.conv1.weight", part).shape[0]) for i in levels]
    post = sd.get("post_quant_conv.weight")
    latent = (post if post is not None else _need(sd, "decoder.conv_in.weight", part)).shape[1]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(_need(sd, "decoder.conv_out.weight", part).shape[0]),
        "latent_channels": int(latent),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(sd, "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "act_fn": "silu",
        "norm_num_groups": 32,                               # not stored; SD's value
        "sample_size": 512,
        "scaling_factor": VAE_SCALING_FACTOR,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": post is not None,
    }


def _infer_text_config(sd: dict[str, torch.Tensor]) -> dict:
    """transformers CLIPTextConfig dict from a text-encoder state dict with "text_model." keys."""
    part = "text encoder"
    tokens = _need(sd, "text_model.embeddings.token_embedding.weight", part)
    positions = _need(sd, "text_model.embeddings.position_embedding.weight", part)
    width = int(tokens.shape[1])
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(tokens.shape[0]),                  # 49408 for CLIP's BPE
        "hidden_size": width,
        "intermediate_size": int(_need(sd, "text_model.encoder.layers.0.mlp.fc1.weight", part).shape[0]),
        "num_hidden_layers": len(_indices(sd, "text_model.encoder.layers.")),
        "num_attention_heads": width // 64 if width % 64 == 0 else 1,   # not stored: CLIP's 64-wide heads
        "max_position_embeddings": int(positions.shape[0]),
        "projection_dim": width,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # SD 1.x's config (openai/clip-vit-large-patch14 before transformers PR #24773): eos_token_id 2 means
        # "pool at argmax(ids)", which is <|endoftext|>, the largest id.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


# --- the whole file ---------------------------------------------------------------------------------------------

def _check_layout(tensors: dict) -> None:
    """One sentence for files that are not SD 1.x single files, before any key is translated."""
    if not tensors:
        raise NoisecraftError("the checkpoint is empty; it is not a Stable Diffusion model.")
    keys = list(tensors)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders."):
        raise NoisecraftError("this looks like an SDXL checkpoint (conditioner.embedders.*); only Stable Diffusion "
                              "1.x single files convert.")
    if has("cond_stage_model.model."):
        raise NoisecraftError("this checkpoint's text encoder is OpenCLIP (cond_stage_model.model.*, as in Stable "
                              "Diffusion 2.x), which noisecraft cannot convert; use a Stable Diffusion 1.x file.")
    if has("text_encoders.") or has("model.diffusion_model.joint_blocks."):
        raise NoisecraftError("this looks like a Stable Diffusion 3 checkpoint; only Stable Diffusion 1.x single "
                              "files convert.")
    missing = [f"{name} ({prefix}*)" for name, prefix in PREFIXES.items() if not has(prefix)]
    if len(missing) == 3 and (has("down_blocks.") or has("unet.") or has("text_model.")):
        raise NoisecraftError("this looks like a diffusers-layout state dict, not an original single file; load "
                              "the diffusers folder instead.")
    if missing:
        hint = " (it holds only EMA weights, model_ema.*)" if not has(PREFIXES["unet"]) and has("model_ema.") else ""
        raise NoisecraftError(f"the checkpoint has no {' and no '.join(missing)}{hint}; a Stable Diffusion 1.x "
                              f"single file holds the U-Net, the VAE and the CLIP text encoder.")
    bad = next((k for k, v in tensors.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise NoisecraftError(f"checkpoint entry {bad!r} is a {type(tensors[bad]).__name__}, not a tensor.")


def _text_key(key: str) -> str:
    """Older files (transformers < 4.x) lack the "text_model." level; diffusers' text_encoder/ has it."""
    return key if key.startswith("text_model.") else "text_model." + key


def _translate(sd: dict[str, torch.Tensor], key_map: dict[str, str], part: str,
               source: str = "the architecture their shapes describe") -> dict[str, torch.Tensor]:
    """Rename sd's keys by key_map (old -> new), insisting that both sides match exactly."""
    mismatch = key_mismatch(key_map, sd)
    if mismatch:
        raise NoisecraftError(f"the {part} weights do not fit {source}: {mismatch}; it is not a "
                              f"Stable Diffusion {part} this converter knows.")
    return {key_map[k]: v for k, v in sd.items()}


def single_file_to_diffusers(tensors: dict[str, torch.Tensor]
                             ) -> dict[str, tuple[dict | None, dict[str, torch.Tensor]]]:
    """Split an original SD 1.x state dict into diffusers components, with configs inferred from the shapes:

        {"unet": (UNet2DConditionModel config, state dict), "vae": (AutoencoderKL config, state dict),
         "text_encoder": (CLIPTextConfig dict, state dict with "text_model." keys),
         "ignored": (None, {original key: tensor})}

    "ignored" holds what was dropped: the EMA copy (model_ema.*, latent diffusion's flattened names), the noise
    schedule buffers (betas, alphas_cumprod, ...; schedule.py recomputes them), the text encoder's position_ids
    buffer, the VAE's training loss (first_stage_model.loss.*) and any other key outside the three networks.
    Returned tensors may be views of the input ones.
    """
    _check_layout(tensors)
    parts = {name: {} for name in PREFIXES}
    ignored = {}
    for key, value in tensors.items():
        name = next((n for n, p in PREFIXES.items() if key.startswith(p)), None)
        rest = key[len(PREFIXES[name]):] if name else key
        if name is None or (name == "vae" and rest.startswith("loss.")) or \
                (name == "text_encoder" and rest.endswith("position_ids")):
            ignored[key] = value
        else:
            parts[name][_text_key(rest) if name == "text_encoder" else rest] = value

    unet_config = _infer_unet_config(parts["unet"])
    unet_map = {v: k for k, v in unet_ldm_key_map(unet_config).items()}
    unet = _translate(parts["unet"], unet_map, "U-Net")

    vae_config = _infer_vae_config(parts["vae"])
    vae_map = {v: k for k, v in vae_ldm_key_map(vae_config).items()}
    vae = _translate(parts["vae"], vae_map, "VAE")
    vae = {k: v[:, :, 0, 0] if _is_vae_attention_linear(k) and v.ndim == 4 else v for k, v in vae.items()}

    text_config = _infer_text_config(parts["text_encoder"])
    identity = {k: k for k in _clip_keys(text_config["num_hidden_layers"])}
    text = _translate(parts["text_encoder"], identity, "text encoder")
    return {"unet": (unet_config, unet), "vae": (vae_config, vae), "text_encoder": (text_config, text),
            "ignored": (None, ignored)}


def diffusers_to_single_file(unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor],
                             text_encoder: dict[str, torch.Tensor], unet_config: dict,
                             vae_config: dict) -> dict[str, torch.Tensor]:
    """One original-layout SD 1.x state dict from diffusers-layout components (the inverse of
    single_file_to_diffusers). The VAE's mid-block attention projections become 1×1 conv weights (C×C×1×1) and the
    text encoder gets "text_model." keys and its position_ids buffer, as SD's own files store them. The text
    encoder may come with or without the "text_model." level (transformers 5 drops it)."""
    out = {}
    unet_map = unet_ldm_key_map(unet_config)
    for key, value in _translate(unet, unet_map, "U-Net", "their config").items():
        out[PREFIXES["unet"] + key] = value
    vae = {k: v[:, :, None, None] if _is_vae_attention_linear(k) and v.ndim == 2 else v for k, v in vae.items()}
    for key, value in _translate(vae, vae_ldm_key_map(vae_config), "VAE", "their config").items():
        out[PREFIXES["vae"] + key] = value
    text = {_text_key(k): v for k, v in text_encoder.items() if not k.endswith("position_ids")}
    text_config = _infer_text_config(text)
    text = _translate(text, {k: k for k in _clip_keys(text_config["num_hidden_layers"])}, "text encoder")
    for key, value in text.items():
        out[PREFIXES["text_encoder"] + key] = value
    positions = text_config["max_position_embeddings"]
    out[PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out
