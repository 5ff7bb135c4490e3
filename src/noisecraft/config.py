"""Run configuration: everything needed to rebuild the model and schedule, and to continue training.

A run directory's config.json holds {"model": ..., "diffusion": ..., "train": ..., "data": ...}, and for latent
and text-conditional runs also "latent" (the VAE's scaling factor and latent shape; the VAE itself is copied into
the run's vae/ folder) and "text" (the context length and width of the frozen text encoder in text_encoder/).
Each part is a dataclass here whose from_dict rejects unknown keys and wrong types with one clear sentence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .denoiser import PREDICTION_TYPES, check_prediction_type
from .errors import NoisecraftError, brief, short_repr as _short
from .io.checkpoint import load_json
from .losses import LOSSES
from .models.unet import UNetConfig
from .schedule import BETA_SCHEDULES, MAX_T, NoiseSchedule
from .settings import check_choice, check_number, check_shape

CONFIG_VERSION = 1
DEFAULT_MINUTES = 20.0   # the training budget when neither steps nor minutes is given


def _from_dict(cls, data: Any, section: str):
    if not isinstance(data, dict):
        raise NoisecraftError(f"config section '{section}' must be a JSON object, got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise NoisecraftError(f"unknown settings {unknown} in config section '{section}'; remove them.")
    try:
        return cls(**data)
    except TypeError as e:
        raise NoisecraftError(f"config section '{section}' is invalid ({brief(e)}); "
                              "fix or delete the config.") from None



MAX_TEXT_LENGTH = 65_536
MAX_TEXT_DIM = 65_536



@dataclass
class DiffusionConfig:
    schedule: str = "cosine"
    T: int = 1000
    prediction: str = "eps"
    min_snr_gamma: float | None = 5.0
    clip_x0: bool = True   # clamp x̂0 to the data range while sampling
    beta_start: float | None = None   # None: the schedule's own default (linear 1e-4, scaled_linear 0.00085)
    beta_end: float | None = None     # None: linear 0.02, scaled_linear 0.012
    learn_sigma: bool = False         # improved DDPM: the U-Net also outputs the reverse variance (2C channels)
    loss: str = "simple"              # "simple" (L_simple), "hybrid" (L_simple + λ·L_vlb) or "vlb"
    vlb_weight: float = 0.001         # λ of the hybrid loss
    timestep_sampling: str = "uniform"   # "uniform" or "importance" (p_t ∝ sqrt(E[L_t²]), for loss "vlb")

    def __post_init__(self):
        if not isinstance(self.schedule, str) or self.schedule not in BETA_SCHEDULES:
            raise NoisecraftError(f"unknown beta schedule {_short(self.schedule)}; choose one of "
                                  f"{', '.join(BETA_SCHEDULES)}.")
        check_number("diffusion", "T", self.T, lo=2, hi=MAX_T, integer=True)
        check_choice("diffusion", "prediction", self.prediction, PREDICTION_TYPES)
        check_prediction_type(self.prediction)
        check_number("diffusion", "min_snr_gamma", self.min_snr_gamma, lo=0, allow_none=True)
        check_number("diffusion", "beta_start", self.beta_start, lo=0, hi=1, allow_none=True)
        check_number("diffusion", "beta_end", self.beta_end, lo=0, hi=1, allow_none=True)
        if not isinstance(self.learn_sigma, bool):
            raise NoisecraftError(f"diffusion.learn_sigma must be true or false, got {self.learn_sigma!r}.")
        if not isinstance(self.clip_x0, bool):
            raise NoisecraftError(f"diffusion.clip_x0 must be true or false, got {_short(self.clip_x0)}.")
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise NoisecraftError(f"unknown loss {_short(self.loss)}; choose one of {', '.join(LOSSES)}.")
        check_number("diffusion", "vlb_weight", self.vlb_weight, lo=0)
        if not isinstance(self.timestep_sampling, str) or self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise NoisecraftError(f"unknown timestep sampling {_short(self.timestep_sampling)}; choose one of "
                                  f"{', '.join(TIMESTEP_SAMPLING)}.")
        if self.beta_start is not None and self.beta_end is not None and not self.beta_start < self.beta_end:
            raise NoisecraftError(f"diffusion.beta_start ({self.beta_start}) must be below diffusion.beta_end "
                                  f"({self.beta_end}).")
        if self.learn_sigma and self.loss == "simple":
            raise NoisecraftError("a learned variance is trained only by the bound: use loss 'hybrid' or 'vlb' "
                                  "with learn_sigma (--loss hybrid).")
        if self.loss == "hybrid" and not self.learn_sigma:
            raise NoisecraftError("the hybrid loss trains a learned variance, so it needs learn_sigma "
                                  "(--learn-sigma); use loss 'simple' or 'vlb' without it.")

    def make_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.create(self.schedule, self.T, self.beta_start, self.beta_end)


@dataclass
class TrainConfig:
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    steps: int | None = None          # total optimizer steps (a budget; with minutes, whichever comes first)
    minutes: float | None = None      # wall-clock budget for this invocation
    seed: int = 0
    label_dropout: float = 0.1        # classifier-free guidance: share of labels replaced by the null label
    sample_every: int = 1000          # write a sample grid every N steps (0: never)
    checkpoint_every: int = 500       # write a checkpoint every N steps (and always at the end)
    log_every: int = 25               # CSV log interval in steps

    def __post_init__(self):
        check_number("train", "batch_size", self.batch_size, lo=1, integer=True)
        check_number("train", "lr", self.lr, lo=0)
        check_number("train", "warmup_steps", self.warmup_steps, lo=0, integer=True)
        check_number("train", "weight_decay", self.weight_decay, lo=0)
        check_number("train", "grad_clip", self.grad_clip, lo=0)
        check_number("train", "ema_decay", self.ema_decay, lo=0, hi=1)
        check_number("train", "steps", self.steps, lo=1, integer=True, allow_none=True)
        check_number("train", "minutes", self.minutes, lo=0, allow_none=True)
        check_number("train", "seed", self.seed, lo=0, integer=True)
        check_number("train", "label_dropout", self.label_dropout, lo=0, hi=1)
        for name in ("sample_every", "checkpoint_every", "log_every"):
            check_number("train", name, getattr(self, name), lo=0, integer=True)


@dataclass
class DataConfig:
    dataset: str = "digits"
    image_shape: tuple[int, int, int] = (1, 16, 16)
    class_names: list[str] = field(default_factory=list)
    conditional: bool = False

    def __post_init__(self):
        self.image_shape = check_shape("data", "image_shape", self.image_shape)
        if not isinstance(self.dataset, str) or not self.dataset:
            raise NoisecraftError(f"data.dataset must be a dataset name such as \"mnist\", got {_short(self.dataset)}.")
        if not isinstance(self.class_names, list) or any(not isinstance(n, str) for n in self.class_names):
            raise NoisecraftError(f"data.class_names must be a list of strings, got {_short(self.class_names)}.")
        if not isinstance(self.conditional, bool):
            raise NoisecraftError(f"data.conditional must be true or false, got {_short(self.conditional)}.")


@dataclass
class LatentConfig:
    """Latent diffusion (Rombach et al. 2022): the U-Net denoises z = scaling_factor · E(x), a VAE latent."""

    scaling_factor: float = 1.0
    latent_shape: tuple[int, int, int] = (4, 7, 7)

    def __post_init__(self):
        self.latent_shape = check_shape("latent", "latent_shape", self.latent_shape)
        check_number("latent", "scaling_factor", self.scaling_factor, lo=1e-8)


@dataclass
class TextConfig:
    """Text conditioning: the frozen encoder's token embeddings (max_length × dim) are the cross-attention context;
    train.label_dropout is then the caption dropout (the empty prompt stands for "no caption")."""

    max_length: int = 77
    dim: int = 768

    def __post_init__(self):
        check_number("text", "max_length", self.max_length, lo=1, hi=MAX_TEXT_LENGTH, integer=True)
        check_number("text", "dim", self.dim, lo=1, hi=MAX_TEXT_DIM, integer=True)


@dataclass
class RunConfig:
    model: UNetConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    data: DataConfig
    latent: LatentConfig | None = None
    text: TextConfig | None = None

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
            "diffusion": asdict(self.diffusion),
            "train": asdict(self.train),
            "data": {**asdict(self.data), "image_shape": list(self.data.image_shape)},
        }
        if self.latent is not None:
            d["latent"] = {**asdict(self.latent), "latent_shape": list(self.latent.latent_shape)}
        if self.text is not None:
            d["text"] = asdict(self.text)
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
        unknown = sorted(set(data) - {"version", "model", "diffusion", "train", "data", "latent", "text"})
        if unknown:
            raise NoisecraftError(f"unknown sections {unknown} in config.json; remove them.")
        if not isinstance(data["model"], dict):
            raise NoisecraftError("config section 'model' must be a JSON object.")
        try:
            model = UNetConfig.from_dict(data["model"])
        except TypeError as e:
            raise NoisecraftError(f"config section 'model' is invalid ({brief(e)}).") from None
        return cls(
            model=model,
            diffusion=_from_dict(DiffusionConfig, data["diffusion"], "diffusion"),
            train=_from_dict(TrainConfig, data["train"], "train"),
            data=_from_dict(DataConfig, data["data"], "data"),
            latent=_from_dict(LatentConfig, data["latent"], "latent") if data.get("latent") is not None else None,
            text=_from_dict(TextConfig, data["text"], "text") if data.get("text") is not None else None,
        )


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
    if (diffusion or {}).get("learn_sigma"):     # improved DDPM: C more output channels for the variance
        model_kw["out_channels"] = 2 * model_kw["in_channels"]
    if model and model.get("channel_mults") and not model.get("attention_levels"):
        model_kw["attention_levels"] = (len(model_kw["channel_mults"]) - 1,)
    train_kw = drop_none(train)
    if train_kw.get("steps") is None and train_kw.get("minutes") is None:
        train_kw["minutes"] = DEFAULT_MINUTES
    return RunConfig(
        model=UNetConfig(**model_kw),
        diffusion=DiffusionConfig(**drop_none(diffusion)),
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


TIMESTEP_SAMPLING = ("uniform", "importance")
