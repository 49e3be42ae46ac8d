"""The twin as an IOC: records from the machine's PV table, puts to the model, beam state out.

What a client sees:

* ``<PC>:set`` / ``MCLKHX251C:freq`` (ao): a put is checked (not a finite number: refused, old value
  kept, MINOR/WRITE alarm; beyond DRVL/DRVH: clamped by the record with a HIHI/LOLO alarm), then
  queued. Every tick the queued changes go to the physics process as one batch.
* ``:rdbk``, ``:hwRdFreq``: the value the model applied.
* BPMs, ``ORBITCC:*``, tunes, current and the twin's own PVs: the state computed from that batch,
  published once per tick. With no stable orbit the beam is lost: current 0, beam readings INVALID.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
from softioc import alarm
from twinioc.model.state import BeamState, Change
from twinioc.model.tables import read_csv

from . import records
from .config import Config
from .physics import PhysicsProcess, Step

log = logging.getLogger("twinioc")


def _khz(tune: float, state: BeamState) -> float:
    return (tune - math.floor(tune)) * state.revolution_frequency / 1e3


# Scalar signals: how each is read off a beam state. ``beam`` marks readings that need a beam
# (they go INVALID when it is lost); the others describe the twin itself.
BEAM_SIGNALS: dict[str, Callable[[BeamState], object]] = {
    "tune_h_khz": lambda s: _khz(s.tune[0], s),
    "tune_v_khz": lambda s: _khz(s.tune[1], s),
    "tune_x": lambda s: s.fractional_tune[0],
    "tune_y": lambda s: s.fractional_tune[1],
    "chrom_x": lambda s: s.chromaticity[0],
    "chrom_y": lambda s: s.chromaticity[1],
    "momentum_offset": lambda s: s.momentum_offset,
    "orbit": lambda s: np.column_stack([s.x, s.y]).ravel() * 1e9,  # nm, x0 y0 x1 y1 ...
    "orbit_x": lambda s: s.x * 1e3,
    "orbit_y": lambda s: s.y * 1e3,
}
TWIN_SIGNALS: dict[str, Callable[[BeamState], object]] = {
    "version": lambda s: s.version,
    "computed_at": lambda s: datetime.fromtimestamp(s.computed_at, UTC).isoformat(timespec="milliseconds"),
    "compute_ms": lambda s: s.compute_seconds * 1e3,
    "beam_lost": lambda s: int(not s.stable),
    "lost_reason": lambda s: s.reason[:255],
}


# The PVA table of the orbit: column name -> the signal whose record fills it.
TABLE_COLUMNS = {"BPM": "bpm_names", "X": "orbit_x", "Y": "orbit_y"}


class Twin:
    def __init__(self, config: Config, physics: PhysicsProcess):
        self.config = config
        self.physics = physics
        self.rows = [dict(row, pv=row["pv"].replace("$(P)", config.prefix))
                     for row in read_csv(config.tables / "pvs.csv")]
        self.bpm_index = {r["name"]: int(r["index"]) for r in read_csv(config.tables / "bpms.csv")}
        self.setpoints: dict[str, object] = {}  # device -> ao record
        self.readbacks: dict[str, object] = {}
        self.status: dict[tuple[str, str], object] = {}  # (device, power|fault) -> mbbi
        self.bpms: list[tuple[object, int, int]] = []  # (record, BPM index, plane)
        self.signals: dict[str, object] = {}  # signal -> record, for one-record signals
        self._pending: dict[str, Change] = {}
        self._refusals: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.updates = 0
        self.state: BeamState | None = None

    # -- records --------------------------------------------------------------------------------

    def build(self) -> list[str]:
        """Create every record of the PV table; return the names served."""
        bpm_names = [name for name, _ in sorted(self.bpm_index.items(), key=lambda kv: kv[1])]
        table = None
        served = []
        for row in self.rows:
            kind, device, signal = row["record"], row["device"], row["signal"]
            served.append(row["pv"])
            if kind == "ao":
                self.setpoints[device] = records.ao(row, self._on_put(device), self._validator(device))
            elif kind == "table":
                table = row["pv"]
            elif kind == "names":
                values = bpm_names if signal == "bpm_names" else list(TABLE_COLUMNS)
                self.signals[signal] = records.names(row, values)
            else:
                record = getattr(records, kind)(row)
                if signal == "readback":
                    self.readbacks[device] = record
                elif signal in ("power", "fault"):
                    self.status[(device, signal)] = record
                elif signal in ("bpm_x", "bpm_y"):
                    self.bpms.append((record, self.bpm_index[device], 0 if signal == "bpm_x" else 1))
                else:
                    self.signals[signal] = record
        if table:
            records.table_group(table, self.signals["table_columns"],
                                {column: self.signals[signal] for column, signal in TABLE_COLUMNS.items()})
        return served

    def _on_put(self, device: str) -> Callable[[float], None]:
        def on_put(value: float) -> None:
            with self._lock:
                self._pending[device] = Change(device, self.physics.quantities[device], value)

        return on_put

    def _validator(self, device: str) -> Callable[[object, float], bool]:
        def validate(record, value: float) -> bool:
            if math.isfinite(value):
                return True
            with self._lock:
                self._refusals.append((device, f"{value} is not a finite number"))
            return False

        return validate

    # -- the tick -------------------------------------------------------------------------------

    def initial_batch(self) -> None:
        """Queue every setpoint as the records hold it (autosave may have restored them)."""
        with self._lock:
            for device, record in self.setpoints.items():
                self._pending[device] = Change(device, self.physics.quantities[device], record.get())

    def run(self) -> None:
        """Tick at the configured rate until ``stop()``: one batch to the model, one publication."""
        period = 1.0 / self.config.rate_hz
        next_tick = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                batch, self._pending = list(self._pending.values()), {}
                refusals, self._refusals = self._refusals, []
            for device, reason in refusals:
                self._refuse(device, reason)
            try:
                step = self.physics.step(batch) if batch or self.state is None else Step(self.state)
                self.publish(step)
            except (EOFError, OSError):
                log.error("the physics process has gone; stopping the twin")
                raise
            except Exception:  # noqa: BLE001 - a publication bug must not stop the IOC
                log.exception("publication failed")
            next_tick = max(next_tick + period, time.monotonic())
            self._stop.wait(next_tick - time.monotonic())

    def stop(self) -> None:
        self._stop.set()

    def _refuse(self, device: str, reason: str) -> None:
        log.warning("refused %s: %s", device, reason)
        self.setpoints[device].set_alarm(alarm.MINOR_ALARM, alarm.WRITE_ALARM)

    # -- publication ----------------------------------------------------------------------------

    def publish(self, step: Step) -> None:
        state = self.state = step.state
        self.updates += 1
        for device, value in step.applied.items():
            self.readbacks[device].set(value)
            if (device, "power") in self.status:
                self.status[(device, "power")].set(1)
            if self.setpoints[device].get() == value:
                self.setpoints[device].set_alarm(alarm.NO_ALARM, alarm.NO_ALARM)
        for device, reason in step.refused.items():
            self._refuse(device, reason)

        severity = alarm.NO_ALARM if state.stable else alarm.INVALID_ALARM
        if state.stable:
            for record, index, plane in self.bpms:
                record.set((state.x if plane == 0 else state.y)[index] * 1e3)
            for signal, read in BEAM_SIGNALS.items():
                if signal in self.signals:
                    self.signals[signal].set(read(state))
        else:  # keep the last readings, marked INVALID
            for record, _, _ in self.bpms:
                record.set_alarm(severity, alarm.READ_ALARM)
            for signal in BEAM_SIGNALS:
                if signal in self.signals:
                    self.signals[signal].set_alarm(severity, alarm.READ_ALARM)
        if "beam_current" in self.signals:
            if state.stable:
                self.signals["beam_current"].set(self.config.beam_current_mA)
            else:
                self.signals["beam_current"].set(0.0, severity=alarm.MAJOR_ALARM, alarm=alarm.STATE_ALARM)
        for signal, read in TWIN_SIGNALS.items():
            if signal in self.signals:
                self.signals[signal].set(read(state))
        self.signals["updates"].set(self.updates)
