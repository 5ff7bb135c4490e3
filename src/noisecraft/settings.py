"""Reading settings from JSON: a dataclass from an object, and the checks of numbers, choices and shapes, each
failing with one clear sentence."""

from __future__ import annotations

import math
from dataclasses import fields

from .errors import NoisecraftError, short_repr as _short


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


def check_number(section: str, name: str, value, lo=None, hi=None, integer=False, allow_none=False):
    if value is None and allow_none:
        return
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise NoisecraftError(f"{section}.{name} must be {kind}, got {_short(value)}.")
    if not math.isfinite(value):   # NaN passes every comparison below, and inf is never a useful setting
        raise NoisecraftError(f"{section}.{name} must be a finite number, got {value!r}.")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise NoisecraftError(f"{section}.{name} must be {bounds}, got {value!r}.")


# Upper bounds that no real run comes near; they turn a corrupted or hostile config into a clear error before
# anything is allocated (a schedule of 10^12 steps, a 10^9-channel image).
MAX_CHANNELS = 1024


MAX_VALUES_PER_IMAGE = 2 ** 28     # C·H·W: a 16384×16384 grey image or a 9459×9459 RGB one


def check_shape(section: str, name: str, shape) -> tuple[int, int, int]:
    """A (C, H, W) tuple of positive integers of sane size, from a list or tuple."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise NoisecraftError(f"{section}.{name} must be three positive integers (C, H, W), got {_short(shape)}.")
    c, h, w = shape
    if c > MAX_CHANNELS or c * h * w > MAX_VALUES_PER_IMAGE:
        raise NoisecraftError(f"{section}.{name} {tuple(shape)} is too large (at most {MAX_CHANNELS} channels and "
                              f"{MAX_VALUES_PER_IMAGE} values per image); fix or delete the config.")
    return tuple(shape)


def check_choice(section: str, name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise NoisecraftError(f"unknown {section}.{name} {_short(value)}; choose one of {', '.join(choices)}.")


def check_data_section(data, path) -> None:
    """The "data" section of a VAE or VDM run's config.json: an object whose dataset is a name and whose
    image_shape is (C, H, W), which the commands read directly."""
    if not isinstance(data, dict):
        raise NoisecraftError(f"{path} has no valid 'data' section (got {_short(data)}); restore it or retrain.")
    if "image_shape" not in data:
        raise NoisecraftError(f"the 'data' section of {path} lacks image_shape; restore it or retrain.")
    check_shape("data", "image_shape", data["image_shape"])
    if "dataset" in data and (not isinstance(data["dataset"], str) or not data["dataset"]):
        raise NoisecraftError(f"data.dataset in {path} must be a dataset name, got {_short(data['dataset'])}.")
