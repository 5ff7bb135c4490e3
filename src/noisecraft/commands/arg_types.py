"""argparse value types that refuse impossible numbers at parse time, with argparse's one-line error
("noisecraft sample: error: argument --n: must be at least 1, got -1")."""

from __future__ import annotations

import argparse
import math


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

