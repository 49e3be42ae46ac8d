"""What the derive scripts share: their command line and the rows of the PV tables.

The derive scripts write a machine's real PV names themselves; the twin-only PVs under ``$(P)`` are
the same for every machine and come from the twin's signal registry (``twinioc.ioc.signals``), which
also knows every signal a row may name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twinioc.ioc.signals import power_switch_row, pv_row, twin_rows

__all__ = ["arguments", "power_switch_row", "pv_row", "twin_rows"]

ROOT = Path(__file__).resolve().parents[1]


def arguments(doc: str, machine: str) -> argparse.Namespace:
    """``--reference`` (default ../shared/reference) and ``--out`` (default db/<machine>)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=ROOT.parent / "shared" / "reference")
    parser.add_argument("--out", type=Path, default=ROOT / "db" / machine,
                        help=f"folder to write (default: db/{machine})")
    return parser.parse_args()
