"""Training and evaluating Variational Diffusion Models (models/vdm.py) on the continuous-time bound in bits/dim.

Each step draws a batch of 8-bit images, computes the bound per image (diffusion + prior + reconstruction, bits/dim)
and backpropagates its mean: the U-Net and the schedule's endpoints γ_0, γ_1 follow the gradient of the bound,
the schedule network the gradient of the diffusion loss's second moment (variance minimisation, VDM appendix I.2;
the hook lives in VDM.loss). AdamW with warm-up; gradients are clipped separately for the schedule network, whose
variance gradient is larger than the rest by a factor of about 2·L.

Run directory (like `noisecraft train`'s):

    config.json          {"kind": "vdm", "version", "model": UNetConfig, "vdm": VDMConfig, "train", "data"}
    model.safetensors    EMA weights of the whole VDM (U-Net and schedule), what sampling and evaluation use
    state/               exact-resume state: model.safetensors, ema.safetensors, optimizer.pt (weights-only),
                         rng.safetensors, trainer.json, COMPLETE (written last); swapped in atomically
    log.csv              step, bpd, diffusion, prior, reconstruction (bits/dim), gamma_0, gamma_1, lr,
                         images_per_s, elapsed_s
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import default_model_config
from ..data.datasets import ImageDataset
from ..data.order import EpochOrder
from ..errors import NoisecraftError, brief
from ..io.checkpoint import load_kind_config, load_weights, save_json, save_weights
from ..io.csv_log import append_row, truncate_log
from ..models.unet import UNetConfig
from ..models.vdm import VDM, VDMConfig
from ..settings import check_data_section, check_fields, settings_from_dict
from .ema import EMA
from .loop import TrainingDiverged, TrainingLoop
from .state import (
    discard_unfinished_writes,
    load_training_state,
    reporting_write_errors,
    save_training_state,
)

KIND = "vdm"
CONFIG_VERSION = 1
DEFAULT_VDM_MINUTES = 20.0
LOG_HEADER = ["step", "bpd", "diffusion", "prior", "reconstruction", "gamma_0", "gamma_1", "lr", "images_per_s",
              "elapsed_s"]


@dataclass
class VDMTrainConfig:
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0            # per group: (U-Net + endpoints) and (schedule network); 0 switches it off
    ema_decay: float = 0.999
    steps: int | None = None          # budget: total steps and/or minutes of this invocation, whichever ends first
    minutes: float | None = None
    seed: int = 0
    log_every: int = 1                # a CSV row every N steps (averaged over them); 0: none
    checkpoint_every: int = 500       # 0: only at the end

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("batch_size", "int", "[1, inf)", False),
        ("lr", "float", "[0, inf)", False),
        ("warmup_steps", "int", "[0, inf)", False),
        ("grad_clip", "float", "[0, inf)", False),
        ("ema_decay", "float", "[0, 1]", False),
        ("steps", "int", "[1, inf)", True),
        ("minutes", "float", "[0, inf)", True),
        ("seed", "int", "[0, inf)", False),
        ("log_every", "int", "[0, inf)", False),
        ("checkpoint_every", "int", "[0, inf)", False),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "VDM training")

    @classmethod
    def from_dict(cls, data: dict) -> "VDMTrainConfig":
        return settings_from_dict(cls, data, "VDM training")


class VDMTrainer:
    """Trains a VDM on an ImageDataset into a run directory; `fit()` runs until the step or time budget."""

    def __init__(self, unet: UNetConfig, vdm: VDMConfig, train: VDMTrainConfig, dataset: ImageDataset,
                 out_dir: str | Path, device: str = "cpu", progress: bool = True):
        self.config = train
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.progress = progress
        if tuple(dataset.image_shape) != tuple(vdm.image_shape):
            raise NoisecraftError(f"dataset images have shape {tuple(dataset.image_shape)} but the model expects "
                                  f"{tuple(vdm.image_shape)}; use the same dataset and --image-size as the run.")
        if len(dataset) < train.batch_size:
            raise NoisecraftError(f"the dataset has {len(dataset)} images, fewer than the batch size "
                                  f"{train.batch_size}; lower --batch-size.")
        torch.manual_seed(train.seed)                 # the same initial weights for the same seed
        self.model = VDM(unet, vdm).to(self.device)
        self.ema = EMA(self.model, train.ema_decay)
        schedule_net = self.model.schedule.network_parameters()
        ids = {id(p) for p in schedule_net}
        self.main_params = [p for p in self.model.parameters() if id(p) not in ids]
        self.schedule_params = schedule_net
        self.optimizer = torch.optim.AdamW([{"params": self.main_params}, {"params": self.schedule_params}],
                                           lr=train.lr, weight_decay=0.0)
        self.generator = torch.Generator("cpu").manual_seed(train.seed)
        self.step = 0
        self.elapsed_before = 0.0
        self.order = EpochOrder(len(dataset), self.config.batch_size, self.config.seed)
        self._loop: TrainingLoop | None = None

    # --- data and one step ----------------------------------------------------------------------

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices of the examples for `step` (data_order.py)."""
        return self.order.indices(step)

    def lr_at(self, step: int) -> float:
        warmup = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warmup) if warmup else self.config.lr

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the batch means of the bound and its parts (bits/dim)."""
        cfg = self.config
        x = self.dataset.images[self.batch_indices(self.step)]          # uint8: the exact 8-bit levels
        self.model.train()
        terms = self.model.loss(x, self.generator)
        loss = terms.total.mean()
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the bound became {loss.item()} at step {self.step + 1}; the last good checkpoint in "
                f"{self.out_dir} is kept — resume with a lower --lr.")
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.main_params, cfg.grad_clip)
            torch.nn.utils.clip_grad_norm_(self.schedule_params, cfg.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return {name: float(value.detach().mean()) for name, value in terms._asdict().items()}

    # --- checkpoints --------------------------------------------------------------------------

    def run_config(self) -> dict:
        return {"kind": KIND, "version": CONFIG_VERSION, "model": self.model.unet_config.to_dict(),
                "vdm": self.model.config.to_dict(), "train": asdict(self.config),
                "data": {"dataset": self.dataset.name, "image_shape": list(self.dataset.image_shape)}}

    def save_checkpoint(self) -> None:
        """The exact-resume state as a whole folder swapped in atomically, then the EMA weights."""
        out = self.out_dir
        with reporting_write_errors(out, self.step):      # a full disk: one sentence naming what survived
            out.mkdir(parents=True, exist_ok=True)
            save_json(self.run_config(), out / "config.json")
            save_training_state(out, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                generator=self.generator, step=self.step,
                                elapsed_s=self.elapsed_before + self._elapsed())
            save_weights(self.ema.state_dict(), out / "model.safetensors",
                         metadata={"step": str(self.step), "weights": "ema", "kind": KIND})

    def load_checkpoint(self) -> None:
        _, info = load_training_state(self.out_dir, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                      generator=self.generator, start_anew="start a new run in another --out folder")
        self.step, self.elapsed_before = int(info["step"]), float(info["elapsed_s"])
        # what a kill left behind: half-written files, log rows past the checkpoint
        discard_unfinished_writes(self.out_dir, ("config.json", "model.safetensors", "log.csv"))
        truncate_log(self.out_dir / "log.csv", self.step)

    # --- the loop -----------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return 0.0 if self._loop is None else self._loop.elapsed()

    def fit(self) -> dict:
        """Train until `steps` total steps or `minutes` of this invocation; returns a summary with the mean bound
        of the last logged steps ("bpd"), "steps", "seconds", "seconds_per_step", "gamma_0" and "gamma_1"."""
        cfg = self.config
        loop = self._loop = TrainingLoop(steps=cfg.steps, minutes=cfg.minutes, step=self.step,
                                         batch_size=cfg.batch_size, log_every=cfg.log_every,
                                         checkpoint_every=cfg.checkpoint_every, progress=self.progress,
                                         on_interrupt="interrupted: saving a checkpoint so that training can "
                                                      "resume from here")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start_step = self.step
        recent: list[float] = []
        with loop:
            while loop.more(self.step):
                terms = self.train_step()
                recent = (recent + [terms["total"]])[-50:]
                window = loop.stepped(self.step, terms)
                if window:
                    sched = self.model.schedule
                    append_row(self.out_dir / "log.csv", LOG_HEADER, [
                        self.step, *(f"{window[k]:.5f}" for k in ("total", "diffusion", "prior", "reconstruction")),
                        f"{sched.gamma_0.item():.4f}", f"{sched.gamma_1.item():.4f}",
                        f"{self.lr_at(self.step - 1):.3g}", f"{window['images_per_s']:.1f}",
                        f"{self.elapsed_before + self._elapsed():.1f}"])
                    loop.bar.set_postfix(bpd=f"{sum(recent) / len(recent):.3f}",
                                         img_s=f"{window['images_per_s']:.0f}")
                if loop.checkpoint_due(self.step):
                    self.save_checkpoint()
        seconds = self._elapsed()
        self.save_checkpoint()
        done = self.step - start_step
        return {"steps": self.step, "steps_this_run": done, "bpd": sum(recent) / len(recent) if recent else math.nan,
                "seconds": seconds, "seconds_per_step": seconds / max(done, 1),
                "gamma_0": self.model.schedule.gamma_0.item(), "gamma_1": self.model.schedule.gamma_1.item()}


# --- the API ----------------------------------------------------------------------------------------

def _unet_config(unet, image_shape) -> UNetConfig:
    if unet is None:
        return default_model_config(tuple(image_shape))
    if isinstance(unet, UNetConfig):
        return unet
    if isinstance(unet, dict):
        base = default_model_config(tuple(image_shape)).to_dict()
        base.update({k: v for k, v in unet.items() if v is not None})
        if unet.get("channel_mults") and unet.get("attention_levels") is None:
            base["attention_levels"] = (len(base["channel_mults"]) - 1,)
        return UNetConfig.from_dict(base)
    raise NoisecraftError(f"unet must be a UNetConfig, a dict of its settings or None, got {type(unet).__name__}.")


def read_run_config(run_dir: str | Path) -> dict:
    """config.json of a VDM run, checked to be one."""
    run_dir = Path(run_dir)
    config = load_kind_config(run_dir, KIND, "a variational diffusion model", "train-vdm")
    missing = [k for k in ("model", "vdm", "train", "data") if k not in config]
    if missing:
        raise NoisecraftError(f"{run_dir / 'config.json'} lacks the sections {missing}; restore it or retrain.")
    check_data_section(config["data"], run_dir / "config.json")
    return config


def train_vdm(dataset: ImageDataset, out_dir: str | Path, *, minutes: float | None = None, steps: int | None = None,
              batch_size: int = 64, lr: float = 1e-3, unet: UNetConfig | dict | None = None,
              fourier: tuple[int, ...] = (7, 8), seed: int = 0, progress: bool = True, device: str = "cpu",
              resume: bool = False, **options) -> dict:
    """Train a VDM on `dataset` into `out_dir` and return the summary of `VDMTrainer.fit`.

    `unet`: None (the default U-Net for the image size, as `noisecraft train` uses), a UNetConfig, or a dict of
    settings overriding the default. `fourier`: the exponents n of the sin/cos(2^n·π·z) input features, () for none.
    `options`: further VDMTrainConfig fields (warmup_steps, grad_clip, ema_decay, log_every, checkpoint_every) and
    VDMConfig fields (gamma_min, gamma_max, schedule_features, variance_minimisation).
    `resume=True` continues the run in out_dir (its model settings win; the budget comes from minutes/steps).
    """
    out = Path(out_dir)
    train_fields = {"warmup_steps", "grad_clip", "ema_decay", "log_every", "checkpoint_every"}
    vdm_fields = {"gamma_min", "gamma_max", "schedule_features", "variance_minimisation"}
    unknown = sorted(set(options) - train_fields - vdm_fields)
    if unknown:
        raise NoisecraftError(f"unknown VDM training options {unknown}; known: {sorted(train_fields | vdm_fields)}.")
    if resume:
        config = read_run_config(out)
        try:
            unet_config = UNetConfig.from_dict(config["model"])
            vdm_config = VDMConfig.from_dict(config["vdm"])
            train_config = VDMTrainConfig.from_dict(config["train"])
        except TypeError as e:
            raise NoisecraftError(f"{out / 'config.json'} is invalid ({brief(e)}); restore it or retrain.") from None
        train_config = replace(train_config, steps=steps, minutes=minutes,
                               **{k: v for k, v in options.items() if k in train_fields})
        trainer = VDMTrainer(unet_config, vdm_config, train_config, dataset, out, device, progress)
        trainer.load_checkpoint()
        return trainer.fit()
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        raise NoisecraftError(f"{out} already holds a run; choose another output folder, delete it, or resume it.")
    if steps is None and minutes is None:
        minutes = DEFAULT_VDM_MINUTES
    unet_config = _unet_config(unet, dataset.image_shape)
    vdm_config = VDMConfig(image_shape=tuple(dataset.image_shape), fourier_exponents=tuple(fourier),
                           **{k: v for k, v in options.items() if k in vdm_fields})
    train_config = VDMTrainConfig(batch_size=batch_size, lr=lr, steps=steps, minutes=minutes, seed=seed,
                                  **{k: v for k, v in options.items() if k in train_fields})
    return VDMTrainer(unet_config, vdm_config, train_config, dataset, out, device, progress).fit()


def load_vdm(run_dir: str | Path, device: str = "cpu") -> tuple[VDM, dict]:
    """(VDM with the EMA weights, in eval mode; the run's config dict) from a `noisecraft train-vdm` run."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    try:
        model = VDM(UNetConfig.from_dict(config["model"]), VDMConfig.from_dict(config["vdm"]))
    except TypeError as e:
        raise NoisecraftError(f"{run_dir / 'config.json'} is invalid ({brief(e)}); restore it or retrain.") from None
    try:
        model.load_state_dict(load_weights(run_dir / "model.safetensors"))
    except RuntimeError as e:
        raise NoisecraftError(f"the weights in {run_dir / 'model.safetensors'} do not fit the model in config.json "
                              f"({brief(e)}); the run directory is inconsistent.") from None
    return model.to(device).eval(), config


def _uint8_images(images) -> torch.Tensor:
    if isinstance(images, ImageDataset):
        return images.images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise NoisecraftError("vdm_bits_per_dim takes uint8 images (an ImageDataset, a tensor or a numpy array); "
                              "convert float images with (x + 1) * 127.5 rounded.")
    return images


@torch.no_grad()
def vdm_bits_per_dim(model: VDM, images, batch_size: int = 250, repeats: int = 1,
                     generator: torch.Generator | None = None) -> dict:
    """The bound in bits/dim on a set of 8-bit images: {"mean", "stderr", "per_image", "diffusion", "prior",
    "reconstruction", "n", "repeats"}.

    Each image's value is the mean of `repeats` independent one-sample estimates of its bound (t, ε and the ε_0 of
    the reconstruction drawn afresh); "stderr" is the standard error of the mean over images, which covers both the
    spread of the data and the noise of the estimator. The parts are means over images and repeats.
    """
    data = _uint8_images(images)
    if len(data) == 0:
        raise NoisecraftError("vdm_bits_per_dim got no images; pass at least one.")
    if not isinstance(repeats, int) or repeats < 1:
        raise NoisecraftError(f"repeats must be a positive integer, got {repeats!r}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    totals, parts = torch.zeros(len(data), dtype=torch.float64), {"diffusion": 0.0, "prior": 0.0, "reconstruction": 0.0}
    try:
        for _ in range(repeats):
            for start in range(0, len(data), batch_size):
                terms = model.loss(data[start:start + batch_size], generator)
                totals[start:start + batch_size] += terms.total.double().cpu()
                for k in parts:
                    parts[k] += float(getattr(terms, k).double().sum())
    finally:
        model.train(was_training)
    per_image = totals / repeats
    n = len(per_image)
    stderr = float(per_image.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": float(per_image.mean()), "stderr": stderr, "per_image": per_image.float(), "n": n,
            "repeats": repeats, **{k: v / (n * repeats) for k, v in parts.items()}}
