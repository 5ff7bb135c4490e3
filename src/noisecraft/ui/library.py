"""The models the UI may open: what lies under the folders given with --models, and nothing else.

A path typed into the UI is resolved (symlinks included) and must land inside one of those folders, so the web page
can never make the server read an arbitrary file. Listing only looks at names and the presence of config files; no
weights are read until a model is chosen, and loading one goes through `load_pipeline` (safetensors, or
`torch.load(weights_only=True)`: a pickle that would run code is refused).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import NoisecraftError

WEIGHT_SUFFIXES = (".safetensors", ".ckpt")
MAX_DEPTH = 3            # runs/<name>/, models/sd/<name>.safetensors, ...
MAX_ENTRIES = 500


@dataclass(frozen=True)
class ModelEntry:
    path: Path       # resolved
    kind: str        # "run" | "diffusers" | "single-file"
    label: str       # what the dropdown shows


def _kind(path: Path) -> str | None:
    if path.is_file():
        return "single-file" if path.suffix.lower() in WEIGHT_SUFFIXES else None
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return "diffusers"
    if (path / "config.json").is_file() and ((path / "model.safetensors").is_file()
                                             or (path / "state" / "model.safetensors").is_file()):
        return "run"
    return None


class ModelLibrary:
    """The --models folders (default ./runs) and the models found under them."""

    def __init__(self, roots):
        roots = [Path(r).expanduser() for r in (roots or ["runs"])]
        self.roots = []
        for root in roots:
            real = root.resolve()
            if real not in self.roots:
                self.roots.append(real)

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def scan(self) -> list[ModelEntry]:
        """Every model under the roots (a root may itself be a model), sorted by label; folders that are models
        are not searched further, hidden folders are skipped."""
        found: list[ModelEntry] = []
        seen: set[Path] = set()

        def add(path: Path, kind: str, root: Path):
            real = path.resolve()
            if real in seen or not self.contains(real):
                return
            seen.add(real)
            rel = path.relative_to(root) if path != root else Path(path.name)
            label = f"{root.name}/{rel}" if path != root else str(rel)
            found.append(ModelEntry(real, kind, f"{label}  ({kind})"))

        def walk(folder: Path, root: Path, depth: int):
            if len(found) >= MAX_ENTRIES:
                return
            try:
                children = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                return
            for child in children:
                if child.name.startswith("."):
                    continue
                path = Path(child.path)
                try:
                    kind = _kind(path)
                    is_dir = child.is_dir()
                except OSError:
                    continue
                if kind is not None:
                    add(path, kind, root)
                elif is_dir and depth < MAX_DEPTH:
                    walk(path, root, depth + 1)

        for root in self.roots:
            if not root.exists():
                continue
            kind = _kind(root)
            if kind is not None:
                add(root, kind, root.parent)
            elif root.is_dir():
                walk(root, root, 1)
        return sorted(found, key=lambda e: e.label)

    def contains(self, real: Path) -> bool:
        return any(real == root or real.is_relative_to(root) for root in self.roots)

    def resolve(self, text) -> Path:
        """The model path behind what the user typed or picked (a listed label, a path inside a models folder, or
        one relative to it); anything that resolves outside the folders is refused with one sentence."""
        text = str(text or "").strip()
        if not text:
            raise NoisecraftError("choose a model first: pick one from the list (models are searched under "
                                  f"{self.describe()}).")
        if text.endswith(")") and "  (" in text:            # a dropdown label: "runs/mnist  (run)"
            for entry in self.scan():
                if entry.label == text:
                    return entry.path
            text = text.rsplit("  (", 1)[0]
        try:
            candidates = [Path(text).expanduser()]
            if not candidates[0].is_absolute():
                candidates = [root / text for root in self.roots] + [root.parent / text for root in self.roots] \
                    + candidates
            for candidate in candidates:
                real = candidate.resolve()
                if self.contains(real) and real.exists():
                    return real
            real = candidates[-1].resolve()
        except (OSError, ValueError, RuntimeError):
            raise NoisecraftError("that model path is not a valid path; pick a model from the list.") from None
        if not self.contains(real):
            raise NoisecraftError(f"{text} is outside the model folders ({self.describe()}); the UI only opens "
                                  "models under the folders given with --models.")
        raise NoisecraftError(f"{text} does not exist under the model folders ({self.describe()}); pick a model "
                              "from the list.")
