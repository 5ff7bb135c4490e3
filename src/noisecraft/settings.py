"""Reading settings from JSON: a dataclass from an object (`settings_from_dict`), and the values of its fields checked
against one declarative table (`check_fields`), every failure one clear sentence.

A settings dataclass lists its fields with a default and a comment each, then its table RULES, one row per field:
(field, type, allowed values, None allowed). The types and what "allowed" means for each:

    "int"     an interval such as "[1, inf)" or f"[2, {MAX_T}]": an integer (not a bool) inside it
    "float"   an interval such as "[0, 1)" or "(0, inf)": a finite number (int or float) inside it
    "bool"    None: true or false
    "str"     a tuple of choices, or None for any non-empty string
    "ints"    an interval: a list of integers inside it, kept as a tuple ("ints+": a list of at least one)
    "strs"    None: a list of strings
    "shape"   None: (C, H, W), three positive integers of sane size, kept as a tuple
"""

from __future__ import annotations

import math
from dataclasses import fields

from .errors import NoisecraftError, brief, short_repr as _short


def settings_from_dict(cls, data, what: str):
    """cls(**data), refusing a non-object and unknown keys (the dataclass's __post_init__ checks the values);
    `what` names the settings in the messages, e.g. "model" or "VAE"."""
    if not isinstance(data, dict):
        raise NoisecraftError(f"the {what} settings must be a JSON object, got {type(data).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise NoisecraftError(f"unknown {what} settings {unknown} in config; remove them (known: {sorted(known)}).")
    try:
        return cls(**data)
    except TypeError as e:    # a check that met a value of a type nobody expected
        raise NoisecraftError(f"the {what} settings are invalid ({brief(e)}); fix or delete the config.") from None


def settings_to_dict(settings) -> dict:
    """The dataclass `settings` as a JSON object, tuples as lists (what settings_from_dict reads back)."""
    return {f.name: _json_value(getattr(settings, f.name)) for f in fields(settings)}


def _json_value(value):
    return [_json_value(v) for v in value] if isinstance(value, (tuple, list)) else value


def check_fields(settings, rules, what: str) -> None:
    """Check every field of the dataclass instance `settings` named in `rules` (rows of field, type, allowed values,
    None allowed; see the module's docstring), and store lists as tuples. `what` names the settings in the message,
    e.g. "model setting base_channels must be a positive integer, got 0."."""
    for name, kind, allowed, none_ok in rules:
        value = getattr(settings, name)
        if value is None and none_ok:
            continue
        where = f"{what} setting {name}"
        if kind == "shape":
            setattr(settings, name, check_shape(where, value))
            continue
        if kind == "str" and allowed is not None:
            if not isinstance(value, str) or value not in allowed:
                raise NoisecraftError(f"{where} must be {_either(allowed)}; {_short(value)} is an unknown "
                                      f"{name.replace('_', ' ')}.")
            continue
        wanted = _wanted(kind, allowed)
        if not _fits(kind, allowed, value):
            raise NoisecraftError(f"{where} must be {wanted}{' or None' if none_ok else ''}, got {_short(value)}.")
        if kind.startswith("ints"):
            setattr(settings, name, tuple(value))


def _fits(kind: str, allowed, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str) and value != ""
    if kind == "strs":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind.startswith("ints"):
        return (isinstance(value, (list, tuple, range)) and (len(value) > 0 or kind == "ints")
                and all(_fits("int", allowed, v) for v in value))
    number = (int,) if kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
        return False
    low, high = (float(end) for end in allowed[1:-1].split(","))
    return ((low <= value if allowed[0] == "[" else low < value)
            and (value <= high if allowed[-1] == "]" else value < high))


def _wanted(kind: str, allowed) -> str:
    """What a value of `kind` inside `allowed` is, in words: "a positive integer", "in [0, 1)", ..."""
    if kind == "bool":
        return "true or false"
    if kind == "str":
        return "a non-empty string"
    if kind == "strs":
        return "a list of strings"
    low, high = (float(end) for end in allowed[1:-1].split(","))
    if kind == "float":
        named = {"(0, inf)": "a positive number", "[0, inf)": "a non-negative number"}
        return named.get(allowed, f"in {allowed}")
    plural = kind.startswith("ints")
    if allowed[0] == "[" and low in (0, 1):
        words = ("a " if not plural else "") + ("positive" if low == 1 else "non-negative") + " integer"
        words += ("s" if plural else "") + (f" (at most {int(high)})" if math.isfinite(high) else "")
    else:
        words = ("integers" if plural else "an integer") + f" in {allowed}"
    return words + (" (at least one)" if kind == "ints+" else "")


def _either(choices) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


# Upper bounds that no real run comes near; they turn a corrupted or hostile config into a clear error before
# anything is allocated (a schedule of 10^12 steps, a 10^9-channel image).
MAX_CHANNELS = 1024
MAX_VALUES_PER_IMAGE = 2 ** 28     # C·H·W: a 16384×16384 grey image or a 9459×9459 RGB one


def check_shape(where: str, shape) -> tuple[int, int, int]:
    """A (C, H, W) tuple of positive integers of sane size, from a list or tuple; `where` names it in the message."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise NoisecraftError(f"{where} must be three positive integers (C, H, W), got {_short(shape)}.")
    c, h, w = shape
    if c > MAX_CHANNELS or c * h * w > MAX_VALUES_PER_IMAGE:
        raise NoisecraftError(f"{where} {tuple(shape)} is too large (at most {MAX_CHANNELS} channels and "
                              f"{MAX_VALUES_PER_IMAGE} values per image); fix or delete the config.")
    return tuple(shape)


def check_data_section(data, path) -> None:
    """The "data" section of a VAE or VDM run's config.json: an object whose dataset is a name and whose
    image_shape is (C, H, W), which the commands read directly."""
    if not isinstance(data, dict):
        raise NoisecraftError(f"{path} has no valid 'data' section (got {_short(data)}); restore it or retrain.")
    if "image_shape" not in data:
        raise NoisecraftError(f"the 'data' section of {path} lacks image_shape; restore it or retrain.")
    check_shape("data.image_shape", data["image_shape"])
    if "dataset" in data and (not isinstance(data["dataset"], str) or not data["dataset"]):
        raise NoisecraftError(f"data.dataset in {path} must be a dataset name, got {_short(data['dataset'])}.")
