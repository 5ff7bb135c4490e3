"""Training logs as CSV: one row per logging interval, the header written with the first row.

Rows are appended as training goes, so a run that is killed can leave rows for steps past its last checkpoint
(and, when a write is cut short, a torn last line). `truncate_log` puts the log back in step with the checkpoint a
run resumes from, so that after any sequence of kills and resumes every step appears exactly once.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import NoisecraftError
from .checkpoint import atomic_write_bytes


def append_row(path: str | Path, header: list[str], row: list) -> None:
    """Append `row` to the CSV file at `path`, writing `header` first if the file does not exist yet (or is empty).

    A failed write (disk full, quota, I/O error) ends in a NoisecraftError; the checkpoints are not touched."""
    path = Path(path)
    try:
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(header)
            writer.writerow(row)
    except OSError as e:
        if e.errno is None:
            raise
        raise NoisecraftError(f"could not append to the training log {path} ({os.strerror(e.errno)}); the last "
                              f"checkpoint is kept — free some space and resume the run.") from None


def truncate_log(path: str | Path, last_step: int) -> bool:
    """Keep the header and the complete rows of steps <= `last_step`; drop later rows and torn lines.

    A line is torn when it lacks its newline or does not have as many fields as the header. The file is rewritten
    atomically, and only when something was dropped; returns whether it was. A missing file is left missing, and
    a file whose header itself is torn is removed (the next `append_row` writes a new one)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return False
    lines = text.splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    if not complete:
        if lines:
            path.unlink()
        return bool(lines)
    header, kept = complete[0], [complete[0]]
    width = len(next(csv.reader([header])))
    for line in complete[1:]:
        fields = next(csv.reader([line]), [])
        if len(fields) != width:
            continue
        try:
            step = int(fields[0])
        except ValueError:
            continue
        if step <= last_step:
            kept.append(line)
    if len(kept) == len(lines):
        return False
    try:
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
    except OSError as e:
        if e.errno is None:
            raise
        raise NoisecraftError(f"could not rewrite the training log {path} ({os.strerror(e.errno)}); free some space "
                              f"and resume the run again.") from None
    return True

