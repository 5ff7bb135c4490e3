"""Run configuration: everything needed to rebuild the model and schedule, and to continue training.

A run directory's config.json holds {"model": ..., "diffusion": ..., "train": ..., "data": ...}; each part
is a dataclass here whose from_dict rejects unknown keys and wrong types with one clear sentence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..denoiser import check_prediction_type
from ..errors import NoisecraftError
from ..models.unet import UNetConfig
from ..schedule import BETA_SCHEDULES

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
        raise NoisecraftError(f"config section '{section}' is invalid ({e}); fix or delete the config.") from None


def _check_number(section: str, name: str, value, lo=None, hi=None, integer=False, allow_none=False):
    if value is None and allow_none:
        return
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise NoisecraftError(f"{section}.{name} must be {kind}, got {value!r}.")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise NoisecraftError(f"{section}.{name} must be {bounds}, got {value!r}.")


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"
    T: int = 1000
    prediction: str = "eps"
    min_snr_gamma: float | None = 5.0
    clip_x0: bool = True   # clamp x̂0 to the data range while sampling

    def __post_init__(self):
        if self.schedule not in BETA_SCHEDULES:
            raise NoisecraftError(f"unknown beta schedule {self.schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}.")
        _check_number("diffusion", "T", self.T, lo=2, integer=True)
        check_prediction_type(self.prediction)
        _check_number("diffusion", "min_snr_gamma", self.min_snr_gamma, lo=0, allow_none=True)


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
        _check_number("train", "batch_size", self.batch_size, lo=1, integer=True)
        _check_number("train", "lr", self.lr, lo=0)
        _check_number("train", "warmup_steps", self.warmup_steps, lo=0, integer=True)
        _check_number("train", "weight_decay", self.weight_decay, lo=0)
        _check_number("train", "grad_clip", self.grad_clip, lo=0)
        _check_number("train", "ema_decay", self.ema_decay, lo=0, hi=1)
        _check_number("train", "steps", self.steps, lo=1, integer=True, allow_none=True)
        _check_number("train", "minutes", self.minutes, lo=0, allow_none=True)
        _check_number("train", "seed", self.seed, lo=0, integer=True)
        _check_number("train", "label_dropout", self.label_dropout, lo=0, hi=1)
        for name in ("sample_every", "checkpoint_every", "log_every"):
            _check_number("train", name, getattr(self, name), lo=0, integer=True)


@dataclass
class DataConfig:
    dataset: str = "digits"
    image_shape: tuple[int, int, int] = (1, 16, 16)
    class_names: list[str] = field(default_factory=list)
    conditional: bool = False

    def __post_init__(self):
        self.image_shape = tuple(self.image_shape)
        if len(self.image_shape) != 3 or any(not isinstance(s, int) or s < 1 for s in self.image_shape):
            raise NoisecraftError(f"data.image_shape must be three positive integers (C, H, W), got {self.image_shape!r}.")


@dataclass
class RunConfig:
    model: UNetConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    data: DataConfig

    def to_dict(self) -> dict:
        return {
            "version": CONFIG_VERSION,
            "model": self.model.to_dict(),
            "diffusion": asdict(self.diffusion),
            "train": asdict(self.train),
            "data": {**asdict(self.data), "image_shape": list(self.data.image_shape)},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        if not isinstance(data, dict):
            raise NoisecraftError("config.json must hold a JSON object; restore it from the run or retrain.")
        missing = [k for k in ("model", "diffusion", "train", "data") if k not in data]
        if missing:
            raise NoisecraftError(f"config.json lacks the sections {missing}; it was not written by noisecraft train.")
        unknown = sorted(set(data) - {"version", "model", "diffusion", "train", "data"})
        if unknown:
            raise NoisecraftError(f"unknown sections {unknown} in config.json; remove them.")
        if not isinstance(data["model"], dict):
            raise NoisecraftError("config section 'model' must be a JSON object.")
        try:
            model = UNetConfig.from_dict(data["model"])
        except TypeError as e:
            raise NoisecraftError(f"config section 'model' is invalid ({e}).") from None
        return cls(
            model=model,
            diffusion=_from_dict(DiffusionConfig, data["diffusion"], "diffusion"),
            train=_from_dict(TrainConfig, data["train"], "train"),
            data=_from_dict(DataConfig, data["data"], "data"),
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


def make_run_config(dataset, conditional: bool = False, model: dict | None = None, diffusion: dict | None = None,
                    train: dict | None = None) -> RunConfig:
    """The default RunConfig for a dataset, with optional overrides per section (None values are ignored)."""
    drop_none = lambda d: {k: v for k, v in (d or {}).items() if v is not None}
    base = default_model_config(tuple(dataset.image_shape), dataset.num_classes if conditional else 0)
    model_kw = {**base.to_dict(), **drop_none(model)}
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
    )
