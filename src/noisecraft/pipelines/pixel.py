"""Sampling from a trained run: load the EMA model, pick a sampler, apply guidance, keep intermediates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..denoiser import ClassifierFreeGuidance, Denoiser
from ..errors import NoisecraftError
from ..io.checkpoint import load_weights
from ..models.unet import UNet
from ..samplers import generate
from ..schedule import NoiseSchedule
from ..training.config import RunConfig
from ..training.trainer import load_run_config


@dataclass
class SampleResult:
    images: torch.Tensor                      # N×C×H×W in [-1, 1]
    labels: torch.Tensor | None
    trajectory: list[dict] = field(default_factory=list)   # every k steps: {"i", "sigma", "x", "denoised"}


class DiffusionPipeline:
    """A trained pixel-space model ready to sample:

        pipe = DiffusionPipeline.from_run("runs/mnist")
        images = pipe.sample(16, sampler="ddim", steps=50, seed=0).images
    """

    def __init__(self, model: UNet, config: RunConfig, device="cpu"):
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        d = config.diffusion
        self.schedule = NoiseSchedule.create(d.schedule, d.T)
        self.denoiser = Denoiser(self.model, self.schedule, d.prediction, clip_x0=d.clip_x0)

    @classmethod
    def from_run(cls, run_dir: str | Path, device="cpu", weights: str = "ema") -> "DiffusionPipeline":
        """Load a run directory: config.json + model.safetensors (EMA) or state/model.safetensors (raw)."""
        run_dir = Path(run_dir)
        config = load_run_config(run_dir)
        path = run_dir / "model.safetensors" if weights == "ema" else run_dir / "state" / "model.safetensors"
        model = UNet(config.model)
        try:
            model.load_state_dict(load_weights(path))
        except RuntimeError as e:
            raise NoisecraftError(f"{path} does not match the model described in config.json "
                                  f"({str(e).splitlines()[0][:160]}); the run directory is inconsistent.") from None
        return cls(model, config, device)

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def _labels(self, n: int, label) -> torch.Tensor | None:
        if label is None:
            return None
        if not self.num_classes:
            raise NoisecraftError("this model is unconditional, so it takes no --label; train with --conditional.")
        labels = torch.as_tensor(label).long().flatten()
        if labels.numel() == 1:
            labels = labels.expand(n)
        if labels.numel() != n or labels.min() < 0 or labels.max() >= self.num_classes:
            raise NoisecraftError(f"labels must be {n} integers in 0..{self.num_classes - 1}, got {label!r}.")
        return labels.to(self.device)

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str = "ddim", steps: int = 50, seed: int = 0, label=None,
               guidance: float = 1.0, save_every: int = 0, batch_size: int = 250, spacing: str = "leading",
               progress=None, **options) -> SampleResult:
        """Draw n images. label: None (unconditional), one class index, or one per image; guidance w > 1
        uses classifier-free guidance. save_every k > 0 keeps x_t and x̂0 every k steps (first batch only)."""
        if n < 1:
            raise NoisecraftError(f"the number of samples must be at least 1, got {n}.")
        labels = self._labels(n, label)
        denoiser = self.denoiser
        if labels is not None and guidance != 1.0:
            denoiser = ClassifierFreeGuidance(denoiser, guidance, torch.tensor(self.num_classes, device=self.device))
        shape = tuple(self.config.data.image_shape)
        images, trajectory = [], []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            cond = None if labels is None else labels[start:start + count]

            def keep(info, first=start == 0):
                last = info["sigma_next"] == 0
                if first and save_every and (info["i"] % save_every == 0 or last):
                    trajectory.append({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in info.items()})
                if progress is not None:
                    progress(count if last else 0)

            x = generate(denoiser, (count, *shape), sampler=sampler, steps=steps, spacing=spacing, cond=cond,
                         seed=seed + start, callback=keep, device=self.device, **options)
            images.append(x.clamp(-1, 1).cpu())
        return SampleResult(torch.cat(images), None if labels is None else labels.cpu(), trajectory)
