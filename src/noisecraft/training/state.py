"""The exact-resume state of a training run: one `state/` folder written as a whole (temp folder, then an atomic
swap) and read back. Shared by the diffusion Trainer and the VDM trainer, whose runs keep the same layout:
model / ema weights, optimizer state, RNG states (the trainer's generator and torch's global one), step and
elapsed time, a COMPLETE marker written last, and any extra tensors a trainer needs (e.g. importance sampling)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import NoisecraftError
from ..io.checkpoint import (existing_state_dir, load_json, load_torch, load_weights, replace_dir, save_json,
                             save_torch, save_weights)


def save_training_state(out_dir: Path, *, model, ema, optimizer, generator: torch.Generator, step: int,
                        elapsed_s: float, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write out_dir/state atomically; `extra` maps file stems to tensor dicts saved beside the rest."""
    tmp = out_dir / "state.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(model.state_dict(), tmp / "model.safetensors")
    save_weights(ema.state_dict(), tmp / "ema.safetensors")
    save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
    save_weights({"generator": generator.get_state(), "torch_global": torch.get_rng_state()}, tmp / "rng.safetensors")
    for stem, tensors in (extra or {}).items():
        save_weights(tensors, tmp / f"{stem}.safetensors")
    save_json({"step": step, "elapsed_s": elapsed_s}, tmp / "trainer.json")
    save_json({"step": step}, tmp / "COMPLETE")   # written last: marks the folder as whole
    replace_dir(tmp, out_dir / "state")
    return out_dir / "state"


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
        raise NoisecraftError(f"the weights in {state} do not fit the model in config.json ({str(e)[:200]}); "
                              f"the run directory is inconsistent.") from None
    rng = load_weights(state / "rng.safetensors")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_global"])
    return state, load_json(state / "trainer.json")
