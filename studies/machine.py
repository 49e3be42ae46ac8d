"""What the measurement layer knows of a machine: its ``db/`` tables and its startup file, never the IOC.

``MachineLayout`` reads a machine's tables and names, by role, the PVs a measurement needs: each
converter's setpoint and readback, the BPMs (one orbit waveform where the machine has one, else a
pair of PVs per BPM), the tunes, the RF, the beam current, the orbit feedback's switch, and the
twin-only PVs (``<prefix>SEED``, ``<prefix>LATTICE:VERSION``, ``<prefix>UPDATES``) that tell a twin
from the real machine. The same layout serves a twin and the machine it stands for: both answer the
same names.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from twinioc.model.tables import ConverterRow, MachineTables, PvRow

PACKAGE = Path(__file__).resolve().parent.parent
DB = PACKAGE / "db"
STARTUP = PACKAGE / "startup"

STEERER_KINDS = ("hsteerer", "vsteerer")


class LayoutError(ValueError):
    """A machine, device or PV the tables do not have; the message names it."""


def machines() -> list[str]:
    """The machines that have a startup file."""
    return sorted(p.stem for p in STARTUP.glob("*.toml") if p.stem != "defaults")


def startup_data(machine: str) -> dict:
    """The machine's startup file over the defaults (a shallow merge per section is enough here)."""
    path = STARTUP / f"{machine}.toml"
    if not path.is_file():
        raise LayoutError(f"unknown machine {machine!r}; known: {', '.join(machines())}")
    data = tomllib.loads((STARTUP / "defaults.toml").read_text())
    for key, value in tomllib.loads(path.read_text()).items():
        data[key] = data[key] | value if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data


@dataclass(frozen=True)
class Converter:
    """A settable device and its PVs; limits from the table (the IOC's DRVL/DRVH may narrow them)."""

    name: str
    kind: str
    unit: str
    low: float
    high: float
    max_step: float
    setpoint: str
    readback: str
    magnets: tuple[str, ...] = ()

    @property
    def plane(self) -> str | None:
        return {"hsteerer": "x", "vsteerer": "y"}.get(self.kind)


@dataclass(frozen=True)
class OrbitSource:
    """Where the BPM readings come from: one interleaved waveform (x0, y0, x1, ...) or a PV per BPM and plane."""

    bpms: tuple[str, ...]
    waveform: str | None = None  # the whole orbit in one array
    waveform_to_mm: float = 1.0  # its unit in mm
    x: tuple[str, ...] = ()  # per-BPM PVs, mm
    y: tuple[str, ...] = ()


@dataclass
class MachineLayout:
    """A machine's devices and PV names, by role, from its tables; *prefix* is the twin's."""

    name: str
    tables: MachineTables
    prefix: str
    envelope: dict = field(default_factory=dict)

    @classmethod
    def load(cls, machine: str, prefix: str | None = None) -> MachineLayout:
        data = startup_data(machine)
        folder = Path(data["tables"])
        tables = MachineTables(folder if folder.is_absolute() else DB / folder)
        return cls(machine, tables, data["prefix"] if prefix is None else prefix, data.get("envelope", {}))

    @cached_property
    def pvs(self) -> list[PvRow]:
        return self.tables.pvs(self.prefix)

    def _pv(self, signal: str, device: str = "") -> str | None:
        found = [row.pv for row in self.pvs if row.signal == signal and row.device == device]
        return found[0] if found else None

    def role(self, signal: str) -> str:
        """The PV of a machine-wide *signal* (tune_h_khz, beam_current, seed, ...); ``LayoutError`` if none."""
        pv = self._pv(signal)
        if pv is None:
            raise LayoutError(f"{self.name} has no PV for {signal}")
        return pv

    def optional(self, signal: str) -> str | None:
        return self._pv(signal)

    @cached_property
    def converters(self) -> dict[str, Converter]:
        magnets: dict[str, list[str]] = {}
        for row in self.tables.magnets:
            magnets.setdefault(row.converter, []).append(row.magnet)
        return {c.name: self._converter(c, tuple(magnets.get(c.name, ()))) for c in self.tables.converters.values()}

    def _converter(self, row: ConverterRow, magnets: tuple[str, ...]) -> Converter:
        setpoint, readback = self._pv("setpoint", row.name), self._pv("readback", row.name)
        if setpoint is None:
            raise LayoutError(f"pvs.csv has no setpoint of {row.name}")
        steps = [row.max_step] if row.max_step is not None else []
        steps += [float(v) for k, v in self.envelope.get("max_step", {}).items() if k == row.kind]
        return Converter(row.name, row.kind, row.unit, row.low, row.high, min(steps, default=math.inf),
                         setpoint, readback or setpoint, magnets)

    def converter(self, name: str) -> Converter:
        try:
            return self.converters[name]
        except KeyError:
            raise LayoutError(f"{name!r} is not a converter of {self.name}") from None

    def of_kind(self, *kinds: str) -> list[Converter]:
        return [c for c in self.converters.values() if c.kind in kinds]

    def steerers(self, plane: str | None = None) -> list[Converter]:
        return [c for c in self.of_kind(*STEERER_KINDS) if plane is None or c.plane == plane]

    @property
    def rf(self) -> Converter:
        (rf,) = self.of_kind("rf")
        return rf

    def converter_of_magnet(self, magnet: str) -> Converter:
        for converter in self.converters.values():
            if magnet in converter.magnets:
                return converter
        raise LayoutError(f"{magnet!r} is not a magnet of {self.name}")

    @cached_property
    def orbit(self) -> OrbitSource:
        names = tuple(self.tables.bpm_names)
        waveform = self._pv("orbit")
        if waveform is not None:
            unit = next(row.unit for row in self.pvs if row.pv == waveform)
            return OrbitSource(names, waveform=waveform, waveform_to_mm={"nm": 1e-6, "um": 1e-3, "mm": 1.0}[unit])
        x = tuple(self._pv("bpm_x", bpm) for bpm in names)
        y = tuple(self._pv("bpm_y", bpm) for bpm in names)
        if None in x or None in y:
            raise LayoutError(f"{self.name}: pvs.csv has neither an orbit waveform nor bpm_x/bpm_y for every BPM")
        return OrbitSource(names, x=x, y=y)

    @property
    def seed_pv(self) -> str:
        """Served by a twin only: the test of whether a target is a twin."""
        return self.role("seed")
