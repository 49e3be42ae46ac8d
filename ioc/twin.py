"""The twin as an IOC: records from the machine's PV table, puts to the model, beam state out.

What a client sees:

* setpoints (ao: ``<PC>:set``, ``<PC>:setCur``, ``MCLKHX251C:freq``, ``PAHRP:setVoltCav``, ...): a
  put is checked (not a finite number: refused, old value kept, MINOR/WRITE alarm; beyond
  DRVL/DRVH: clamped by the record with a HIHI/LOLO alarm), then queued. Every tick the queued
  changes go to the physics process as one batch.
* readbacks (``:rdbk``, ``:rdCur``, ``:hwRdFreq``, ``:rdFrq``): the value the model applied.
* BPMs, orbit arrays, tunes, current and the twin's own PVs: the state computed from that batch,
  published once per tick. With no stable orbit the beam is lost: current 0, beam readings INVALID.
* ``$(P)OPTICS:MODE`` (mbbo, machines with an ``optics.csv``): a put sets every converter of that
  optics mode to its table value, as one batch.
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
from twinioc.model.devices import read_optics
from twinioc.model.state import BeamState, Change
from twinioc.model.tables import read_csv

from . import records
from .config import Config
from .physics import PhysicsProcess, Step

log = logging.getLogger("twinioc")


def _khz(tune: float, state: BeamState) -> float:
    return (tune - math.floor(tune)) * state.revolution_frequency / 1e3


# Signals: how each is read off a beam state. Beam readings need a beam (they go INVALID when it
# is lost); the twin's own readings describe the model and are always valid.
BEAM_SIGNALS: dict[str, Callable[[BeamState], object]] = {
    "tune_h_khz": lambda s: _khz(s.tune[0], s),
    "tune_v_khz": lambda s: _khz(s.tune[1], s),
    "tune_s_khz": lambda s: s.synchrotron_tune * s.revolution_frequency / 1e3,
    "tune_s_hz": lambda s: s.synchrotron_tune * s.revolution_frequency,
    "tune_x": lambda s: s.fractional_tune[0],
    "tune_y": lambda s: s.fractional_tune[1],
    "tune_s": lambda s: s.synchrotron_tune,
    "chrom_x": lambda s: s.chromaticity[0],
    "chrom_y": lambda s: s.chromaticity[1],
    "momentum_offset": lambda s: s.momentum_offset,
    "momentum_compaction": lambda s: s.momentum_compaction,
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
    "energy_mev": lambda s: s.energy / 1e6,
}


# The PVA table of the orbit: column name -> the signal whose record fills it.
TABLE_COLUMNS = {"BPM": "bpm_names", "X": "orbit_x", "Y": "orbit_y"}


class Twin:
    def __init__(self, config: Config, physics: PhysicsProcess):
        self.config = config
        self.physics = physics
        self.rows = [dict(row, pv=row["pv"].replace("$(P)", config.prefix))
                     for row in read_csv(config.tables / "pvs.csv")]
        self.optics = read_optics(config.tables)  # mode -> {converter: setting}
        self.bpm_index = {r["name"]: int(r["index"]) for r in read_csv(config.tables / "bpms.csv")}
        self.setpoints: dict[str, object] = {}  # device -> ao record
        self.readbacks: dict[str, object] = {}
        self.status: dict[tuple[str, str], object] = {}  # (device, power|fault) -> mbbi
        self.bpms: list[tuple[object, int, int]] = []  # (record, BPM index, plane)
        self.signals: dict[str, list] = {}  # signal -> the records that show it
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
                continue
            if kind == "table":
                table = row["pv"]
                continue
            if kind == "names":
                record = records.names(row, bpm_names if signal == "bpm_names" else list(TABLE_COLUMNS))
            elif kind == "mbbo":
                record = records.mbbo(row, list(self.optics), self.load_optics)
            else:
                record = getattr(records, kind)(row)
            if signal == "readback":
                self.readbacks[device] = record
            elif signal in ("power", "fault"):
                self.status[(device, signal)] = record
            elif signal in ("bpm_x", "bpm_y"):
                self.bpms.append((record, self.bpm_index[device], 0 if signal == "bpm_x" else 1))
            else:
                self.signals.setdefault(signal, []).append(record)
        if table:
            (labels,) = self.signals["table_columns"]
            records.table_group(table, labels, {column: self.signals[signal][0]
                                                for column, signal in TABLE_COLUMNS.items()})
        return served

    def load_optics(self, mode: str) -> None:
        """Set every converter of an optics mode to its table value, as one batch.

        The setpoint records show the new values (and autosave keeps them); the model gets them
        with the next tick.
        """
        with self._lock:
            for device, value in self.optics[mode].items():
                self.setpoints[device].set(value, process=False)
                self._pending[device] = Change(device, self.physics.quantities[device], value)
        log.info("optics mode %s: %d converters", mode, len(self.optics[mode]))

    def select_optics(self, mode: str) -> None:
        """Load an optics mode as if a client had put it to ``$(P)OPTICS:MODE``."""
        for record in self.signals.get("optics_mode", ()):
            record.set(list(self.optics).index(mode), process=False)
        self.load_optics(mode)

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
            if device in self.readbacks:
                self.readbacks[device].set(value)
            if (device, "power") in self.status:
                self.status[(device, "power")].set(1)
            if self.setpoints[device].get() == value:
                self.setpoints[device].set_alarm(alarm.NO_ALARM, alarm.NO_ALARM)
        for device, reason in step.refused.items():
            self._refuse(device, reason)

        if state.stable:
            for record, index, plane in self.bpms:
                record.set((state.x if plane == 0 else state.y)[index] * 1e3)
            self._set(BEAM_SIGNALS, state)
            self._set({"beam_current": lambda s: self.config.beam_current_mA,
                       "lifetime_h": lambda s: self.config.lifetime_h}, state)
        else:  # keep the last readings, marked INVALID; no beam: no current, no lifetime
            for record, _, _ in self.bpms:
                record.set_alarm(alarm.INVALID_ALARM, alarm.READ_ALARM)
            for signal in BEAM_SIGNALS:
                for record in self.signals.get(signal, ()):
                    record.set_alarm(alarm.INVALID_ALARM, alarm.READ_ALARM)
            for signal in ("beam_current", "lifetime_h"):
                for record in self.signals.get(signal, ()):
                    record.set(0.0, severity=alarm.MAJOR_ALARM, alarm=alarm.STATE_ALARM)
        self._set(TWIN_SIGNALS, state)
        self._set({"updates": lambda s: self.updates}, state)

    def _set(self, signals: dict[str, Callable[[BeamState], object]], state: BeamState) -> None:
        for signal, read in signals.items():
            records_ = self.signals.get(signal)
            if records_:
                value = read(state)
                for record in records_:
                    record.set(value)
