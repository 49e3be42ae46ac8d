"""Faults the twin can be told to have, to see whether control-room software copes.

A fault is a kind, a pattern of device names (shell style: ``HS*P1R``, ``BPMZ?D1R``) and the kind's
parameters. It is written as one line, ``KIND PATTERN key=value ...``, in ``$(P)FAULT:ADD`` or as a
table in a scenario file::

    drop       HS4P1D1R                  commands to these converters never arrive
    delay      Q1*       seconds=2       commands arrive this much later
    modify     VS*       scale=1.1 offset=0.01   the converter takes scale·value + offset
    trip       Q3PD1R                    the converter trips: fault status, output 0 at once
    bpm-stuck  BPMZ5D1R                  the BPM keeps its reading from the moment of the fault
    bpm-nan    BPMZ*T2R                  the BPM reads NaN
    bpm-offset BPMZ3T1R  x_um=100 y_um=0 the BPM's reading jumps by this much

Scenario files (TOML, ``twinioc --faults FILE``) list ``[[fault]]`` tables with ``kind``,
``pattern``, the parameters, and optionally ``at_s``: seconds after start-up when it strikes.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# kind -> its parameters and their defaults
KINDS: dict[str, dict[str, float]] = {
    "drop": {},
    "delay": {"seconds": 1.0},
    "modify": {"scale": 1.0, "offset": 0.0},
    "trip": {},
    "bpm-stuck": {},
    "bpm-nan": {},
    "bpm-offset": {"x_um": 0.0, "y_um": 0.0},
}
COMMAND_KINDS = ("drop", "delay", "modify")


class FaultError(ValueError):
    """A fault that cannot be: unknown kind or parameter, a pattern that matches nothing."""


@dataclass
class Fault:
    id: int
    kind: str
    pattern: str
    devices: list[str]  # the converters or BPMs the pattern matched when the fault was added
    params: dict[str, float] = field(default_factory=dict)
    stuck: dict[str, tuple[float, float]] = field(default_factory=dict)  # bpm-stuck: BPM -> (x, y) m

    @property
    def spec(self) -> str:
        """The fault as one line of ``$(P)FAULT:ADD``."""
        return " ".join([self.kind, self.pattern, *(f"{k}={v:g}" for k, v in self.params.items())])

    def as_dict(self) -> dict:
        """The fault as a table (of a scenario file, or a snapshot: with what a stuck BPM shows)."""
        table = {"kind": self.kind, "pattern": self.pattern, **self.params}
        return table | ({"stuck": self.stuck} if self.stuck else {})


def parse(text: str) -> dict:
    """``KIND PATTERN key=value ...`` as a fault table (the form of the scenario files)."""
    words = text.split()
    if len(words) < 2:
        raise FaultError(f"a fault is 'KIND PATTERN [key=value ...]', not {text!r}")
    table: dict = {"kind": words[0], "pattern": words[1]}
    for word in words[2:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise FaultError(f"{word!r} is not key=value")
        table[key] = value
    return table


def scenario(path: Path) -> list[dict]:
    """The fault tables of a scenario file, each with its ``at_s`` (0: at start)."""
    try:
        tables = tomllib.loads(Path(path).read_text()).get("fault", [])
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise FaultError(f"scenario {path}: {err}") from None
    return [dict(t, at_s=float(t.get("at_s", 0.0))) for t in tables]


class Faults:
    """The faults in force, for the twin's converters and BPMs."""

    def __init__(self, converters: list[str], bpms: list[str]):
        self.converters, self.bpms = converters, bpms
        self._index = {name: i for i, name in enumerate(bpms)}
        self.active: dict[int, Fault] = {}
        self._next_id = 1

    def make(self, table: dict, reading: tuple[np.ndarray, np.ndarray] | None = None) -> Fault:
        """The fault a table describes, checked but not in force; *reading*: the BPMs' last (x, y),
        which bpm-stuck keeps (the table's ``stuck``, from a snapshot, wins)."""
        table = dict(table)
        stuck = table.pop("stuck", None)
        kind, pattern = str(table.pop("kind", "")), str(table.pop("pattern", ""))
        table.pop("at_s", None)
        if kind not in KINDS:
            raise FaultError(f"no fault kind {kind!r} (known: {', '.join(KINDS)})")
        unknown = set(table) - set(KINDS[kind])
        if unknown:
            raise FaultError(f"{kind} takes {', '.join(KINDS[kind]) or 'no parameters'}, not {', '.join(unknown)}")
        params = {}
        for key, default in KINDS[kind].items():
            try:
                params[key] = float(table.get(key, default))
            except (TypeError, ValueError):
                raise FaultError(f"{key}={table[key]!r} is not a number") from None
            if not math.isfinite(params[key]):
                raise FaultError(f"{key}={params[key]} is not a finite number")
        if kind == "delay" and params["seconds"] < 0:
            raise FaultError("a delay cannot be negative")
        names = self.bpms if kind.startswith("bpm") else self.converters
        devices = fnmatch.filter(names, pattern)
        if not devices:
            raise FaultError(f"{pattern!r} matches no {'BPM' if kind.startswith('bpm') else 'converter'}")
        fault = Fault(self._next_id, kind, pattern, devices, params)
        if kind == "bpm-stuck" and stuck:
            fault.stuck = {b: (float(stuck[b][0]), float(stuck[b][1])) for b in devices}
        elif kind == "bpm-stuck":
            x, y = reading if reading is not None else (np.zeros(len(self.bpms)),) * 2
            fault.stuck = {b: (float(x[self._index[b]]), float(y[self._index[b]])) for b in devices}
        return fault

    def add(self, fault: Fault) -> Fault:
        """Put a fault from ``make`` in force, under the next free number."""
        fault.id = self._next_id
        self.active[fault.id] = fault
        self._next_id += 1
        return fault

    def clear(self, which: str) -> list[Fault]:
        """Clear fault number *which*, or every fault (``all``); return what was cleared."""
        if which.strip().lower() == "all":
            gone, self.active = list(self.active.values()), {}
            return gone
        try:
            return [self.active.pop(int(which))]
        except (ValueError, KeyError):
            raise FaultError(f"no fault {which!r} (active: {', '.join(map(str, self.active)) or 'none'})") from None

    def command(self, device: str) -> Fault | None:
        """The newest command fault (drop, delay, modify) on *device*, if any."""
        hits = [f for f in self.active.values() if f.kind in COMMAND_KINDS and device in f.devices]
        return hits[-1] if hits else None

    def tripped(self) -> set[str]:
        return {d for f in self.active.values() if f.kind == "trip" for d in f.devices}

    def read(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The BPM readings *x*, *y* (m) as the faulty BPMs show them."""
        if not any(f.kind.startswith("bpm") for f in self.active.values()):
            return x, y
        x, y = x.copy(), y.copy()
        for fault in self.active.values():
            index = [self._index[b] for b in fault.devices] if fault.kind.startswith("bpm") else []
            if fault.kind == "bpm-stuck":
                x[index], y[index] = zip(*(fault.stuck[b] for b in fault.devices), strict=True)
            elif fault.kind == "bpm-nan":
                x[index] = y[index] = np.nan
            elif fault.kind == "bpm-offset":
                x[index] += fault.params["x_um"] * 1e-6
                y[index] += fault.params["y_um"] * 1e-6
        return x, y

    def listing(self) -> str:
        """One line per fault: its number, its spec and how many devices it holds."""
        def count(fault: Fault) -> str:
            noun = "BPM" if fault.kind.startswith("bpm") else "converter"
            return f"{len(fault.devices)} {noun}{'s' if len(fault.devices) != 1 else ''}"

        return "\n".join(f"{f.id}: {f.spec} ({count(f)})" for f in self.active.values())
