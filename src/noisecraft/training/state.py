"""The exact-resume state of a training run: one `state/` folder written as a whole (temp folder, then an atomic
swap) and read back. Shared by the diffusion Trainer and the VDM trainer, whose runs keep the same layout:
model / ema weights, optimizer state, RNG states (the trainer's generator and torch's global one), step and
elapsed time, a COMPLETE marker written last, and any extra tensors a trainer needs (e.g. importance sampling).

A write that fails (disk full, quota, I/O error) removes its half-written state.tmp and leaves the previous state
whole; `reporting_write_errors` turns the error into one sentence saying what is still on disk. A process killed
mid-write cannot clean up: `discard_unfinished_writes` does it when the run is resumed."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import NoisecraftError, brief
from ..io.checkpoint import (
    existing_state_dir,
    load_json,
    load_torch,
    load_weights,
    remove_temp_files,
    replace_dir,
    save_json,
    save_torch,
    save_weights,
)


def save_training_state(out_dir: Path, *, model, ema, optimizer, generator: torch.Generator, step: int,
                        elapsed_s: float, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write out_dir/state atomically; `extra` maps file stems to tensor dicts saved beside the rest."""
    tmp = out_dir / "state.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        save_weights(model.state_dict(), tmp / "model.safetensors")
        save_weights(ema.state_dict(), tmp / "ema.safetensors")
        save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        save_weights({"generator": generator.get_state(), "torch_global": torch.get_rng_state()},
                     tmp / "rng.safetensors")
        for stem, tensors in (extra or {}).items():
            save_weights(tensors, tmp / f"{stem}.safetensors")
        save_json({"step": step, "elapsed_s": elapsed_s}, tmp / "trainer.json")
        save_json({"step": step}, tmp / "COMPLETE")   # written last: marks the folder as whole
        replace_dir(tmp, out_dir / "state")
    except BaseException:
        # state.tmp is never resumed from, so a half-written one is only wasted space (on a full disk, too much)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "state"


def checkpoint_step(out_dir: Path) -> int | None:
    """The step of the complete training state in out_dir (state/, or state.old after a crash mid-swap), if any."""
    state = existing_state_dir(Path(out_dir) / "state")
    return None if state is None else int(load_json(state / "COMPLETE")["step"])


def weights_step(path: Path) -> int | None:
    """The step recorded in the metadata of a weights file (model.safetensors), or None if it has none."""
    try:
        with safe_open(path, "pt") as f:
            return int((f.metadata() or {})["step"])
    except (OSError, KeyError, ValueError, SafetensorError):
        return None


@contextmanager
def reporting_write_errors(out_dir: Path, step: int):
    """Turn an error of the operating system while a checkpoint of `step` is written (disk full, quota, file too
    large, I/O error, read-only disk) into a NoisecraftError that says what is still on disk and how to go on.

    The writes are atomic, so what survives is read back after the failure: the previous training state, or
    (when only the EMA weights that follow it failed) the new state beside the previous model.safetensors.
    OSErrors without an errno are not the operating system's and pass through unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        out_dir = Path(out_dir)
        reason, saved = os.strerror(e.errno), checkpoint_step(out_dir)
        go_on = f"free some space and continue with --resume {out_dir}"
        if saved == step:
            ema = weights_step(out_dir / "model.safetensors")
            holds = ("there is no model.safetensors yet" if ema is None else
                     f"model.safetensors still holds the EMA weights of step {ema}")
            msg = (f"could not finish the checkpoint of step {step} in {out_dir} ({reason}); its training state is "
                   f"saved but {holds} — {go_on}, which rewrites it.")
        elif saved is not None:
            msg = (f"could not write the checkpoint of step {step} to {out_dir} ({reason}); the previous checkpoint "
                   f"(step {saved}) is kept — {go_on}.")
        else:
            msg = (f"could not write the checkpoint of step {step} to {out_dir} ({reason}) and it holds no earlier "
                   f"checkpoint — free some space, delete {out_dir} and start again.")
        raise NoisecraftError(msg) from None


def discard_unfinished_writes(out_dir: Path, names: tuple[str, ...]) -> None:
    """Remove what processes killed mid-checkpoint left in out_dir: state.tmp, a state.old that a complete state/
    supersedes, and the temporary files of the atomic writes of `names` (e.g. model.safetensors). Call it only when
    resuming, with no other writer."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "state.tmp", ignore_errors=True)
    if existing_state_dir(out_dir / "state") == out_dir / "state":
        shutil.rmtree(out_dir / "state.old", ignore_errors=True)
    for name in names:
        remove_temp_files(out_dir / name)


def load_training_state(out_dir: Path, *, model, ema, optimizer, generator: torch.Generator,
                        start_anew: str) -> tuple[Path, dict]:
    """Restore model, EMA, optimizer and RNG states from out_dir/state; return (state folder, trainer.json).
    start_anew: how to start over when there is nothing to resume (ends the error sentence)."""
    state = existing_state_dir(out_dir / "state")
    if state is None:
        raise NoisecraftError(f"{out_dir} holds no complete training state to resume from; {start_anew}.")
    try:
        model.load_state_dict(load_weights(state / "model.safetensors"))
        ema.load_state_dict(load_weights(state / "ema.safetensors"))
        optimizer.load_state_dict(load_torch(state / "optimizer.pt"))
    except (RuntimeError, ValueError) as e:
        raise NoisecraftError(f"the weights in {state} do not fit the model in config.json ({brief(e)}); "
                              f"the run directory is inconsistent.") from None
    rng = load_weights(state / "rng.safetensors")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_global"])
    return state, load_json(state / "trainer.json")
