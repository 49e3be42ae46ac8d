"""Reading and writing the CSV tables in ``db/``: one header row, one record per row."""

from __future__ import annotations

import csv
import numbers
from pathlib import Path


def read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return [row for row in csv.DictReader(f) if not row[next(iter(row))].startswith("#")]


def write_csv(path: Path, rows: list[dict]) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _text(v) for k, v in row.items()})


def _text(value: object) -> object:
    """Floats (numpy's too) as their shortest exact repr."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return repr(float(value))
    return value
