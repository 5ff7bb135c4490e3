"""The bookkeeping every training loop shares: the step/time budget, the progress bar, windowed means for the log,
when to checkpoint, and Ctrl-C. The trainers (diffusion, VAE, CLIP, VDM) keep what differs: the step itself,
what they log and how they save.

    loop = TrainingLoop(steps=..., minutes=..., step=trainer.step, batch_size=64, log_every=25, checkpoint_every=500)
    with loop:                                # Ctrl-C ends the loop quietly; the bar is always closed
        while loop.more(step):
            step = ...one training step...
            window = loop.stepped(step, {"loss": loss})    # every log_every steps: the window's means
            if window: write a log row with window["loss"], window["images_per_s"]
            if loop.checkpoint_due(step): save
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..errors import NoisecraftError


class TrainingLoop:
    def __init__(self, *, steps: int | None, minutes: float | None, step: int = 0, batch_size: int,
                 log_every: int = 0, checkpoint_every: int = 0, progress: bool = True, desc: str | None = None,
                 on_interrupt: str = "interrupted: saving a checkpoint so that --resume continues from here"):
        if steps is None and minutes is None:
            raise NoisecraftError("give a training budget: --steps N or --minutes M.")
        self.steps, self.deadline = steps, None if minutes is None else minutes * 60.0
        self.start_step, self.batch_size = step, batch_size
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.on_interrupt = on_interrupt
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True, desc=desc)
        self._window: list[dict[str, float]] = []
        self._window_t0, self._window_step = self.t0, step

    # --- the budget ------------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds since the loop started (this invocation only)."""
        return time.perf_counter() - self.t0

    def time_up(self) -> bool:
        return self.deadline is not None and self.elapsed() >= self.deadline

    def more(self, step: int, time_up: bool | None = None) -> bool:
        """Whether to take another step: within the step budget and the time budget (`time_up` overrides the
        local clock: distributed runs share rank 0's)."""
        return (self.steps is None or step < self.steps) and not (self.time_up() if time_up is None else time_up)

    def time_left(self, step: int, images_per_s: float) -> str:
        """m:ss until the budget ends, for the progress bar."""
        if self.deadline is not None:
            left = max(self.deadline - self.elapsed(), 0.0)
        elif images_per_s > 0:
            left = (self.steps - step) * self.batch_size / images_per_s
        else:
            return "?"
        return f"{int(left // 60)}:{int(left % 60):02d}"

    # --- after each step ------------------------------------------------------------------------

    def stepped(self, step: int, values: dict[str, float]) -> dict[str, float] | None:
        """Record a finished step's values; every `log_every` steps return the means over the steps since the
        last log row, with "images_per_s" over that window, and start a new window."""
        self.bar.update(1)
        self._window.append(values)
        if not self.log_every or step % self.log_every:
            return None
        now = time.perf_counter()
        means = {k: sum(v[k] for v in self._window) / len(self._window) for k in self._window[0]}
        means["images_per_s"] = (step - self._window_step) * self.batch_size / max(now - self._window_t0, 1e-9)
        self._window, self._window_t0, self._window_step = [], now, step
        return means

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0

    # --- Ctrl-C and the bar --------------------------------------------------------------------------

    def __enter__(self) -> "TrainingLoop":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        if interrupted:
            self.bar.write(self.on_interrupt)
        self.bar.close()
        return interrupted      # Ctrl-C ends the loop; the trainer then saves as usual


class TrainingDiverged(NoisecraftError):
    pass
