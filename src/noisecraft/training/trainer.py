"""The training loop: DDPM Algorithm 1 with AdamW, warm-up, clipping, EMA, checkpoints and exact resume.

Run directory layout (one self-describing folder):

    config.json          everything needed to rebuild the model and schedule (RunConfig)
    model.safetensors    EMA weights, what sampling uses
    state/               exact-resume state: model.safetensors (raw weights), ema.safetensors,
                         optimizer.pt (weights-only torch file), trainer.json (step, time), rng.safetensors,
                         timestep_sampler.safetensors (loss history, with importance sampling of t only)
    log.csv              step, loss, lr, images_per_s, elapsed_s
    samples/             sample grids written during training

Determinism: the data order depends only on (seed, step) — epoch e uses permutation seed·1000003 + e, or for a
shard set streamed from disk the shard stream's order (data/stream.py), opened at sample step·batch_size — and
the noise, t and label dropout come from one generator whose state is checkpointed with the global RNG
(dropout), as is the loss history that importance sampling of t draws on. So on CPU, N steps + resume + N steps
reproduce 2N steps straight, bit for bit, from memory or from shards (checkpoints are whole steps: a run killed
mid-step repeats that step from its first sample).

Data: an ImageDataset in memory, or a ShardDataset streamed through worker processes (data/sources.py). A streamed
sample that cannot be read keeps its place in the batch and its random draws but gets weight 0: the loss is the mean
over the readable rows of the global batch, and `skipped` counts the others.

The loss is DDPM's L_simple, or with a learned variance (improved DDPM) the hybrid L_simple + λ·L_vlb or the bound
L_vlb itself (losses.training_loss); t is uniform or importance sampled (timestep_sampler.py). An EDM-preconditioned
run (prediction "edm") instead draws log-normal σ's and trains on EDM's loss (losses.edm_loss).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from ..config import RunConfig, load_run_config
from ..data.augment import random_hflip
from ..data.datasets import ImageDataset
from ..data.sources import MemorySource, ShardDataset, build_source
from ..errors import NoisecraftError
from ..io.checkpoint import load_weights, save_json, save_weights
from ..io.csv_log import append_row, truncate_log
from ..losses import edm_loss, edm_sigmas, training_loss
from ..models.unet import UNet
from .distributed import Distributed
from .ema import EMA
from .loop import TrainingDiverged, TrainingLoop
from .speed import SpeedOptions
from .state import (
    checkpoint_step,
    discard_unfinished_writes,
    load_training_state,
    reporting_write_errors,
    save_training_state,
    weights_step,
)
from .timestep_sampler import TimestepSampler

LOG_HEADER = ["step", "loss", "lr", "images_per_s", "elapsed_s"]



class Trainer:
    """Trains a UNet on an ImageDataset (or a streamed ShardDataset) into a run directory. `fit()` runs until the
    step or time budget."""

    def __init__(self, config: RunConfig, dataset: ImageDataset | ShardDataset, out_dir: str | Path,
                 device: str = "cpu",
                 progress: bool = True, batches=None, *, distributed: Distributed | None = None,
                 accumulate: int = 1, speed: SpeedOptions | None = None):
        """distributed: this process's place in a torchrun job (training/distributed.py); None = one process.
        accumulate: split each process's share of the batch into this many sequential micro-batches (same
        result, less memory). speed: autocast precision, channels-last, torch.compile, fused AdamW (speed.py)."""
        self.config = config
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        self.dist = distributed or Distributed(device=torch.device(device))
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.accumulate = accumulate
        self.speed = speed or SpeedOptions()
        d = config.diffusion
        self.schedule = d.make_schedule()
        torch.manual_seed(config.train.seed)    # the same initial weights for the same seed (on every rank)
        self.model = UNet(config.model).to(self.device)
        self.ema = EMA(self.model, config.train.ema_decay)
        self.optimizer = self.speed.optimizer(self.model.parameters(), lr=config.train.lr,
                                              weight_decay=config.train.weight_decay)
        self.generator = torch.Generator("cpu").manual_seed(config.train.seed)
        self.timestep_sampler = TimestepSampler(self.schedule.T, d.timestep_sampling)
        self.step = 0
        self.elapsed_before = 0.0     # training seconds spent by earlier invocations
        self.skipped = 0              # rows of unreadable streamed samples trained with weight 0 (this invocation)
        self._loop: TrainingLoop | None = None     # the running fit()'s budget and log window
        self._time_up = False
        self._check_dataset()
        # x0 and cond per step (data/sources.py): from memory, pixels or cached VAE latents with labels or cached
        # text embeddings (batches.py); or streamed from shards. Rank 0 fills the run's caches first; the other
        # ranks then read them.
        if not self.dist.is_main:
            self.dist.barrier()
        self.source = build_source(config, dataset, self.out_dir, rank=self.dist.rank,
                                   world_size=self.dist.world_size, batches=batches)
        if self.dist.is_main:
            self.dist.barrier()
        if isinstance(self.source, MemorySource):     # in memory: the batches and their order, by name
            self.batches, self.order = self.source.batches, self.source.order
        self.net = self.speed.wrap(self.model, self.dist)   # what the loss calls: DDP and/or compiled

    # --- data -----------------------------------------------------------------------------

    def _check_dataset(self) -> None:
        if self.config.data.hflip and self.config.latent is not None:
            raise NoisecraftError("--hflip mirrors pixels, and a latent run trains on VAE latents, which a mirror does "
                                  "not map to the mirrored image's latents; drop --hflip for latent runs.")
        expected = tuple(self.config.data.image_shape)
        if tuple(self.dataset.image_shape) != expected:
            raise NoisecraftError(f"dataset images have shape {tuple(self.dataset.image_shape)} but the run expects "
                                  f"{expected}; use the same dataset and --image-size as when the run started.")
        # Channel count and divisibility by the downsample factor: refuse now, not at the first step.
        self.model.check_input(torch.empty((1, *self.config.model_shape), device="meta"))
        if len(self.dataset) < self.config.train.batch_size:
            raise NoisecraftError(f"the dataset has {len(self.dataset)} images, fewer than the batch size "
                                  f"{self.config.train.batch_size}; lower --batch-size.")
        streamed = isinstance(self.dataset, ShardDataset)
        self._check_shards(streamed)
        labelled = self.dataset.has_labels if streamed else self.dataset.labels is not None
        if self.config.data.conditional and not labelled:
            raise NoisecraftError("--conditional needs a labelled dataset (class sub-folders for folder:PATH).")
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise NoisecraftError(f"--accumulate must be a positive integer, got {self.accumulate!r}.")
        parts = self.dist.world_size * self.accumulate
        if self.config.train.batch_size < parts:
            raise NoisecraftError(f"a batch of {self.config.train.batch_size} images cannot be split over "
                                  f"{self.dist.world_size} process(es) x {self.accumulate} accumulation step(s); use "
                                  f"--batch-size {parts} or more, or fewer processes / --accumulate.")

    def _check_shards(self, streamed: bool) -> None:
        """A run trained on shards continues on the same shards (same fingerprint), one trained in memory in memory."""
        recorded = self.config.data.shards_fingerprint
        if not streamed:
            if recorded is not None:
                raise NoisecraftError(f"this run was trained on the shards in {self.config.data.shards}; continue it "
                                      f"on them with --data SHARDS.")
            return
        if recorded is None:
            raise NoisecraftError(f"this run was trained on {self.config.data.dataset} in memory, not on shards; "
                                  f"continue it without --data.")
        if self.dataset.fingerprint != recorded:
            raise NoisecraftError(f"the shards in {self.dataset.folder} are not the ones this run was trained on "
                                  f"(their manifest fingerprint {self.dataset.fingerprint[:12]} differs from the run's "
                                  f"{recorded[:12]}); resume on the original shards, or start a new run with --out.")

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices of the examples for `step` (data_order.py); in-memory data only."""
        return self.order.indices(step)

    # --- one step -------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        warmup = self.config.train.warmup_steps
        return self.config.train.lr * min(1.0, (step + 1) / warmup) if warmup else self.config.train.lr

    def train_step(self) -> float:
        """One optimizer step on the global batch of `batch_size` images: this process's shard of it, in
        `accumulate` micro-batches; returns the batch's mean loss (the same on every process)."""
        cfg, g, d = self.config, self.generator, self.config.diffusion
        n = cfg.train.batch_size
        mine = self.dist.shard(n)
        # The whole batch's random numbers are drawn on every process, in the same order, and each keeps its
        # slice: the step is then the same whatever the number of processes or micro-batches.
        drawn = self.source.batch(self.step, g, cfg.train.label_dropout, shard=mine)
        x0, cond = drawn.x0, drawn.cond
        if cfg.data.hflip:   # drawn only when on: runs without it keep their random numbers
            x0 = random_hflip(x0, g, n, mine)
        if d.edm:   # EDM: log-normal σ's instead of timesteps, every example weighted 1 (losses.edm_loss)
            t_all, weights = edm_sigmas(n, g, d.p_mean, d.p_std), torch.ones(n)
        else:
            t_all, weights = self.timestep_sampler.sample(n, g)
        noise = torch.randn((n, *x0.shape[1:]), generator=g)[mine]
        t, weights = t_all[mine], weights[mine]
        valid, count = self._readable_rows(drawn.valid, mine, n)
        if valid is not None:          # unreadable streamed samples: their draws are made, their loss weighs 0
            weights = weights * valid[mine]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over processes, so each process's loss is its share of the batch sum times
        # world_size / count (count = n, or the readable rows): the averaged gradient is that of the batch mean.
        scale = self.dist.world_size / max(count, 1)
        per_example = torch.empty(len(t))
        micro = torch.arange(len(t)).tensor_split(self.accumulate)
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            with self.speed.no_sync(self.net, skip=not last):
                args = (x0[part].to(self.device), t[part].to(self.device), noise[part].to(self.device),
                        None if cond is None else cond[part].to(self.device))
                with self.speed.autocast(self.device):
                    if d.edm:
                        losses = edm_loss(self.net, *args, sigma_data=d.sigma_data)
                    else:
                        losses = training_loss(self.net, self.schedule, *args, prediction=d.prediction,
                                               min_snr_gamma=d.min_snr_gamma, learn_sigma=d.learn_sigma, loss=d.loss,
                                               vlb_weight=d.vlb_weight,
                                               continuous_decoder=cfg.latent is not None)   # latents: not pixels
                losses = losses.float()
                self.speed.backward((losses * weights[part].to(self.device)).sum() * scale)
            per_example[part] = losses.detach().cpu()
        loss, per_example = self._agree_on_step(per_example, weights, mine, n, count)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss} at step {self.step + 1}; the last good checkpoint in {self.out_dir} "
                f"is kept — resume with a lower --lr.")
        if valid is None:
            self.timestep_sampler.update(t_all, per_example)
        else:
            self.timestep_sampler.update(t_all[valid], per_example[valid])
            self.skipped += n - count
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.speed.step(self.optimizer, self.model.parameters(), cfg.train.grad_clip)
        self.ema.update(self.model, self.step)
        self.step += 1
        return loss

    def _readable_rows(self, valid: torch.Tensor | None, mine: slice, n: int) -> tuple[torch.Tensor | None, int]:
        """(which rows of the global batch were readable, how many), shared by all processes; (None, n) when
        every row is (in memory). The same all-reduce sums the processes' counts of unusable samples, so the
        --max-bad limit holds for the total and every process stops after the same step, in the same sentence."""
        if valid is None:
            return None, n
        rows = torch.zeros(n + 1, dtype=torch.float64)      # (float64: counts stay exact far beyond 2^24)
        rows[mine] = valid.double()
        rows[n] = self.source.bad
        rows = self.dist.all_reduce_sum(rows)
        self.source.check_total(int(rows[n].item()))
        rows = rows[:n]
        return rows > 0, int(rows.sum().item())

    def _agree_on_step(self, per_example: torch.Tensor, weights: torch.Tensor, mine: slice,
                       n: int, count: int | None = None) -> tuple[float, torch.Tensor]:
        """Share what every process must know after the backward pass, in one all-reduce: the batch loss, the
        per-example losses (importance sampling of t learns from all of them) and whether rank 0's time
        budget is spent (so that all processes stop after the same step)."""
        time_up = self._loop is not None and self._loop.time_up()
        count = n if count is None else max(count, 1)     # the mean over the readable rows
        if not self.dist.active:
            self._time_up = time_up
            return float((per_example * weights).sum() / count), per_example
        stats = torch.zeros(n + 2, dtype=torch.float64)
        stats[mine] = per_example.double()
        stats[n] = float((per_example * weights).sum())
        stats[n + 1] = float(time_up and self.dist.is_main)
        stats = self.dist.all_reduce_sum(stats)
        self._time_up = bool(stats[n + 1] > 0)
        return float(stats[n] / count), stats[:n].float()

    # --- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write the exact-resume state (atomically, as a whole folder), then the EMA weights for sampling.
        A full disk (or any OS error) ends in a NoisecraftError naming what survived: the previous checkpoint."""
        out = self.out_dir
        with reporting_write_errors(out, self.step):
            out.mkdir(parents=True, exist_ok=True)
            save_json(self.config.to_dict(), out / "config.json")
            extra = ({"timestep_sampler": self.timestep_sampler.state_dict()}
                     if self.timestep_sampler.kind != "uniform" else None)
            save_training_state(out, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                generator=self.generator, step=self.step,
                                elapsed_s=self.elapsed_before + self._elapsed(), extra=extra)
            save_weights(self.ema.state_dict(), out / "model.safetensors",
                         metadata={"step": str(self.step), "weights": "ema"})

    def load_checkpoint(self) -> None:
        state, info = load_training_state(self.out_dir, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                          generator=self.generator,
                                          start_anew="start a new run with --out instead of --resume")
        if self.timestep_sampler.kind != "uniform":
            if not (state / "timestep_sampler.safetensors").exists():
                raise NoisecraftError(f"{state} lacks timestep_sampler.safetensors, which importance sampling of t "
                                      f"needs to resume exactly; the run directory is inconsistent.")
            self.timestep_sampler.load_state_dict(load_weights(state / "timestep_sampler.safetensors"))
        self.step, self.elapsed_before = int(info["step"]), float(info["elapsed_s"])
        if self.dist.is_main:
            # A killed run can leave half-written files and log rows past the checkpoint (or a torn last row):
            # drop them, so that the log holds every step exactly once however often the run was interrupted.
            discard_unfinished_writes(self.out_dir, ("config.json", "model.safetensors", "log.csv"))
            truncate_log(self.out_dir / "log.csv", self.step)

    # --- the loop -------------------------------------------------------------------------

    def _elapsed(self) -> float:
        """Training seconds of this invocation (0 before fit starts)."""
        return 0.0 if self._loop is None else self._loop.elapsed()

    def _log(self, row: list) -> None:
        append_row(self.out_dir / "log.csv", LOG_HEADER, row)

    def fit(self, sample_fn=None) -> dict:
        """Train until `train.steps` total steps or `train.minutes` of this invocation, whichever first.

        sample_fn(trainer, path) writes a sample grid every `sample_every` steps (the CLI passes one).
        Returns a summary: steps, final loss, images/s, seconds.
        """
        cfg = self.config.train
        loop = self._loop = TrainingLoop(steps=cfg.steps, minutes=cfg.minutes, step=self.step,
                                         batch_size=cfg.batch_size, log_every=cfg.log_every,
                                         checkpoint_every=cfg.checkpoint_every, progress=self.progress)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._time_up = loop.deadline is not None and loop.deadline <= 0
        start_step, last_loss = self.step, float("nan")
        try:
            with loop:
                # the time budget is rank 0's clock, shared with the others inside each step (_agree_on_step)
                while loop.more(self.step, time_up=self._time_up):
                    last_loss = self.train_step()
                    window = loop.stepped(self.step, {"loss": last_loss})
                    if window and self.dist.is_main:
                        ips = window["images_per_s"]
                        self._log([self.step, f"{window['loss']:.6f}", f"{self.lr_at(self.step - 1):.3g}", f"{ips:.1f}",
                                   f"{self.elapsed_before + self._elapsed():.1f}"])
                        loop.bar.set_postfix(loss=f"{window['loss']:.4f}", img_s=f"{ips:.0f}",
                                             left=loop.time_left(self.step, ips))
                    if loop.checkpoint_due(self.step):
                        self._checkpoint_on_rank0()
                    if (sample_fn is not None and cfg.sample_every and self.step % cfg.sample_every == 0
                            and self.dist.is_main):
                        sample_fn(self, self.out_dir / "samples" / f"step_{self.step:07d}.png")
        finally:     # stop the data loader's worker processes (streamed data)
            self.source.close()
        seconds = self._elapsed()
        # A resume with nothing left to do leaves whole files as they are (but completes a half-finished save).
        # Rank 0 looks at the files and tells the others, so that all take part in the save or none does.
        stale = self.dist.is_main and not (checkpoint_step(self.out_dir) == self.step
                                           and weights_step(self.out_dir / "model.safetensors") == self.step)
        stale = self.dist.all_reduce_sum(torch.tensor([float(stale)])).item() > 0
        if self.step != start_step or stale:
            self._checkpoint_on_rank0()
        done = self.step - start_step
        return {"steps": self.step, "steps_this_run": done, "loss": last_loss, "seconds": seconds,
                "images_per_s": done * cfg.batch_size / max(seconds, 1e-9), "skipped": self.skipped}

    def _checkpoint_on_rank0(self) -> None:
        """Rank 0 writes the checkpoint (the weights are the same everywhere); all processes learn whether it
        worked, so that a failed write stops every process instead of leaving the others waiting."""
        if not self.dist.active:
            self.save_checkpoint()
            return
        failure = None
        if self.dist.is_main:
            try:
                self.save_checkpoint()
            except (NoisecraftError, OSError) as e:
                failure = e
        failed = self.dist.all_reduce_sum(torch.tensor([float(failure is not None)]))
        if failure is not None:
            raise failure
        if failed.item() > 0:
            raise NoisecraftError(f"rank 0 could not write the checkpoint for step {self.step}; its error message "
                                  f"says why.")



def resume_trainer(run_dir: str | Path, dataset: ImageDataset | ShardDataset, device="cpu", progress=True, *,
                   distributed: Distributed | None = None, accumulate: int = 1, speed: SpeedOptions | None = None,
                   **train_overrides) -> Trainer:
    """A Trainer restored from a run directory; train_overrides (steps, minutes, ...) change the budget. The
    number of processes, accumulation and speed options may differ from the earlier invocations."""
    config = load_run_config(run_dir)
    overrides = {k: v for k, v in train_overrides.items() if v is not None}
    config = replace(config, train=replace(config.train, **overrides))
    trainer = Trainer(config, dataset, run_dir, device=device, progress=progress, distributed=distributed,
                      accumulate=accumulate, speed=speed)
    trainer.load_checkpoint()
    return trainer
