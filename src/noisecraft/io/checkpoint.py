"""Checkpoint files: atomic writes, safetensors weights, JSON configs, and weights-only torch loading.

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target (os.replace is atomic on POSIX), so a crash leaves either the old file or the new one, never a
half-written one. Nothing here unpickles arbitrary objects: weights are safetensors, and the optimizer
state goes through torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from ..errors import NoisecraftError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None], durable: bool = True) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it (unless durable=False: a file that can be
    remade, where the fsync would cost more than the work), then rename it over `path`.

    The temporary name keeps the target's extension, so writers that infer the format from the name
    (Pillow, matplotlib, numpy) pick the right one. On failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)     # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_temp_files(path: str | Path) -> list[Path]:
    """Delete the temporary files that interrupted `atomic_write(path)` calls left beside `path` (a process killed
    mid-write cannot clean up after itself); returns them. Only safe while nothing else is writing `path`."""
    path = Path(path)
    suffix = path.suffix or ".tmp"
    # mkstemp names: the prefix, 8 characters of [a-z0-9_], the suffix
    pattern = re.compile(rf"\.{re.escape(path.stem)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    stale = [p for p in (path.parent.iterdir() if path.parent.is_dir() else ()) if pattern.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write bytes to path atomically (temp file + fsync + rename; no fsync with durable=False)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable)


def save_json(obj, path: str | Path) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NoisecraftError(f"{path} does not exist; check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NoisecraftError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); restore or delete it.") from None
    except RecursionError:
        raise NoisecraftError(f"{path} nests JSON too deeply to be a noisecraft file; restore or delete it.") from None


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save a state dict as safetensors (contiguous CPU copies), atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or damaged file ends in a clear NoisecraftError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NoisecraftError(f"weights file {path} does not exist; check the run directory.") from None
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise NoisecraftError(f"weights file {path} is damaged or not a safetensors file ({e}); "
                              f"restore it or retrain.") from None


def save_torch(obj, path: str | Path) -> Path:
    """torch.save to bytes, written atomically. Only for tensors/containers that weights_only loading accepts."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_torch(path: str | Path):
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NoisecraftError(f"{path} does not exist; check the path.") from None
    except Exception as e:  # pickle errors come in many types; all mean the same to a user
        raise NoisecraftError(f"{path} could not be loaded safely ({type(e).__name__}); it is damaged or "
                              f"holds objects other than tensors, so it was refused.") from None


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written tmp_dir into place of final_dir.

    Between the two renames the previous version lives at `<final>.old`; `existing_state_dir` falls back
    to it, so a crash at any moment leaves one complete version on disk.
    """
    old = final_dir.with_name(final_dir.name + ".old")
    if (final_dir / "COMPLETE").exists():
        # final_dir is whole, so any `.old` is stale; move the current version aside.
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    elif final_dir.exists():
        shutil.rmtree(final_dir)  # never completed: nothing worth keeping
    # Otherwise an earlier crash between the two renames left `.old` as the only complete version:
    # it stays until the new one is in place.
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def existing_state_dir(final_dir: Path) -> Path | None:
    """The complete state directory to resume from: final_dir, or its `.old` twin after a crash mid-swap."""
    if (final_dir / "COMPLETE").exists():
        return final_dir
    old = final_dir.with_name(final_dir.name + ".old")
    if (old / "COMPLETE").exists():
        return old
    return None


def load_kind_config(run_dir: str | Path, kind: str, what: str, command: str) -> dict:
    """config.json of a run directory written by `noisecraft COMMAND`, checked to declare {"kind": kind};
    `what` names such a run in the error sentences ("an autoencoder")."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise NoisecraftError(f"{run_dir} is not {what} run directory (no config.json); pass the folder given to "
                              f"`noisecraft {command} --out`.")
    config = load_json(run_dir / "config.json")
    if not isinstance(config, dict) or config.get("kind") != kind:
        found = config.get("kind", "a diffusion model") if isinstance(config, dict) else "not a run"
        raise NoisecraftError(f"{run_dir} holds {found}, not {what}; pass a run made by `noisecraft {command}`.")
    return config
