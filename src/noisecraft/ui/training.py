"""Training from the UI: `noisecraft train` in a subprocess, its progress read back from the run directory.

    job = TrainingJob.start("digits", "unconditional", minutes=5, out_dir="runs/digits")
    job.status()      # {"state": "running", "step": 120, "steps": [...], "losses": [...], "grid": "…/step_0000100.png"}
    job.stop()        # SIGINT: the trainer ends its step, saves a checkpoint and exits (training/loop.py)
    job.resume(minutes=5)

The page stays responsive because the work happens in another process; the two share the cores without
oversubscription (two torch processes with 2 threads each on 2 cores slowed a job 10-25x): `thread_split` gives the
trainer OMP_NUM_THREADS = MKL_NUM_THREADS = k threads and the server the rest, never more than os.cpu_count() in all.
Jobs are registered by their resolved run directory, so every browser tab (and every call) sees the same job; a run
directory without a job of this server (trained by the command line, or before a restart) is shown from its files.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import NoisecraftError

# kind -> the command line that trains it (and whether it can resume)
KINDS = {
    "unconditional": (["train"], True),
    "class-conditional": (["train", "--conditional"], True),
    "vae": (["train-vae"], False),
}
OUTPUT_LOG = "ui-train.log"         # the subprocess's stdout and stderr, inside the run directory
LOG_EVERY = 10                      # log.csv rows often enough for a live loss curve

_JOBS: dict[str, TrainingJob] = {}
_LOCK = threading.Lock()


def thread_split(trainer_threads: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(server threads, trainer threads) with server + trainer <= cores (both at least 1; one core: 1 and 1).
    By default each gets half (the server keeps the odd core): generating and training stay about as fast."""
    cores = max(1, cores or os.cpu_count() or 1)
    if cores == 1:
        return 1, 1
    trainer = cores // 2 if trainer_threads is None else int(trainer_threads)
    if trainer < 1:
        raise NoisecraftError(f"the trainer needs at least 1 thread, got {trainer_threads!r}.")
    trainer = min(trainer, cores - 1)
    return cores - trainer, trainer


def _key(run_dir) -> str:
    return str(Path(run_dir).expanduser().resolve())


def read_loss_log(run_dir) -> tuple[list[int], list[float]]:
    """(steps, losses) of the run's log.csv so far; a missing file, a half-written last row or a non-finite loss
    is skipped, never an error (the trainer may be writing it right now)."""
    path = Path(run_dir) / "log.csv"
    steps, losses = [], []
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step, loss = int(float(row["step"])), float(row["loss"])
                except (KeyError, TypeError, ValueError):
                    continue
                if math.isfinite(loss):
                    steps.append(step)
                    losses.append(loss)
    except (OSError, csv.Error):
        pass
    return steps, losses


def newest_grid(run_dir) -> Path | None:
    """The newest sample grid in the run's samples/ folder (the trainer writes samples/step_NNNNNNN.png)."""
    folder = Path(run_dir) / "samples"
    grids = sorted(p for p in folder.glob("step_*.png") if not p.name.startswith(".")) if folder.is_dir() else []
    return grids[-1] if grids else None


def loss_figure(run_dir):
    """The loss curve of a run as a PIL image (viz.plots.plot_loss_curve), or None before its first log row; a
    half-written last row is left out."""
    import tempfile

    from PIL import Image

    from ..viz.plots import plot_loss_curve
    steps, losses = read_loss_log(run_dir)
    if not steps:
        return None
    with tempfile.TemporaryDirectory(prefix="noisecraft-ui-") as folder:
        clean = Path(folder) / "log.csv"        # the rows read so far (the trainer may be writing the last one)
        clean.write_text("step,loss\n" + "".join(f"{s},{v!r}\n" for s, v in zip(steps, losses)))
        try:
            path = plot_loss_curve(clean, Path(folder) / "loss.png")
        except NoisecraftError:
            return None
        with Image.open(path) as im:
            return im.convert("RGB")


class TrainingJob:
    """One run directory and the training process working on it (if any)."""

    def __init__(self, run_dir, kind: str = "unconditional", dataset: str | None = None):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.kind, self.dataset = kind, dataset
        self._read_config()
        self.process: subprocess.Popen | None = None
        self.threads: tuple[int, int] = thread_split()
        self.command: list[str] = []
        self.stop_requested = False
        self._lock = threading.Lock()

    def _read_config(self) -> None:
        """kind and dataset of a run trained before (by the command line, or an earlier server)."""
        import json
        try:
            config = json.loads((self.run_dir / "config.json").read_text())
        except (OSError, ValueError):
            return
        if isinstance(config, dict):
            if config.get("kind") == "vae":
                self.kind = "vae"
            elif isinstance(config.get("data"), dict):
                self.kind = "class-conditional" if config["data"].get("conditional") else self.kind
            data = config.get("data")
            if isinstance(data, dict) and isinstance(data.get("dataset"), str):
                self.dataset = data["dataset"]

    # --- the registry -----------------------------------------------------------------------------

    @classmethod
    def get(cls, run_dir) -> TrainingJob:
        """The job of this run directory: the registered one, else a new idle one (registered)."""
        with _LOCK:
            job = _JOBS.get(_key(run_dir))
            if job is None:
                job = _JOBS[_key(run_dir)] = cls(run_dir)
            return job

    @staticmethod
    def all() -> list[TrainingJob]:
        with _LOCK:
            return list(_JOBS.values())

    @classmethod
    def start(cls, dataset: str, kind: str = "unconditional", minutes: float | None = 5.0, out_dir=None,
              threads: int | None = None, *, steps: int | None = None, sample_every: int | None = None,
              log_every: int = LOG_EVERY, extra_args=(), set_server_threads: bool = True) -> TrainingJob:
        """Start training a new run in out_dir on `dataset` (digits | mnist | fashion-mnist | cifar10 | folder:PATH), as
        `kind` (unconditional | class-conditional | vae), for `minutes` and/or `steps`. threads: the trainer's
        (default: all cores but one); the server keeps the rest (set here unless set_server_threads=False)."""
        if kind not in KINDS:
            raise NoisecraftError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}.")
        if out_dir is None:
            raise NoisecraftError("say where the run goes: an output folder for the new run.")
        if minutes is None and steps is None:
            raise NoisecraftError("give a training budget: minutes and/or steps.")
        if (Path(out_dir) / "config.json").exists():
            raise NoisecraftError(f"{out_dir} already holds a run; resume it, or choose another folder.")
        job = cls.get(out_dir)
        with job._lock:
            if job.running:
                raise NoisecraftError(f"{job.run_dir} is already training; stop it first.")
            job.kind, job.dataset = kind, str(dataset)
            args = [*KINDS[kind][0], "--dataset", str(dataset), "--out", str(job.run_dir)]
            job._launch(args, minutes, steps, sample_every, log_every if kind != "vae" else None, extra_args,
                        threads, set_server_threads)
        return job

    def resume(self, minutes: float | None = 5.0, *, steps: int | None = None, sample_every: int | None = None,
               log_every: int = LOG_EVERY, threads: int | None = None, extra_args=(),
               set_server_threads: bool = True) -> TrainingJob:
        """Continue the run from its last checkpoint for `minutes` more and/or up to `steps` in total."""
        from ..io.checkpoint import existing_state_dir
        if minutes is None and steps is None:
            raise NoisecraftError("give a training budget: minutes and/or steps.")
        with self._lock:
            if self.running:
                raise NoisecraftError(f"{self.run_dir} is already training.")
            self._read_config()
            if not KINDS.get(self.kind, ([], False))[1]:
                raise NoisecraftError(f"{self.kind} runs cannot be resumed; start a new one.")
            if existing_state_dir(self.run_dir / "state") is None:
                raise NoisecraftError(f"{self.run_dir} has no checkpoint to resume from; start a new run there.")
            self._launch(["train", "--resume", str(self.run_dir)], minutes, steps, sample_every, log_every, extra_args,
                         threads, set_server_threads)
        return self

    def _launch(self, args, minutes, steps, sample_every, log_every, extra_args, threads, set_server_threads):
        server, trainer = self.threads = thread_split(threads)
        for flag, value in (("--minutes", minutes), ("--steps", steps), ("--sample-every", sample_every),
                            ("--log-every", log_every)):
            if value is not None:
                args += [flag, f"{value:g}" if isinstance(value, float) else str(int(value))]
        self.command = [sys.executable, "-m", "noisecraft", *args, *map(str, extra_args)]
        env = {**os.environ, "OMP_NUM_THREADS": str(trainer), "MKL_NUM_THREADS": str(trainer),
               "PYTHONUNBUFFERED": "1"}
        if set_server_threads:
            import torch
            torch.set_num_threads(server)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / OUTPUT_LOG, "ab") as out:
            out.write(f"\n$ {' '.join(self.command[1:])}\n".encode())
            out.flush()
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL)
        self.stop_requested = False

    # --- watching and stopping ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def threads_note(self) -> str:
        server, trainer = self.threads
        return (f"training uses {trainer} thread{'s' * (trainer > 1)} and the UI {server}, for the "
                f"{os.cpu_count()} cores of this machine (no oversubscription)")

    def _last_output_line(self) -> str:
        try:
            with open(self.run_dir / OUTPUT_LOG, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = f.read().decode(errors="replace").replace("\r", "\n").splitlines()
        except OSError:
            return ""
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1] if lines else ""

    def status(self) -> dict:
        """Where the run stands: state (idle | running | stopping | stopped | finished | failed), the last logged
        step, the loss curve so far (steps, losses), the newest sample grid (a path or None), the process's last
        output line and the thread split."""
        from ..io.checkpoint import existing_state_dir
        steps, losses = read_loss_log(self.run_dir)
        code = None if self.process is None else self.process.poll()
        if self.process is None:
            state = "stopped" if existing_state_dir(self.run_dir / "state") is not None else "idle"
        elif code is None:
            state = "stopping" if self.stop_requested else "running"
        elif code == 0 or (self.stop_requested and code in (130, -signal.SIGINT)):
            state = "stopped" if self.stop_requested else "finished"
        else:
            state = "failed"
        grid = newest_grid(self.run_dir)
        return {"run_dir": str(self.run_dir), "kind": self.kind, "dataset": self.dataset, "state": state,
                "step": steps[-1] if steps else 0, "steps": steps, "losses": losses,
                "grid": None if grid is None else str(grid), "message": self._last_output_line(),
                "returncode": code, "threads": self.threads_note()}

    def stop(self, wait: bool = True, timeout: float = 120.0) -> dict:
        """Ask the trainer to stop with SIGINT (as Ctrl-C): it finishes its step, saves a checkpoint and exits.
        With wait, return once it has exited (or after timeout seconds); returns status()."""
        if self.running:
            self.stop_requested = True
            if os.name == "nt":          # no SIGINT for a child on Windows: ask the process to end
                self.process.terminate()
            else:
                self.process.send_signal(signal.SIGINT)
            if wait:
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        return self.status()

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the process ends (or timeout); returns status()."""
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.status()


def wait_until(condition, timeout: float, every: float = 0.2) -> bool:
    """Poll condition() until it is true or timeout seconds pass (for tests and simple UIs)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


# --- the tab's handlers (plain functions; build_tab wires them to Gradio) -------------------------

DATASETS = ["digits", "mnist", "fashion-mnist", "cifar10"]


def run_folder(root, name: str) -> Path:
    """root/name for a new run; the name is one plain folder name (no path, nothing hidden), so a web page cannot
    make the server write anywhere else."""
    import re
    name = str(name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise NoisecraftError(f"a run name is one folder name of letters, digits, '.', '_' or '-', got {name!r}.")
    return Path(root).expanduser().resolve() / name


def list_runs(roots) -> list[str]:
    """Diffusion runs under the roots (folders with a config.json and a log.csv, two levels deep) and the runs of
    this server's jobs, newest first."""
    found = {job.run_dir for job in TrainingJob.all() if job.run_dir.exists()}
    for root in roots:
        root = Path(root).expanduser()
        for config in list(root.glob("*/config.json")) + list(root.glob("*/*/config.json")):
            if (config.parent / "log.csv").exists():
                found.add(config.parent.resolve())
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)]


def status_text(status: dict) -> str:
    """One Markdown line for a status() dict."""
    losses = status["losses"]
    loss = f", loss {losses[-1]:.4f}" if losses else ""
    line = f"**{status['state']}** — {Path(status['run_dir']).name}: step {status['step']}{loss}"
    if status["state"] in ("running", "stopping"):
        line += f" · {status['threads']}"
    if status["state"] == "failed" and status["message"]:
        line += f" · {status['message']}"
    return line


def build_tab(library, threads: int | None = None) -> None:
    """The "Train" tab, inside a gr.Blocks being built (app.py calls it with the trainer's threads). New runs go
    to the first --models folder. Gradio is imported here only."""
    import gradio as gr

    from .engine import one_sentence
    root = library.roots[0]

    def runs_update(value=None):
        choices = list_runs(library.roots)
        return gr.update(choices=choices, value=value if value in choices else (choices[0] if choices else None))

    def start(dataset, kind, minutes, name):
        try:
            job = TrainingJob.start(dataset, kind, float(minutes), run_folder(root, name), threads,
                                    set_server_threads=False)
            return runs_update(str(job.run_dir)), f"▶ started: {job.threads_note()}."
        except Exception as e:      # noqa: BLE001 (a message, never a traceback)
            return gr.skip(), f"⚠ {one_sentence(e)}"

    def job_for(run) -> TrainingJob:
        if not run:
            raise NoisecraftError("pick a run first.")
        if not library.contains(Path(run).expanduser().resolve()):
            raise NoisecraftError("that run is outside the model folders; the UI only trains under --models.")
        return TrainingJob.get(run)

    def act(run, action, minutes):
        try:
            job = job_for(run)
            if action == "stop":
                return status_text(job.stop(wait=False))
            job.resume(float(minutes), threads=threads, set_server_threads=False)
            return f"▶ resumed: {job.threads_note()}."
        except Exception as e:      # noqa: BLE001
            return f"⚠ {one_sentence(e)}"

    def watch(run):
        if not run:
            return "no run selected.", None, None
        try:
            status = job_for(run).status()
            return status_text(status), loss_figure(status["run_dir"]), status["grid"]
        except Exception as e:      # noqa: BLE001
            return f"⚠ {one_sentence(e)}", None, None

    with gr.Row():
        with gr.Column():
            dataset = gr.Dropdown(DATASETS, value="digits", allow_custom_value=True,
                                  label="Dataset (or folder:PATH)", elem_id="train-dataset")
            kind = gr.Radio(list(KINDS), value="unconditional", label="Model", elem_id="train-kind")
            minutes = gr.Slider(0.5, 120, value=5, step=0.5, label="Minutes", elem_id="train-minutes")
            name = gr.Textbox("digits-ui", label=f"Run name (in {root})", elem_id="train-name")
            start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
            message = gr.Markdown(elem_id="train-message")
        with gr.Column():
            run = gr.Dropdown(list_runs(library.roots), label="Runs", elem_id="train-runs")
            with gr.Row():
                stop_btn = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="train-stop")
                resume_btn = gr.Button("Resume", elem_id="train-resume")
            status = gr.Markdown(elem_id="train-status")
            loss = gr.Image(label="Loss", type="pil", interactive=False, elem_id="train-loss")
            grid = gr.Image(label="Newest samples", type="filepath", interactive=False, elem_id="train-grid")
    start_btn.click(start, [dataset, kind, minutes, name], [run, message], api_name="train_start",
                    concurrency_limit=None)
    stop_btn.click(lambda r, m: act(r, "stop", m), [run, minutes], message, api_name="train_stop",
                   concurrency_limit=None)
    resume_btn.click(lambda r, m: act(r, "resume", m), [run, minutes], message, api_name="train_resume",
                     concurrency_limit=None)
    run.change(watch, run, [status, loss, grid], api_name=False, concurrency_limit=None)
    gr.Timer(2.0).tick(watch, run, [status, loss, grid], api_name=False, concurrency_limit=None,
                       show_progress="hidden")
