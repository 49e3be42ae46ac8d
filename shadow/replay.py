"""``twinioc shadow replay``: a journal or an archive export through the model, offline.

The file is a twin's put journal (``journal.jsonl``: its accepted setpoints) or a CSV of
``time,PV,value`` rows (an archiver export: time as ISO 8601 or seconds since the epoch). Setpoints
and readbacks of converters set the model; BPM and tune PVs are measurements, compared with what
the model predicted then. One JSON line per time in the file: what the model expected.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from twinioc.studies.analysis import rms
from twinioc.studies.machine import MachineLayout

from .model import ShadowModel


class ReplayError(ValueError):
    """A file that cannot be replayed; the message names the line."""


@dataclass
class Sample:
    """One value of the file: when, which PV (or converter, for a journal), what."""

    time: float
    name: str
    value: float


def read_journal(path: Path) -> Iterator[Sample]:
    from twinioc.ioc.journal import entries, setpoint_changes

    for entry, device, value in setpoint_changes(entries(path, versions=False)):
        yield Sample(datetime.fromisoformat(entry["time"]).timestamp(), device, value)


def _when(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.strip()).timestamp()


def read_csv(path: Path) -> Iterator[Sample]:
    with Path(path).open(newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or (number == 1 and row[0].strip().lower() == "time"):
                continue
            try:
                when, pv, value = row[:3]
                yield Sample(_when(when), pv.strip(), float(value))
            except ValueError as err:
                raise ReplayError(f"{path}:{number}: not time,PV,value ({err})") from None


def samples(path: Path) -> Iterator[Sample]:
    return read_journal(path) if Path(path).suffix == ".jsonl" else read_csv(path)


@dataclass
class Measured:
    """The newest measurements of the file: BPM readings (mm) and tunes (kHz)."""

    x: np.ndarray
    y: np.ndarray
    tunes_khz: list[float] = field(default_factory=lambda: [math.nan, math.nan])


class Replay:
    """Feeds a file's samples to a model, in time order, and says what it predicted at each time."""

    def __init__(self, layout: MachineLayout, model: ShadowModel):
        self.layout, self.model = layout, model
        self.converter_of = {pv: c.name for c in layout.converters.values() for pv in (c.setpoint, c.readback)}
        self.converter_of |= {name: name for name in layout.converters}
        orbit = layout.orbit
        self.bpm_of = {pv: ("x", i) for i, pv in enumerate(orbit.x)} | {pv: ("y", i) for i, pv in enumerate(orbit.y)}
        self.tune_of = {layout.optional("tune_h_khz"): 0, layout.optional("tune_v_khz"): 1}
        n = len(orbit.bpms)
        self.measured = Measured(np.full(n, np.nan), np.full(n, np.nan))
        self.unknown: set[str] = set()

    def take(self, sample: Sample) -> dict[str, float]:
        """Note a measurement; a converter value is returned to be set."""
        if sample.name in self.converter_of:
            return {self.converter_of[sample.name]: sample.value}
        if sample.name in self.bpm_of:
            plane, i = self.bpm_of[sample.name]
            (self.measured.x if plane == "x" else self.measured.y)[i] = sample.value
        elif sample.name in self.tune_of:
            self.measured.tunes_khz[self.tune_of[sample.name]] = sample.value
        else:
            self.unknown.add(sample.name)
        return {}

    def run(self, file_samples: Iterable[Sample]) -> Iterator[dict]:
        pending: dict[str, float] = {}
        now = None
        for sample in sorted(file_samples, key=lambda s: s.time):
            if now is not None and sample.time != now:
                yield self.predict(now, pending)
                pending = {}
            now = sample.time
            pending |= self.take(sample)
        if now is not None:
            yield self.predict(now, pending)

    def predict(self, when: float, values: dict[str, float]) -> dict:
        refused = self.model.set(values)
        p = self.model.predict()
        line = {"time": datetime.fromtimestamp(when).astimezone().isoformat(timespec="milliseconds"),
                "version": p.version, "stable": p.stable, "tune": p.tune.tolist(),
                "chromaticity": p.chromaticity.tolist(), "orbit_x_mm": p.x_mm.tolist(), "orbit_y_mm": p.y_mm.tolist()}
        if refused:
            line["refused"] = refused
        tunes = np.array(self.measured.tunes_khz) / p.revolution_khz
        rx, ry = self.measured.x - p.x_mm, self.measured.y - p.y_mm
        if np.any(np.isfinite(tunes)):
            line["tune_measured"], line["tune_residual"] = tunes.tolist(), (tunes - p.tune).tolist()
        if np.any(np.isfinite(rx)) or np.any(np.isfinite(ry)):
            line["orbit_residual_rms_mm"] = [rms(rx), rms(ry)]
        return json.loads(json.dumps(line, allow_nan=True).replace("NaN", "null"))


def replay_file(layout: MachineLayout, model: ShadowModel, path: Path, out) -> tuple[int, int, float, set[str]]:
    """Replay *path* into *out* (JSON lines); (samples read, lines written, seconds, unknown names)."""
    start = time.perf_counter()
    read = list(samples(path))
    replay = Replay(layout, model)
    lines = 0
    for line in replay.run(read):
        out.write(json.dumps(line) + "\n")
        lines += 1
    return len(read), lines, time.perf_counter() - start, replay.unknown
