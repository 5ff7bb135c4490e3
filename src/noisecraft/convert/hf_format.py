"""Reading Hugging Face-format component folders (diffusers' AutoencoderKL, transformers' CLIPTextModel) into
noisecraft's own modules: translate config.json into our config, then load the weights by name.

Our VAE and CLIP text transformer use the same parameter names as those libraries, so no key table is needed;
only the configuration is translated. Weights come from safetensors when present, else from a .bin file through
torch.load(weights_only=True): nothing is unpickled. This is the first brick of loading Stable Diffusion 1.x
folders (vae/, text_encoder/).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NoisecraftError
from ..io.checkpoint import load_json, load_torch, load_weights, save_json, save_weights

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")


def read_component(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a diffusers / transformers component folder."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise NoisecraftError(f"{folder} has no config.json; pass a component folder saved by diffusers or "
                              f"transformers (e.g. the vae/ or text_encoder/ folder of a Stable Diffusion model).")
    config = load_json(folder / "config.json")
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            weights = load_weights(path) if path.suffix == ".safetensors" else load_torch(path)
            if not isinstance(weights, dict):
                raise NoisecraftError(f"{path} does not hold a dictionary of tensors; it is not a weights file.")
            return config, weights
    raise NoisecraftError(f"{folder} has no weights file (one of {', '.join(WEIGHT_FILES)}); the folder is "
                          f"incomplete.")


def key_mismatch(expected, got) -> str | None:
    """"2 missing (e.g. a, b); 1 unexpected (e.g. c) keys", or None when the two key sets are equal."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    return "; ".join(parts) + " keys" if parts else None


def load_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], source) -> torch.nn.Module:
    """load_state_dict(strict) with one clear sentence naming missing and unexpected keys."""
    own = module.state_dict()
    mismatch = key_mismatch(own, weights)
    if mismatch:
        raise NoisecraftError(f"the weights in {source} do not fit the model its config.json describes: "
                              f"{mismatch}; is it the right folder, or another architecture?")
    shapes = [k for k in own if tuple(own[k].shape) != tuple(weights[k].shape)]
    if shapes:
        k = shapes[0]
        raise NoisecraftError(f"the weights in {source} do not fit their config.json: {len(shapes)} tensors have "
                              f"other shapes (e.g. {k}: {tuple(weights[k].shape)} instead of {tuple(own[k].shape)}).")
    module.load_state_dict(weights)
    return module


def _require(config: dict, keys: tuple[str, ...], folder) -> None:
    absent = [k for k in keys if k not in config]
    if absent:
        raise NoisecraftError(f"{folder}/config.json lacks {', '.join(absent)}; it is not the expected component.")


def vae_from_diffusers(config: dict, weights: dict[str, torch.Tensor], source="the VAE"):
    """(AutoencoderKL, scaling_factor) from a diffusers AutoencoderKL config dict and state dict."""
    from ..models.vae import AutoencoderKL, VAEConfig
    _require(config, ("block_out_channels", "latent_channels"), source)
    if config.get("in_channels", 3) != config.get("out_channels", config.get("in_channels", 3)):
        raise NoisecraftError(f"{source}: a VAE with different input and output channels is not supported.")
    vae_config = VAEConfig(in_channels=int(config.get("in_channels", 3)),
                           latent_channels=int(config["latent_channels"]),
                           block_out_channels=tuple(config["block_out_channels"]),
                           layers_per_block=int(config.get("layers_per_block", 1)),
                           norm_groups=int(config.get("norm_num_groups", 32)),
                           mid_attention=bool(config.get("mid_block_add_attention", True)))
    vae = load_into(AutoencoderKL(vae_config), weights, source)
    return vae.eval(), float(config.get("scaling_factor") or 0.18215)


def load_diffusers_vae(folder: str | Path):
    """(AutoencoderKL, scaling_factor) from a diffusers AutoencoderKL folder (SD's vae/: scaling 0.18215)."""
    config, weights = read_component(folder)
    return vae_from_diffusers(config, weights, folder)


def vae_config_to_diffusers(vae_config, scaling_factor: float, sample_size: int | None = None) -> dict:
    """Our VAEConfig as the config.json of diffusers' AutoencoderKL."""
    levels = len(vae_config.block_out_channels)
    config = {"_class_name": "AutoencoderKL", "in_channels": vae_config.in_channels,
              "out_channels": vae_config.in_channels, "latent_channels": vae_config.latent_channels,
              "block_out_channels": list(vae_config.block_out_channels),
              "layers_per_block": vae_config.layers_per_block, "norm_num_groups": vae_config.norm_groups,
              "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "act_fn": "silu", "scaling_factor": float(scaling_factor),
              "mid_block_add_attention": vae_config.mid_attention}
    if sample_size is not None:
        config["sample_size"] = int(sample_size)
    return config


def save_diffusers_vae(vae, scaling_factor: float, folder: str | Path, sample_size: int | None = None) -> Path:
    """Write a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.contiguous() for k, v in vae.state_dict().items()},
                 folder / "diffusion_pytorch_model.safetensors")
    save_json(vae_config_to_diffusers(vae.config, scaling_factor, sample_size), folder / "config.json")
    return folder


def clip_text_from_transformers(config: dict, weights: dict[str, torch.Tensor], source="the text encoder"):
    """Our CLIPTextTransformer from a transformers CLIPTextModel config dict and state dict."""
    from ..models.clip import (
        CLIPTextConfig,
        CLIPTextTransformer,
        strip_text_model_prefix,
    )
    config = config.get("text_config", config)    # a whole CLIPModel's config nests the text part
    _require(config, ("hidden_size", "num_hidden_layers", "num_attention_heads"), source)
    eos = config.get("eos_token_id")
    if eos == 2:   # configs older than transformers PR #24773 (SD 1.x's): pool at argmax(ids) = <|endoftext|>
        eos = None
    text_config = CLIPTextConfig(vocab_size=int(config.get("vocab_size", 49408)),
                                 max_length=int(config.get("max_position_embeddings", 77)),
                                 width=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
                                 heads=int(config["num_attention_heads"]),
                                 intermediate_size=config.get("intermediate_size"),
                                 activation=config.get("hidden_act", "quick_gelu"),
                                 layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
                                 eos_token_id=eos)
    weights = {k: v for k, v in strip_text_model_prefix(weights).items()
               if k != "text_projection.weight" and not k.endswith("position_ids")}
    return load_into(CLIPTextTransformer(text_config), weights, source).eval()


def load_transformers_clip_text(folder: str | Path):
    """Our CLIPTextTransformer from a transformers CLIPTextModel folder (SD's text_encoder/)."""
    config, weights = read_component(folder)
    return clip_text_from_transformers(config, weights, folder)


def clip_text_config_to_transformers(text_config) -> dict:
    """Our CLIPTextConfig as the config.json of transformers' CLIPTextModel."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": text_config.vocab_size, "hidden_size": text_config.width,
            "intermediate_size": text_config.intermediate_size, "num_hidden_layers": text_config.layers,
            "num_attention_heads": text_config.heads, "max_position_embeddings": text_config.max_length,
            "hidden_act": text_config.activation, "layer_norm_eps": text_config.layer_norm_eps,
            "eos_token_id": text_config.eos_token_id, "bos_token_id": text_config.vocab_size - 2,
            "pad_token_id": 1, "torch_dtype": "float32"}


def save_transformers_clip_text(text_model, folder: str | Path) -> Path:
    """Write a transformers CLIPTextModel folder (config.json + model.safetensors, keys under text_model.)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {f"text_model.{k}": v.contiguous() for k, v in text_model.state_dict().items()}
    save_weights(weights, folder / "model.safetensors", metadata={"format": "pt"})
    save_json(clip_text_config_to_transformers(text_model.config), folder / "config.json")
    return folder
