"""The CSV tables in ``db/``: one header row, one record per row; ``MachineTables`` reads a machine's set.

A machine's folder holds ``converters.csv`` (every settable device: name, kind, unit, default,
limits, maximum step), ``magnets.csv`` (the magnets each converter drives, with their calibration),
``bpms.csv`` (the BPMs in orbit-array order; optionally, ``buffer_slot``, the element of the machine's
BPM buffer that holds each one's reading), ``pvs.csv`` (every PV the twin serves, the twin-only
ones under ``$(P)``) and, where the machine has optics modes, ``optics.csv``. They are read here and
nowhere else, without pyAT.
"""

from __future__ import annotations

import csv
import json
import numbers
from dataclasses import dataclass, fields
from pathlib import Path

PREFIX_MACRO = "$(P)"  # stands for the twin-only prefix in pvs.csv


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


class TableError(ValueError):
    """A machine table that cannot be used as it stands; the message names the file and the row."""


@dataclass(frozen=True)
class ConverterRow:
    """A settable device: a magnet power converter (A), the RF master clock (kHz), a cavity (kV)."""

    name: str
    kind: str  # quadrupole | sextupole | octupole | hsteerer | vsteerer | dipole | rf | cavity
    unit: str
    default: float
    low: float
    high: float
    max_step: float | None  # the largest step a replay may send at once, where the table gives one


@dataclass(frozen=True)
class MagnetRow:
    """One magnet (winding) on a converter: the lattice element it sets and its calibration."""

    magnet: str
    element: str
    converter: str
    property: str  # K1, K2, K3, HKICK, VKICK, BEND, VOLTAGE (see ``devices.ELEMENT_FIELDS``)
    calibration: float
    cal_unit: str


@dataclass(frozen=True)
class BpmRow:
    index: int  # position in the machine's orbit arrays
    name: str
    element: str
    buffer_slot: int | None = None  # element of the machine's BPM buffer holding its x (optional column)


@dataclass(frozen=True)
class PvRow:
    """One PV of ``pvs.csv``, its name with the prefix in place; the other columns as written."""

    pv: str
    record: str
    device: str
    signal: str
    unit: str
    prec: str
    low: str
    high: str
    initial: str
    nelm: str
    description: str
    source: str
    line: int = 0  # its line in pvs.csv, for messages

    @property
    def where(self) -> str:
        return f"pvs.csv line {self.line} ({self.pv})"


PV_COLUMNS = [f.name for f in fields(PvRow) if f.name != "line"]


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def _slot(text: str | None) -> int | None:
    """A BPM's buffer slot: none where the column is empty or the table has none."""
    return int(text) if text not in ("", None) else None


class MachineTables:
    """Everything ``db/<machine>/`` says about a machine, read once: converters, magnets, BPMs, PVs
    and optics modes, in table order."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        converters = self._rows("converters.csv", lambda r: ConverterRow(
            r["name"], r["kind"], r["unit"], float(r["default"]), float(r["low"]), float(r["high"]),
            _number(r["max_step"])))
        self.converters = {c.name: c for c in converters}
        self.magnets = self._rows("magnets.csv", lambda r: MagnetRow(
            r["magnet"], r["element"], r["converter"], r["property"], float(r["calibration"]), r["cal_unit"]))
        self.bpms = sorted(self._rows("bpms.csv", lambda r: BpmRow(int(r["index"]), r["name"], r["element"],
                                                                   _slot(r.get("buffer_slot")))),
                           key=lambda b: b.index)
        self._pv_rows = self._rows("pvs.csv", lambda r: {column: r[column] for column in PV_COLUMNS})
        self.optics: dict[str, dict[str, float]] = {}  # mode -> {converter: setting}; none without optics.csv
        if (self.folder / "optics.csv").is_file():
            for mode, device, value in self._rows("optics.csv", lambda r: (r["mode"], r["device"], float(r["value"]))):
                self.optics.setdefault(mode, {})[device] = value

    def _rows(self, name: str, make) -> list:
        """Each row of the table *name*, made into what *make* makes of it; ``TableError`` names the
        table when a column is missing or a number is not one."""
        try:
            return [make(row) for row in read_csv(self.folder / name)]
        except (OSError, KeyError, ValueError) as err:
            raise TableError(f"{self.folder / name}: {type(err).__name__}: {err}") from None

    @property
    def bpm_names(self) -> list[str]:
        return [b.name for b in self.bpms]

    @property
    def bpm_buffer_slots(self) -> tuple[int | None, ...] | None:
        """The buffer slot of each BPM in orbit order (None: that BPM has none); None if no BPM has one."""
        slots = tuple(b.buffer_slot for b in self.bpms)
        return slots if any(s is not None for s in slots) else None

    def pvs(self, prefix: str) -> list[PvRow]:
        """Every row of ``pvs.csv``, with ``$(P)`` replaced by *prefix*."""
        return [PvRow(**(row | {"pv": row["pv"].replace(PREFIX_MACRO, prefix)}), line=line)
                for line, row in enumerate(self._pv_rows, start=2)]

    def element_names(self) -> list[str]:
        """The names of the lattice's elements, in order (read from ``lattice.json`` without pyAT)."""
        try:
            elements = json.loads((self.folder / "lattice.json").read_text())["elements"]
            return [element["FamName"] for element in elements]
        except (OSError, KeyError, ValueError) as err:
            raise TableError(f"{self.folder / 'lattice.json'}: {type(err).__name__}: {err}") from None

    def magnets_of_kind(self, kind: str) -> list[str]:
        """The magnets on converters of *kind*, converter by converter in table order."""
        on = {}
        for magnet in self.magnets:
            on.setdefault(magnet.converter, []).append(magnet.magnet)
        return [m for c in self.converters.values() if c.kind == kind for m in on.get(c.name, ())]
