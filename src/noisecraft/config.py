"""Run configuration: everything needed to rebuild the model and schedule, and to continue training.

A run directory's config.json holds {"model": ..., "diffusion": ..., "train": ..., "data": ...}, and for latent
and text-conditional runs also "latent" (the VAE's scaling factor and latent shape; the VAE itself is copied into
the run's vae/ folder) and "text" (the context length and width of the frozen text encoder in text_encoder/).
Each part is a dataclass here: its fields with a default and a comment each, then RULES, the table of the values each
field may take, which settings.check_fields checks (unknown keys and wrong values fail with one clear sentence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .denoiser import EDM_SIGMA_DATA, PREDICTION_TYPES
from .errors import NoisecraftError, short_repr as _short
from .io.checkpoint import load_json
from .losses import EDM_P_MEAN, EDM_P_STD, LOSSES
from .models.unet import UNetConfig
from .schedule import BETA_SCHEDULES, EDM_SIGMA_MAX, MAX_T, NoiseSchedule
from .settings import check_fields, settings_from_dict, settings_to_dict

CONFIG_VERSION = 1
DEFAULT_MINUTES = 20.0   # the training budget when neither steps nor minutes is given
MAX_TEXT_LENGTH = 65_536
MAX_TEXT_DIM = 65_536
TIMESTEP_SAMPLING = ("uniform", "importance")


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"          # beta schedule: linear, scaled_linear or cosine
    T: int = 1000                     # diffusion steps
    prediction: str = "eps"           # what the network predicts: eps, x0 or v
    min_snr_gamma: float | None = 5.0   # Min-SNR-γ loss weighting (Hang et al. 2023); None or 0: off
    clip_x0: bool = True              # clamp x̂0 to the data range while sampling
    beta_start: float | None = None   # None: the schedule's own default (linear 1e-4, scaled_linear 0.00085)
    beta_end: float | None = None     # None: linear 0.02, scaled_linear 0.012
    learn_sigma: bool = False         # improved DDPM: the U-Net also outputs the reverse variance (2C channels)
    loss: str = "simple"              # "simple" (L_simple), "hybrid" (L_simple + λ·L_vlb) or "vlb"
    vlb_weight: float = 0.001         # λ of the hybrid loss
    timestep_sampling: str = "uniform"   # "uniform" or "importance" (p_t ∝ sqrt(E[L_t²]), for loss "vlb")
    sigma_data: float = EDM_SIGMA_DATA   # prediction "edm": σ_d, the data's standard deviation
    p_mean: float = EDM_P_MEAN        # prediction "edm": training σ's are log-normal, ln σ ~ N(p_mean, p_std²)
    p_std: float = EDM_P_STD
    sampling_sigma_max: float | None = EDM_SIGMA_MAX   # Karras and nested σ grids start at min(σ(T), this); None: σ(T)

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("schedule", "str", BETA_SCHEDULES, False),
        ("T", "int", f"[2, {MAX_T}]", False),
        ("prediction", "str", PREDICTION_TYPES, False),
        ("min_snr_gamma", "float", "[0, inf)", True),
        ("clip_x0", "bool", None, False),
        ("beta_start", "float", "[0, 1]", True),
        ("beta_end", "float", "[0, 1]", True),
        ("learn_sigma", "bool", None, False),
        ("loss", "str", LOSSES, False),
        ("vlb_weight", "float", "[0, inf)", False),
        ("timestep_sampling", "str", TIMESTEP_SAMPLING, False),
        ("sigma_data", "float", "[1e-6, 1e6]", False),
        ("p_mean", "float", "[-20, 20]", False),
        ("p_std", "float", "[0, 20]", False),
        ("sampling_sigma_max", "float", "[1e-3, 1e9]", True),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "diffusion")
        if self.beta_start is not None and self.beta_end is not None and not self.beta_start < self.beta_end:
            raise NoisecraftError(f"diffusion.beta_start ({self.beta_start}) must be below diffusion.beta_end "
                                  f"({self.beta_end}).")
        if self.learn_sigma and self.loss == "simple":
            raise NoisecraftError("a learned variance is trained only by the bound: use loss 'hybrid' or 'vlb' "
                                  "with learn_sigma (--loss hybrid).")
        if self.loss == "hybrid" and not self.learn_sigma:
            raise NoisecraftError("the hybrid loss trains a learned variance, so it needs learn_sigma "
                                  "(--learn-sigma); use loss 'simple' or 'vlb' without it.")
        if self.edm:
            clash = [name for name, bad in (("schedule", self.schedule != "edm"), ("loss", self.loss != "simple"),
                                            ("learn_sigma", self.learn_sigma), ("min_snr_gamma", self.min_snr_gamma),
                                            ("timestep_sampling", self.timestep_sampling != "uniform")) if bad]
            if clash:
                raise NoisecraftError(f"EDM preconditioning brings its own noise levels and loss weight, so "
                                      f"diffusion.{', '.join(clash)} cannot be set with it; leave them at the "
                                      f"defaults of --preconditioning edm (schedule edm, loss simple).")

    @property
    def edm(self) -> bool:
        """Whether the network is EDM-preconditioned (Karras et al. 2022): trained on log-normal σ's."""
        return self.prediction == "edm"

    def make_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.create(self.schedule, self.T, self.beta_start, self.beta_end)


@dataclass
class TrainConfig:
    batch_size: int = 64
    lr: float = 2e-3                  # AdamW's peak learning rate
    warmup_steps: int = 200           # linear warm-up to lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0            # gradient norm clipping
    ema_decay: float = 0.999          # the sampling weights are an exponential moving average
    steps: int | None = None          # total optimizer steps (a budget; with minutes, whichever comes first)
    minutes: float | None = None      # wall-clock budget for this invocation
    seed: int = 0
    label_dropout: float = 0.1        # classifier-free guidance: share of labels replaced by the null label
    sample_every: int = 1000          # write a sample grid every N steps (0: never)
    checkpoint_every: int = 500       # write a checkpoint every N steps (and always at the end)
    log_every: int = 25               # CSV log interval in steps

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("batch_size", "int", "[1, inf)", False),
        ("lr", "float", "[0, inf)", False),
        ("warmup_steps", "int", "[0, inf)", False),
        ("weight_decay", "float", "[0, inf)", False),
        ("grad_clip", "float", "[0, inf)", False),
        ("ema_decay", "float", "[0, 1]", False),
        ("steps", "int", "[1, inf)", True),
        ("minutes", "float", "[0, inf)", True),
        ("seed", "int", "[0, inf)", False),
        ("label_dropout", "float", "[0, 1]", False),
        ("sample_every", "int", "[0, inf)", False),
        ("checkpoint_every", "int", "[0, inf)", False),
        ("log_every", "int", "[0, inf)", False),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "train")


@dataclass
class DataConfig:
    dataset: str = "digits"           # a built-in name (mnist, fashion-mnist, cifar10, digits) or folder:PATH
    image_shape: tuple[int, int, int] = (1, 16, 16)   # (C, H, W)
    class_names: list[str] = field(default_factory=list)
    conditional: bool = False         # class-conditional training
    shards: str | None = None         # streamed from this shard folder (data/sources.py) instead of held in memory
    shards_fingerprint: str | None = None   # sha256 over the shards' names, counts and checksums: --resume checks it
    latents: str | None = None        # the shards' latent cache (noisecraft encode), read instead of encoding on the fly
    text_cache: str | None = None     # the shards' caption-embedding cache (noisecraft encode --text-encoder)
    hflip: bool = False               # mirror half of each batch left-right (photos; pixel runs only)

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("dataset", "str", None, False),
        ("image_shape", "shape", None, False),
        ("class_names", "strs", None, False),
        ("conditional", "bool", None, False),
        ("shards", "str", None, True),
        ("shards_fingerprint", "str", None, True),
        ("latents", "str", None, True),
        ("text_cache", "str", None, True),
        ("hflip", "bool", None, False),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "data")


@dataclass
class LatentConfig:
    """Latent diffusion (Rombach et al. 2022): the U-Net denoises z = scaling_factor · E(x), a VAE latent."""

    scaling_factor: float = 1.0
    latent_shape: tuple[int, int, int] = (4, 7, 7)

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("scaling_factor", "float", "[1e-8, inf)", False),
        ("latent_shape", "shape", None, False),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "latent")


@dataclass
class TextConfig:
    """Text conditioning: the frozen encoder's token embeddings (max_length × dim) are the cross-attention context;
    train.label_dropout is then the caption dropout (the empty prompt stands for "no caption")."""

    max_length: int = 77
    dim: int = 768

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("max_length", "int", f"[1, {MAX_TEXT_LENGTH}]", False),
        ("dim", "int", f"[1, {MAX_TEXT_DIM}]", False),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "text")


@dataclass
class DistillationConfig:
    """A distilled student. method "progressive" (Salimans & Ho 2022; training/distill.py): it samples in `steps`
    deterministic steps on the σ's of spacing "nested", each trained to match two steps of its teacher. method
    "consistency" (Song et al. 2023; training/consistency.py): a consistency model that samples in any number of
    steps, `steps` by default, with the multistep consistency sampler on the same nested σ's."""

    steps: int = 4                    # the sampling steps this student was trained for (consistency: its default)
    teacher: str = ""                 # the run it was distilled from (as given to noisecraft distill)
    teacher_steps: int = 16           # the first teacher's steps (its sampler: heun); consistency: the σ grid's N
    iterations: int = 0               # optimizer steps per halving (consistency: in all)
    method: str = "progressive"       # progressive | consistency (configs written before consistency: progressive)

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("steps", "int", "[1, 4096]", False),
        ("teacher", "str", None, False),
        ("teacher_steps", "int", "[2, 4096]", False),
        ("iterations", "int", "[0, inf)", False),
        ("method", "str", ("progressive", "consistency"), False),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "distillation")


@dataclass
class RunConfig:
    model: UNetConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    data: DataConfig
    latent: LatentConfig | None = None
    text: TextConfig | None = None
    distillation: DistillationConfig | None = None

    def __post_init__(self):
        c = self.model.in_channels
        if self.diffusion.learn_sigma and self.model.out_channels != 2 * c:
            raise NoisecraftError(f"learn_sigma needs a U-Net with out_channels = 2 × in_channels = {2 * c}, got "
                                  f"{self.model.out_channels}; set model.out_channels to {2 * c}.")
        # The sections must describe one model: a mismatch would only surface as a shape error deep in a run.
        channels = self.model_shape[0]
        # (Stable Diffusion's inpainting U-Net also reads the masked image's latent and the mask: 2C + 1.)
        readable = (channels, 2 * channels + 1) if self.latent is not None else (channels,)
        if c not in readable:
            raise NoisecraftError(f"model.in_channels is {c} but the {'latents' if self.latent else 'images'} have "
                                  f"{channels} channels; the config is inconsistent, restore it or retrain.")
        if self.text is not None and self.model.context_dim != self.text.dim:
            raise NoisecraftError(f"model.context_dim ({self.model.context_dim}) must equal text.dim "
                                  f"({self.text.dim}); the config is inconsistent, restore it or retrain.")
        if self.data.conditional and self.model.num_classes < 1:
            raise NoisecraftError("data.conditional is true but model.num_classes is 0; a class-conditional model "
                                  "needs a dataset with labels (for a folder: one sub-folder per class).")

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """The shape the U-Net denoises: the image's, or the latent's in a latent run."""
        return tuple(self.latent.latent_shape) if self.latent else tuple(self.data.image_shape)

    def to_dict(self) -> dict:
        d = {
            "version": CONFIG_VERSION,
            "model": self.model.to_dict(),
            "diffusion": settings_to_dict(self.diffusion),
            "train": settings_to_dict(self.train),
            "data": settings_to_dict(self.data),
        }
        for name in ("latent", "text", "distillation"):
            if getattr(self, name) is not None:
                d[name] = settings_to_dict(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        if not isinstance(data, dict):
            raise NoisecraftError("config.json must hold a JSON object; restore it from the run or retrain.")
        version = data.get("version", CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version > CONFIG_VERSION:
            raise NoisecraftError(f"config.json has version {_short(version)}, which this noisecraft "
                                  f"(version {CONFIG_VERSION} configs) cannot read; upgrade noisecraft or retrain.")
        missing = [k for k in ("model", "diffusion", "train", "data") if k not in data]
        if missing:
            raise NoisecraftError(f"config.json lacks the sections {missing}; it was not written by noisecraft train.")
        unknown = sorted(set(data) - {"version", "model", "diffusion", "train", "data", "latent", "text",
                                      "distillation"})
        if unknown:
            raise NoisecraftError(f"unknown sections {unknown} in config.json; remove them.")
        optional = {name: settings_from_dict(kind, data[name], name) if data.get(name) is not None else None
                    for name, kind in (("latent", LatentConfig), ("text", TextConfig),
                                       ("distillation", DistillationConfig))}
        return cls(model=UNetConfig.from_dict(data["model"]),
                   diffusion=settings_from_dict(DiffusionConfig, data["diffusion"], "diffusion"),
                   train=settings_from_dict(TrainConfig, data["train"], "train"),
                   data=settings_from_dict(DataConfig, data["data"], "data"), **optional)


def default_model_config(image_shape: tuple[int, int, int], num_classes: int = 0) -> UNetConfig:
    """A U-Net sized for the image: three levels (full, 1/2, 1/4) with attention at the coarsest, a fourth
    level for images of 64 px and more. 28×28 MNIST runs at 28, 14 and 7."""
    c, h, w = image_shape
    mults = (1, 2, 2) if min(h, w) < 64 else (1, 2, 2, 4)
    levels = len(mults)
    # One ResBlock per level and no dropout: on a CPU budget the model is far from overfitting, and in
    # 4 MNIST minutes this beat two blocks per level (domain score 99 vs 164; see the issue notes).
    return UNetConfig(in_channels=c, base_channels=32, channel_mults=mults, num_res_blocks=1,
                      attention_levels=(levels - 1,), dropout=0.0, num_classes=num_classes)


def default_latent_model_config(latent_shape: tuple[int, int, int], num_classes: int = 0,
                                context_dim: int | None = None) -> UNetConfig:
    """A U-Net for small VAE latents (e.g. 4×7×7 for 28×28 images): wider than the pixel one, since each latent
    "pixel" carries a 4×4 patch, with attention (self- and, for text, cross-attention) at every level. Latents
    whose sides are odd cannot be halved, so those get a single level: at 7×7, self-attention already sees the
    whole latent."""
    c, h, w = latent_shape
    mults = (1, 2) if h % 2 == 0 and w % 2 == 0 and min(h, w) >= 8 else (1,)
    return UNetConfig(in_channels=c, base_channels=64, channel_mults=mults, num_res_blocks=2,
                      attention_levels=tuple(range(len(mults))), head_dim=32, dropout=0.0, num_classes=num_classes,
                      context_dim=context_dim)


def make_run_config(dataset, conditional: bool = False, model: dict | None = None, diffusion: dict | None = None,
                    train: dict | None = None, latent: LatentConfig | None = None,
                    text: TextConfig | None = None) -> RunConfig:
    """The default RunConfig for a dataset, with optional overrides per section (None values are ignored).
    `latent` makes it a latent run (the U-Net sees latent_shape), `text` a text-conditional one."""
    drop_none = lambda d: {k: v for k, v in (d or {}).items() if v is not None}
    num_classes = dataset.num_classes if conditional else 0
    context_dim = text.dim if text is not None else None
    if latent is not None:
        base = default_latent_model_config(tuple(latent.latent_shape), num_classes, context_dim)
    else:
        base = default_model_config(tuple(dataset.image_shape), num_classes)
        base.context_dim = context_dim
    model_kw = {**base.to_dict(), **drop_none(model)}
    diffusion = drop_none(diffusion)
    if diffusion.get("prediction") == "edm":   # EDM's own noise levels and loss weight (DiffusionConfig.edm)
        edm = {"schedule": "edm", "min_snr_gamma": None}
        if latent is not None:
            # latents are scaled to unit variance: σ_d = 1, and P_mean moved by ln 2 so that σ/σ_d keeps the
            # distribution EDM found for pixels (σ_d = 0.5)
            edm |= {"sigma_data": 1.0, "p_mean": round(EDM_P_MEAN + math.log(2), 4)}
        diffusion = {**edm, **diffusion}
    if (diffusion or {}).get("learn_sigma"):     # improved DDPM: C more output channels for the variance
        model_kw["out_channels"] = 2 * model_kw["in_channels"]
    if model and model.get("channel_mults") and not model.get("attention_levels"):
        model_kw["attention_levels"] = (len(model_kw["channel_mults"]) - 1,)
    train_kw = drop_none(train)
    if train_kw.get("steps") is None and train_kw.get("minutes") is None:
        train_kw["minutes"] = DEFAULT_MINUTES
    return RunConfig(
        model=UNetConfig(**model_kw),
        diffusion=DiffusionConfig(**diffusion),
        train=TrainConfig(**train_kw),
        data=DataConfig(dataset=dataset.name, image_shape=tuple(dataset.image_shape),
                        class_names=list(dataset.class_names), conditional=bool(conditional)),
        latent=latent,
        text=text,
    )


def load_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise NoisecraftError(f"{run_dir} is not a noisecraft run directory (no config.json); pass the folder "
                              f"given to `noisecraft train --out`.")
    return RunConfig.from_dict(load_json(run_dir / "config.json"))

