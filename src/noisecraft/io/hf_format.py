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
from .checkpoint import load_json, load_torch, load_weights

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


def load_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], source) -> torch.nn.Module:
    """load_state_dict(strict) with one clear sentence naming missing and unexpected keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise NoisecraftError(f"the weights in {source} do not fit the model its config.json describes: "
                              f"{'; '.join(parts)} keys; is it the right folder, or another architecture?")
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


def load_diffusers_vae(folder: str | Path):
    """(AutoencoderKL, scaling_factor) from a diffusers AutoencoderKL folder (SD's vae/: scaling 0.18215)."""
    from ..models.vae import AutoencoderKL, VAEConfig
    config, weights = read_component(folder)
    _require(config, ("block_out_channels", "latent_channels"), folder)
    if config.get("in_channels", 3) != config.get("out_channels", config.get("in_channels", 3)):
        raise NoisecraftError(f"{folder}: a VAE with different input and output channels is not supported.")
    vae_config = VAEConfig(in_channels=int(config.get("in_channels", 3)),
                           latent_channels=int(config["latent_channels"]),
                           block_out_channels=tuple(config["block_out_channels"]),
                           layers_per_block=int(config.get("layers_per_block", 1)),
                           norm_groups=int(config.get("norm_num_groups", 32)),
                           mid_attention=bool(config.get("mid_block_add_attention", True)))
    vae = load_into(AutoencoderKL(vae_config), weights, folder)
    return vae.eval(), float(config.get("scaling_factor", 0.18215))


def load_transformers_clip_text(folder: str | Path):
    """Our CLIPTextTransformer from a transformers CLIPTextModel folder (SD's text_encoder/)."""
    from ..models.clip import CLIPTextConfig, CLIPTextTransformer, strip_text_model_prefix
    config, weights = read_component(folder)
    config = config.get("text_config", config)    # a whole CLIPModel's config nests the text part
    _require(config, ("hidden_size", "num_hidden_layers", "num_attention_heads"), folder)
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
    weights = {k: v for k, v in strip_text_model_prefix(weights).items() if k != "text_projection.weight"}
    return load_into(CLIPTextTransformer(text_config), weights, folder).eval()
