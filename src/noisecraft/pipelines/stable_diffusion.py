"""Stable Diffusion 1.x checkpoints through noisecraft's own models, and back out again.

Stable Diffusion (Rombach et al. 2022) is a latent diffusion model like the ones `noisecraft train --latent` makes:
a U-Net denoising 4×(H/8)×(W/8) latents of a KL autoencoder, cross-attending to the 77×768 token embeddings of the
frozen CLIP ViT-L/14 text transformer, trained with ε-prediction on the scaled-linear schedule β ∈ [0.00085, 0.012].
So loading one is only a matter of reading its weights into our U-Net, AutoencoderKL and CLIPTextTransformer and
handing them to the same DiffusionPipeline that samples our own runs:

    pipe = load_pipeline("stable-diffusion-v1-5/")              # a diffusers folder, or
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors")     # the original single file
    images = pipe.sample(1, prompt="an astronaut riding a horse").images   # SD's defaults: LMS, 50 steps, w 7.5

Two layouts exist on disk. The diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, each with a
config.json) uses the parameter names our modules already have, up to a rename of the U-Net's keys
(io/diffusers_unet.py). The original single file holds all three networks under model.diffusion_model.*,
first_stage_model.* and cond_stage_model.transformer.*, with no config: io/sd_single_file.py translates its keys and
infers the configuration from the tensor shapes. `convert` writes either layout from either, and also exports our
own latent text-to-image runs to the diffusers layout, so diffusers' StableDiffusionPipeline runs them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import (
    DataConfig,
    DiffusionConfig,
    LatentConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
)
from ..errors import NoisecraftError
from ..io.checkpoint import load_json, save_json
from .defaults import STABLE_DIFFUSION, STABLE_DIFFUSION_SIZE
from .diffusion import DiffusionPipeline, parse_dtype

# What SD 1.x shipped: 1000 scaled-linear steps from β = 0.00085 to 0.012, ε-prediction.
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


# --- the scheduler config -------------------------------------------------------------------------

def diffusion_config_from_scheduler(config: dict, source="scheduler_config.json") -> DiffusionConfig:
    """A diffusers scheduler config (any scheduler class: they share the training-schedule keys) as our
    DiffusionConfig. Only the training schedule matters; the sampler is chosen at sampling time."""
    if config.get("trained_betas") is not None:
        raise NoisecraftError(f"{source} lists trained_betas; only named beta schedules (linear, scaled_linear, "
                              "squaredcos_cap_v2) are supported.")
    schedule = config.get("beta_schedule", "linear")
    prediction = config.get("prediction_type", "epsilon")
    if schedule not in _SCHEDULES:
        raise NoisecraftError(f"{source}: beta_schedule {schedule!r} is not supported; use one of "
                              f"{', '.join(_SCHEDULES)}.")
    if prediction not in _PREDICTIONS:
        raise NoisecraftError(f"{source}: prediction_type {prediction!r} is not supported; use one of "
                              f"{', '.join(_PREDICTIONS)}.")
    betas = {} if schedule == "squaredcos_cap_v2" else {"beta_start": float(config.get("beta_start", 0.0001)),
                                                         "beta_end": float(config.get("beta_end", 0.02))}
    return DiffusionConfig(schedule=_SCHEDULES[schedule], T=int(config.get("num_train_timesteps", 1000)),
                           prediction=_PREDICTIONS[prediction], min_snr_gamma=None, clip_x0=False,
                           sampling_sigma_max=None, **betas)    # Karras grids from σ(T), as diffusers draws them


def scheduler_config_from_diffusion(d: DiffusionConfig, clip_sample: bool = False) -> dict:
    """Our DiffusionConfig as the scheduler_config.json of diffusers' DDPMScheduler (defaults filled in)."""
    schedule = {v: k for k, v in _SCHEDULES.items()}[d.schedule]
    config = {"_class_name": "DDPMScheduler", "num_train_timesteps": d.T, "beta_schedule": schedule,
              "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[d.prediction],
              "clip_sample": bool(clip_sample), "set_alpha_to_one": False, "steps_offset": 0}
    if d.schedule != "cosine":
        defaults = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012)}[d.schedule]
        config["beta_start"] = d.beta_start if d.beta_start is not None else defaults[0]
        config["beta_end"] = d.beta_end if d.beta_end is not None else defaults[1]
    return config


# --- building a pipeline from loaded networks -----------------------------------------------------

def pipeline_from_components(unet, vae, scaling_factor: float, text_encoder, diffusion: DiffusionConfig,
                             image_size: int | None = None, device="cpu", name: str = "stable-diffusion"
                             ) -> DiffusionPipeline:
    """A DiffusionPipeline around loaded networks, with a RunConfig describing them. image_size: the default
    height and width (SD 1.x: 512; any multiple of 8 works at sampling time)."""
    f = vae.config.downsample_factor
    size = image_size or 64 * f
    if size % f:
        raise NoisecraftError(f"the default image size {size} must be a multiple of the VAE's factor {f}.")
    latent_channels = vae.config.latent_channels
    if unet.config.in_channels not in (latent_channels, 2 * latent_channels + 1):
        raise NoisecraftError(f"the U-Net reads {unet.config.in_channels} channels but the VAE makes "
                              f"{latent_channels}-channel latents; the components are from different models.")
    if unet.config.context_dim != text_encoder.dim:
        raise NoisecraftError(f"the U-Net cross-attends to {unet.config.context_dim}-wide text embeddings but the "
                              f"text encoder makes {text_encoder.dim}; the components are from different models.")
    config = RunConfig(model=unet.config, diffusion=diffusion, train=TrainConfig(),
                       data=DataConfig(dataset=name, image_shape=(vae.config.in_channels, size, size)),
                       latent=LatentConfig(scaling_factor=float(scaling_factor),
                                           latent_shape=(latent_channels, size // f, size // f)),
                       text=TextConfig(max_length=text_encoder.max_length, dim=text_encoder.dim))
    pipe = DiffusionPipeline(unet, config, device, vae=vae, scaling_factor=scaling_factor, text_encoder=text_encoder)
    pipe.defaults = STABLE_DIFFUSION      # LMS, 50 steps, guidance 7.5, linspace (pipelines/defaults.py)
    return pipe


def _clip_text_encoder(text_model, tokenizer):
    from ..models.clip import CLIPTextEncoder
    return CLIPTextEncoder(text_model.config, tokenizer, text_model=text_model).freeze()


def load_diffusers_folder(folder: str | Path, device="cpu") -> DiffusionPipeline:
    """A Stable Diffusion folder in the diffusers layout: unet/, vae/, text_encoder/, tokenizer/ and scheduler/."""
    from ..convert.diffusers_unet import load_diffusers_unet
    from ..convert.hf_format import load_diffusers_vae, load_transformers_clip_text
    from ..models.tokenizer import CLIPTokenizer
    folder = Path(folder).expanduser()
    missing = [part for part in ("unet", "vae", "text_encoder") if not (folder / part).is_dir()]
    if missing:
        raise NoisecraftError(f"{folder} lacks the component folder(s) {', '.join(missing)}; a Stable Diffusion "
                              "folder in the diffusers layout has unet/, vae/, text_encoder/, tokenizer/ and scheduler/.")
    unet = load_diffusers_unet(folder / "unet")
    vae, scaling = load_diffusers_vae(folder / "vae")
    text_model = load_transformers_clip_text(folder / "text_encoder")
    length = text_model.config.max_length
    tokenizer = (CLIPTokenizer.from_folder(folder / "tokenizer", max_length=length)
                 if (folder / "tokenizer").is_dir() else CLIPTokenizer.from_bpe_file(max_length=length))
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = load_json(scheduler_file) if scheduler_file.is_file() else SD_SCHEDULER
    unet_config = load_json(folder / "unet" / "config.json")
    sample_size = unet_config.get("sample_size")
    image_size = int(sample_size) * vae.config.downsample_factor if isinstance(sample_size, int) else None
    return pipeline_from_components(unet, vae, scaling, _clip_text_encoder(text_model, tokenizer),
                                    diffusion_config_from_scheduler(scheduler, scheduler_file),
                                    image_size=image_size, device=device, name=folder.name)


def load_single_file(path: str | Path, device="cpu", prediction: str = "epsilon", image_size: int = STABLE_DIFFUSION_SIZE,
                     config: str | Path | None = None) -> DiffusionPipeline:
    """An original Stable Diffusion 1.x checkpoint (.safetensors or .ckpt). The file has no configuration:
    the architecture is read off the tensor shapes, and what shapes cannot tell (head counts, GroupNorm groups)
    follows SD's conventions; the schedule is SD's. v-prediction models (SD 2.x 768-v) need
    prediction="v_prediction", since nothing in the file says so. For a model that departs from those
    conventions, `config` names a diffusers folder whose unet/, vae/, text_encoder/ config.json (and
    scheduler/, tokenizer/) are used instead (the weights must fit them)."""
    from ..convert.diffusers_unet import (
        unet_config_from_diffusers,
        unet_from_diffusers_state_dict,
    )
    from ..convert.hf_format import clip_text_from_transformers, vae_from_diffusers
    from ..convert.sd_single_file import read_single_file, single_file_to_diffusers
    from ..models.tokenizer import CLIPTokenizer
    path = Path(path).expanduser()
    parts = single_file_to_diffusers(read_single_file(path))
    scheduler = {**SD_SCHEDULER, "prediction_type": prediction}
    tokenizer_dir = None
    if config is not None:
        config = Path(config).expanduser()
        for part in ("unet", "vae", "text_encoder"):
            file = config / part / "config.json"
            if not file.is_file():
                raise NoisecraftError(f"the config folder {config} has no {part}/config.json; pass a Stable "
                                      "Diffusion folder in the diffusers layout.")
            parts[part] = (load_json(file), parts[part][1])
        if (config / "scheduler" / "scheduler_config.json").is_file():
            scheduler = load_json(config / "scheduler" / "scheduler_config.json")
        tokenizer_dir = config / "tokenizer" if (config / "tokenizer").is_dir() else None
    unet_config, unet_weights = parts["unet"]
    unet = unet_from_diffusers_state_dict(unet_config_from_diffusers(unet_config, path), unet_weights, path).eval()
    vae, scaling = vae_from_diffusers(*parts["vae"], source=path)
    if config is not None and isinstance(unet_config.get("sample_size"), int):
        image_size = unet_config["sample_size"] * vae.config.downsample_factor
    text_model = clip_text_from_transformers(*parts["text_encoder"], source=path)
    length = text_model.config.max_length
    tokenizer = (CLIPTokenizer.from_folder(tokenizer_dir, max_length=length) if tokenizer_dir is not None
                 else CLIPTokenizer.from_bpe_file(max_length=length))
    diffusion = diffusion_config_from_scheduler(scheduler)
    return pipeline_from_components(unet, vae, scaling, _clip_text_encoder(text_model, tokenizer), diffusion,
                                    image_size=image_size, device=device, name=path.stem)


def detect_format(path: str | Path) -> str:
    """"run" (a noisecraft run directory), "diffusers" (a diffusers folder) or "single-file"."""
    path = Path(path).expanduser()
    if path.is_file():
        return "single-file"
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
            return "diffusers"
        if (path / "config.json").is_file():
            return "run"
        raise NoisecraftError(f"{path} is neither a noisecraft run (it has no config.json) nor a Stable Diffusion "
                              "folder in the diffusers layout (model_index.json, unet/, vae/, ...).")
    raise NoisecraftError(f"{path} does not exist; pass a run directory, a diffusers folder or a .safetensors/.ckpt "
                          "file.")


def load_pipeline(path: str | Path, device="cpu", dtype=None, config: str | Path | None = None) -> DiffusionPipeline:
    """Whatever `path` holds, ready to sample: a noisecraft run, a diffusers SD folder or an SD single file.
    dtype: run the U-Net and text encoder in bfloat16/float16 (the VAE stays float32). config: for a single
    file, a diffusers folder with the configuration to use instead of SD's conventions (see load_single_file)."""
    kind = detect_format(path)
    if config is not None and kind != "single-file":
        raise NoisecraftError("a config folder only applies to single-file checkpoints (the others carry their "
                              "own configuration); leave it out.")
    if kind == "run":
        pipe = DiffusionPipeline.from_run(path, device=device)
    elif kind == "diffusers":
        pipe = load_diffusers_folder(path, device)
    else:
        pipe = load_single_file(path, device, config=config)
    if dtype is not None:
        pipe.set_precision(dtype)
    return pipe


# --- writing: diffusers folder and single file ---------------------------------------------------

def _exportable(pipe: DiffusionPipeline):
    """(U-Net, AutoencoderKL, CLIPTextEncoder) of a latent text-to-image pipeline, or a clear error."""
    from ..models.clip import CLIPTextEncoder
    from ..models.vae_tiling import TiledVAE
    if pipe.vae is None:
        raise NoisecraftError("only latent text-to-image models export to the Stable Diffusion layout; this is a "
                              "pixel-space model (train with --latent VAE_RUN).")
    if not isinstance(pipe.text_encoder, CLIPTextEncoder):
        raise NoisecraftError("only models conditioned on a CLIP text encoder export to the Stable Diffusion layout "
                              f"(this one uses {type(pipe.text_encoder).__name__}); train with --text-encoder "
                              "pointing at a train-clip run.")
    vae = pipe.vae.vae if isinstance(pipe.vae, TiledVAE) else pipe.vae
    return pipe.model, vae, pipe.text_encoder


def _float_weights(tensors: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    dtype = torch.float32 if dtype is None else parse_dtype(dtype)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def save_diffusers_pipeline(pipe: DiffusionPipeline, folder: str | Path, dtype=None) -> Path:
    """Write the pipeline's networks as a diffusers StableDiffusionPipeline folder (model_index.json, unet/,
    vae/, text_encoder/, tokenizer/, scheduler/), loadable by diffusers' from_pretrained and by load_pipeline."""
    from ..convert.diffusers_unet import (
        unet_config_to_diffusers,
        unet_to_diffusers_state_dict,
    )
    from ..convert.hf_format import (
        clip_text_config_to_transformers,
        vae_config_to_diffusers,
    )
    from ..io.checkpoint import save_weights
    unet, vae, text = _exportable(pipe)
    folder = Path(folder).expanduser()
    _, h, w = pipe.model_shape
    f = vae.config.downsample_factor
    parts = {
        "unet": (unet_to_diffusers_state_dict(unet), {**unet_config_to_diffusers(unet.config), "sample_size": h},
                 "diffusion_pytorch_model.safetensors"),
        "vae": (vae.state_dict(), vae_config_to_diffusers(vae.config, pipe.scaling_factor, h * f),
                "diffusion_pytorch_model.safetensors"),
        "text_encoder": ({f"text_model.{k}": v for k, v in text.text_model.state_dict().items()},
                         clip_text_config_to_transformers(text.text_model.config), "model.safetensors"),
    }
    for name, (weights, config, file) in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_weights(_float_weights(weights, dtype), folder / name / file, metadata={"format": "pt"})
        save_json(config, folder / name / "config.json")
    text.tokenizer.save(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    save_json(scheduler_config_from_diffusion(pipe.config.diffusion), folder / "scheduler" / "scheduler_config.json")
    # Written last: a folder with model_index.json is complete.
    save_json({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
               "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False},
              folder / "model_index.json")
    return folder


def save_single_file(pipe: DiffusionPipeline, path: str | Path, dtype=None) -> Path:
    """Write the pipeline's networks as one original-layout Stable Diffusion file (.safetensors or .ckpt)."""
    from ..convert.diffusers_unet import (
        unet_config_to_diffusers,
        unet_to_diffusers_state_dict,
    )
    from ..convert.hf_format import vae_config_to_diffusers
    from ..convert.sd_single_file import diffusers_to_single_file, write_single_file
    unet, vae, text = _exportable(pipe)
    tensors = diffusers_to_single_file(
        unet_to_diffusers_state_dict(unet), vae.state_dict(),
        {f"text_model.{k}": v for k, v in text.text_model.state_dict().items()},
        unet_config_to_diffusers(unet.config), vae_config_to_diffusers(vae.config, pipe.scaling_factor))
    return write_single_file(_float_weights(tensors, dtype), path)


def convert(source: str | Path, target: str | Path, to: str | None = None, dtype=None,
            config: str | Path | None = None) -> Path:
    """Read `source` (noisecraft run, diffusers folder or single file) and write `target` in the layout `to`
    ("diffusers" or "single-file"; default: single-file when target ends in .safetensors/.ckpt, else diffusers).
    config: for a single-file source, the diffusers folder whose configuration to use (see load_single_file)."""
    target = Path(target).expanduser()
    if to is None:
        to = "single-file" if target.suffix in SINGLE_FILE_SUFFIXES else "diffusers"
    if to not in ("diffusers", "single-file"):
        raise NoisecraftError(f"unknown target layout {to!r}; use diffusers or single-file.")
    if Path(source).expanduser().resolve() == target.resolve():
        raise NoisecraftError("the target is the source itself; write the conversion somewhere else.")
    if to == "diffusers" and target.exists() and not target.is_dir():
        raise NoisecraftError(f"{target} is a file; a diffusers layout is a folder, so give a folder path.")
    if to == "single-file" and target.suffix not in SINGLE_FILE_SUFFIXES:
        raise NoisecraftError(f"a single-file checkpoint needs a .safetensors or .ckpt name, got {target.name!r}.")
    pipe = load_pipeline(source, config=config)
    if to == "diffusers":
        return save_diffusers_pipeline(pipe, target, dtype)
    return save_single_file(pipe, target, dtype)
