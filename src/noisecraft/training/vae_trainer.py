"""Training the KL autoencoder of latent diffusion (Rombach et al. 2022, §3.1 and appendix G).

Loss per batch, with x and x̂ in [-1, 1] and z ~ q(z|x):

    L = mean |x − x̂|  (or mean (x − x̂)²)  +  kl_weight · KL(q(z|x) ‖ N(0, I)) / (C·H·W)  [+ gan_weight · L_G]

The reconstruction term is a mean per pixel, and the KL (closed form, summed over each latent) is divided by the
number of pixels C·H·W, so the two keep the ratio Stable Diffusion's loss has (there both are sums per image) and
kl_weight means the same thing as SD's 1e-6 whatever the image size. The optional adversarial term is a small
PatchGAN with the hinge loss (Esser et al. 2021, VQGAN), switched on after `gan_start` steps.

Run directory:

    config.json          {"kind": "vae", "model": VAEConfig, "train": ..., "data": ..., "scaling_factor": s, "metrics": ...}
    model.safetensors    the autoencoder's weights
    log.csv              step, loss, recon, kl, g_loss, d_loss, lr, images_per_s, elapsed_s

After training, two numbers go into config.json: the reconstruction PSNR on the test split, and the latent scaling
factor s = 1 / std of sampled latents of a few thousand training images (how SD's 0.18215 was found), which latent
diffusion multiplies latents by so that they have unit variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import ImageDataset
from ..data.order import EpochOrder
from ..errors import NoisecraftError
from ..io.checkpoint import load_weights, save_json, save_weights
from ..io.csv_log import append_row
from ..models.vae import AutoencoderKL, VAEConfig
from ..models.vae_loading import KIND, latent_scaling_factor, reconstruction_psnr
from ..settings import check_fields, settings_from_dict, settings_to_dict
from .loop import TrainingDiverged, TrainingLoop

CONFIG_VERSION = 1
DEFAULT_VAE_MINUTES = 6.0
LOG_HEADER = ["step", "loss", "recon", "kl", "g_loss", "d_loss", "lr", "images_per_s", "elapsed_s"]
RECON_LOSSES = ("l1", "l2")


@dataclass
class VAETrainConfig:
    batch_size: int = 32
    lr: float = 1e-3                  # AdamW's peak learning rate
    warmup_steps: int = 100           # linear warm-up to lr
    lr_decay: bool = True             # cosine decay to 10% of lr over the budget (steps or minutes)
    weight_decay: float = 0.0
    grad_clip: float = 1.0            # gradient norm clipping
    steps: int | None = None          # budget: total steps and/or minutes, whichever ends first
    minutes: float | None = None
    seed: int = 0
    loss: str = "l1"                  # reconstruction loss: l1 | l2
    kl_weight: float = 1e-6           # weight of KL(q(z|x) ‖ N(0, I)) per pixel (SD's value)
    gan: bool = False                 # add a PatchGAN discriminator's hinge loss
    gan_weight: float = 0.1
    gan_start: int = 1000             # steps of plain reconstruction before the discriminator joins
    log_every: int = 25
    checkpoint_every: int = 500       # 0: only at the end
    scale_images: int = 4096          # training images whose sampled latents set the scaling factor
    eval_images: int | None = None    # test images for the PSNR (None: the whole split)

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("batch_size", "int", "[1, inf)", False),
        ("lr", "float", "[0, inf)", False),
        ("warmup_steps", "int", "[0, inf)", False),
        ("lr_decay", "bool", None, False),
        ("weight_decay", "float", "[0, inf)", False),
        ("grad_clip", "float", "[0, inf)", False),
        ("steps", "int", "[1, inf)", True),
        ("minutes", "float", "[0, inf)", True),
        ("seed", "int", "[0, inf)", False),
        ("loss", "str", RECON_LOSSES, False),
        ("kl_weight", "float", "[0, inf)", False),
        ("gan", "bool", None, False),
        ("gan_weight", "float", "[0, inf)", False),
        ("gan_start", "int", "[0, inf)", False),
        ("log_every", "int", "[0, inf)", False),
        ("checkpoint_every", "int", "[0, inf)", False),
        ("scale_images", "int", "[1, inf)", False),
        ("eval_images", "int", "[1, inf)", True),
    )

    def __post_init__(self):
        check_fields(self, self.RULES, "VAE training")

    @classmethod
    def from_dict(cls, data: dict) -> "VAETrainConfig":
        return settings_from_dict(cls, data, "VAE training")


# --- the discriminator ----------------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): strided 4×4 convolutions, one real/fake logit per image patch."""

    def __init__(self, in_channels: int, width: int = 32, n_down: int = 2):
        super().__init__()
        layers, ch = [], in_channels
        for i in range(n_down):
            out = width * 2 ** i
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.GroupNorm(min(8, out), out) if i else nn.Identity(),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean max(0, 1 − D(x)) + mean max(0, 1 + D(x̂)), halved."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


# --- metrics and latents --------------------------------------------------------------------------


# --- the trainer ----------------------------------------------------------------------------------

class VAETrainer:
    """Trains an AutoencoderKL on an ImageDataset into a run directory; `fit()` trains, then measures."""

    def __init__(self, model_config: VAEConfig, train_config: VAETrainConfig, dataset: ImageDataset,
                 out_dir: str | Path, test_dataset: ImageDataset | None = None, device: str = "cpu",
                 progress: bool = True):
        self.model_config, self.config = model_config, train_config
        self.dataset, self.test_dataset = dataset, test_dataset
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.progress = progress
        torch.manual_seed(train_config.seed)          # the same initial weights for the same seed
        self.model = AutoencoderKL(model_config).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_config.lr,
                                           weight_decay=train_config.weight_decay)
        self.discriminator = self.d_optimizer = None
        if train_config.gan:
            side = min(dataset.image_shape[1:])
            self.discriminator = PatchDiscriminator(model_config.in_channels,
                                                    n_down=max(1, min(3, int(math.log2(max(side, 2))) - 2)))
            self.discriminator.to(self.device)
            # β1 = 0.5 as is usual for GANs (and SD's discriminator)
            self.d_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=train_config.lr,
                                                 betas=(0.5, 0.9), weight_decay=0.0)
        self.generator = torch.Generator("cpu").manual_seed(train_config.seed)
        self.step = 0
        self.saved_step = None                        # the step of the checkpoint on disk
        self.diverged_step = None
        self.order = EpochOrder(len(dataset), self.config.batch_size, self.config.seed)
        self._loop: TrainingLoop | None = None      # the running fit()'s budget and log window
        self._check_dataset()

    def _check_dataset(self) -> None:
        shape = tuple(self.dataset.image_shape)
        self.model.check_input(torch.empty((1, *shape), device="meta"))
        if len(self.dataset) < self.config.batch_size:
            raise NoisecraftError(f"the dataset has {len(self.dataset)} images, fewer than the batch size "
                                  f"{self.config.batch_size}; lower --batch-size.")
        if self.test_dataset is not None and tuple(self.test_dataset.image_shape) != shape:
            raise NoisecraftError(f"test images have shape {tuple(self.test_dataset.image_shape)} but training "
                                  f"images {shape}; load both splits with the same --image-size.")

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices of the examples for `step` (data_order.py)."""
        return self.order.indices(step)

    # --- one step ---------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return 0.0 if self._loop is None else self._loop.elapsed()

    def budget_fraction(self) -> float:
        """How much of the budget is spent: the larger of steps done/steps and minutes used/minutes."""
        cfg, done = self.config, 0.0
        if cfg.steps:
            done = self.step / cfg.steps
        if cfg.minutes:
            done = max(done, self._elapsed() / (cfg.minutes * 60.0))
        return min(done, 1.0)

    def lr_now(self) -> float:
        cfg = self.config
        if cfg.warmup_steps and self.step < cfg.warmup_steps:
            return cfg.lr * (self.step + 1) / cfg.warmup_steps
        if not cfg.lr_decay:
            return cfg.lr
        # Cosine from lr down to lr/10 over the budget; with a minutes budget it follows the clock.
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.budget_fraction())))

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of the autoencoder's loss for a batch x in [-1, 1] (see the module docstring)."""
        cfg = self.config
        recon, posterior = self.model(x, generator=self.generator)
        diff = recon - x
        rec = diff.abs().mean() if cfg.loss == "l1" else diff.pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()           # per pixel, so kl_weight is size-free
        out = {"recon": rec, "kl": kl, "loss": rec + cfg.kl_weight * kl, "fake": recon}
        if self.discriminator is not None and self.step >= cfg.gan_start:
            out["g_loss"] = -self.discriminator(recon).mean()
            out["loss"] = out["loss"] + cfg.gan_weight * out["g_loss"]
        return out

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        x, _ = self.dataset.batch(self.batch_indices(self.step))
        x = x.to(self.device)
        self.model.train()
        terms = self.losses(x)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            self.diverged_step = self.step + 1
            raise TrainingDiverged(f"the autoencoder's loss became {loss.item()} at step {self.step + 1}")
        lr = self.lr_now()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.discriminator is not None:
            self.discriminator.requires_grad_(False)     # the generator step must not train D
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        row = {"loss": loss.item(), "recon": terms["recon"].item(), "kl": terms["kl"].item(),
               "g_loss": terms["g_loss"].item() if "g_loss" in terms else 0.0, "d_loss": 0.0, "lr": lr}
        if "g_loss" in terms:
            row["d_loss"] = self._discriminator_step(x, terms["fake"].detach(), lr)
        self.step += 1
        return row

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, lr: float) -> float:
        self.discriminator.requires_grad_(True)
        for group in self.d_optimizer.param_groups:
            group["lr"] = lr
        d_loss = hinge_d_loss(self.discriminator(real), self.discriminator(fake))
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.config.grad_clip)
        self.d_optimizer.step()
        return d_loss.item()

    # --- files ------------------------------------------------------------------------------

    def run_config(self, scaling_factor: float | None = None, metrics: dict | None = None) -> dict:
        c, h, w = self.dataset.image_shape
        return {
            "kind": KIND,
            "version": CONFIG_VERSION,
            "model": self.model_config.to_dict(),
            "train": settings_to_dict(self.config),
            "data": {"dataset": self.dataset.name, "image_shape": [c, h, w]},
            "scaling_factor": scaling_factor,
            "metrics": metrics or {"step": self.step, "complete": False},
        }

    def save_checkpoint(self, scaling_factor: float | None = None, metrics: dict | None = None) -> None:
        """Weights first, then config.json (each written atomically): a config never names missing weights."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_weights(self.model.state_dict(), self.out_dir / "model.safetensors",
                     metadata={"step": str(self.step), "kind": KIND})
        save_json(self.run_config(scaling_factor, metrics), self.out_dir / "config.json")
        self.saved_step = self.step

    def _log(self, row: list) -> None:
        append_row(self.out_dir / "log.csv", LOG_HEADER, row)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until the budget ends, then write the final weights with PSNR and scaling factor.

        A non-finite loss stops training: the last checkpoint on disk (if any) is kept and finished (its PSNR
        and scaling factor computed), and TrainingDiverged names the step.
        """
        cfg = self.config
        loop = self._loop = TrainingLoop(steps=cfg.steps, minutes=cfg.minutes, batch_size=cfg.batch_size,
                                         log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                                         progress=self.progress, desc="vae",
                                         on_interrupt="interrupted: measuring and saving the autoencoder as it is")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "log.csv").unlink(missing_ok=True)
        logged = ("loss", "recon", "kl", "g_loss", "d_loss")
        last = {}
        try:
            with loop:
                while loop.more(self.step):
                    last = self.train_step()
                    window = loop.stepped(self.step, {k: last[k] for k in logged})
                    if window:
                        self._log([self.step, *(f"{window[k]:.6g}" for k in logged), f"{last['lr']:.3g}",
                                   f"{window['images_per_s']:.1f}", f"{self._elapsed():.1f}"])
                        loop.bar.set_postfix(recon=f"{window['recon']:.4f}", kl=f"{window['kl']:.3g}",
                                             img_s=f"{window['images_per_s']:.0f}")
                    if loop.checkpoint_due(self.step):
                        self.save_checkpoint()
        except TrainingDiverged as e:
            self._diverged(str(e))
        seconds = self._elapsed()
        summary = {"steps": self.step, "loss": last.get("loss", float("nan")), "recon": last.get("recon", float("nan")),
                   "seconds": round(seconds, 1), "images_per_s": self.step * cfg.batch_size / max(seconds, 1e-9)}
        metrics = self.finish(summary)
        return {**summary, **metrics}

    def _diverged(self, what: str):
        if self.saved_step is None:
            raise TrainingDiverged(f"{what}, before any checkpoint was written; retrain with a lower --lr "
                                   f"(or --kl-weight).") from None
        self.model.load_state_dict(load_weights(self.out_dir / "model.safetensors"))
        step = self.saved_step
        self.step = step
        self.finish({"steps": step, "diverged_at_step": self.diverged_step})
        raise TrainingDiverged(f"{what}; {self.out_dir} keeps the last good checkpoint (step {step}, now with its "
                               f"PSNR and scaling factor) — retrain with a lower --lr.") from None

    def finish(self, summary: dict) -> dict:
        """Measure the reconstruction PSNR and the latent scaling factor, and write the final run directory."""
        cfg = self.config
        split, images = ("test", self.test_dataset) if self.test_dataset is not None else ("train", self.dataset)
        limit = cfg.eval_images if self.test_dataset is not None else min(cfg.eval_images or 1000, 1000)
        if self.progress:
            n = min(len(images), limit or len(images))
            print(f"measuring the reconstruction PSNR on {n} {split} images and the latent scaling factor ...")
        psnr = reconstruction_psnr(self.model, images, limit=limit)
        scale = latent_scaling_factor(self.model, self.dataset, n=cfg.scale_images, seed=cfg.seed)
        metrics = {"psnr": round(psnr, 3), "psnr_split": split, "psnr_images": min(len(images), limit or len(images)),
                   "scaling_factor": scale, "complete": True}
        metrics.update({k: v for k, v in summary.items() if k in ("steps", "seconds", "diverged_at_step")})
        self.save_checkpoint(scaling_factor=scale, metrics=metrics)
        return metrics


def train_vae(model_config: VAEConfig, train_config: VAETrainConfig, dataset: ImageDataset, out_dir,
              test_dataset: ImageDataset | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Train an autoencoder into out_dir; returns the summary with "psnr" and "scaling_factor"."""
    return VAETrainer(model_config, train_config, dataset, out_dir, test_dataset, device, progress).fit()


# --- loading --------------------------------------------------------------------------------------

