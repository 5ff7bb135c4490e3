"""argparse value types that refuse impossible numbers at parse time, with argparse's one-line error
("noisecraft sample: error: argument --n: must be at least 1, got -1"), and the comma-separated integer lists
that model flags take ("1,2,2")."""

from __future__ import annotations

import argparse
import math

from ..errors import NoisecraftError


def int_at_least(lo: int):
    """An integer >= lo."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def finite_float(lo: float | None = None, positive: bool = False):
    """A finite number (not nan or inf), optionally >= lo or > 0."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        if lo is not None and value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo:g}, got {text}")
        return value
    parse.__name__ = "finite number"
    return parse


positive_int = int_at_least(1)
count = int_at_least(0)



def int_list(text: str, flag: str, allow_none: bool = False) -> tuple[int, ...]:
    """"1,2,2" -> (1, 2, 2); with allow_none, "none", "off" or "" -> (). Anything else (an empty item, a word,
    a fraction) is one clear sentence; ranges are checked by the config that receives the list."""
    if allow_none and text.strip().lower() in ("none", "off", ""):
        return ()
    try:
        return tuple(int(part.strip()) for part in text.split(","))
    except ValueError:
        raise NoisecraftError(f"{flag} takes integers separated by commas, such as 1,2,2, got {text!r}"
                              f"{' (or none)' if allow_none else ''}.") from None
