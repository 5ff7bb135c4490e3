"""Training logs as CSV: one row per logging interval, the header written with the first row."""

from __future__ import annotations

import csv
from pathlib import Path


def append_row(path: str | Path, header: list[str], row: list) -> None:
    """Append `row` to the CSV file at `path`, writing `header` first if the file does not exist yet."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)
