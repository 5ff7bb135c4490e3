"""Building a settings dataclass from a JSON object, with one clear sentence for anything that does not fit."""

from __future__ import annotations

from dataclasses import fields

from .errors import NoisecraftError


def settings_from_dict(cls, data, what: str):
    """cls(**data), refusing a non-object and unknown keys (the dataclass's __post_init__ checks the values);
    `what` names the settings in the messages, e.g. "model" or "VAE"."""
    if not isinstance(data, dict):
        raise NoisecraftError(f"the {what} settings must be a JSON object, got {type(data).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise NoisecraftError(f"unknown {what} settings {unknown} in config; remove them (known: {sorted(known)}).")
    return cls(**data)
