"""The twin as an IOC: records from the machine's PV table, puts to the model, beam state out.

What a client sees:

* setpoints (ao: ``<PC>:set``, ``<PC>:setCur``, ``MCLKHX251C:freq``, ``PAHRP:setVoltCav``, ...): a
  put is checked (not a finite number: refused, old value kept, MINOR/WRITE alarm; beyond
  DRVL/DRVH: clamped by the record with a HIHI/LOLO alarm), then queued. Every tick the queued
  changes go to the physics process as one batch.
* readbacks (``:rdbk``, ``:rdCur``, ``:hwRdFreq``, ``:rdFrq``): the converters' outputs (with their
  noise), published once per tick as one array, ``$(P)READBACKS``, whose elements they show.
* BPMs, orbit arrays, tunes, current and the twin's own PVs: the state computed from that batch,
  published once per tick; the per-BPM PVs show the elements of ``$(P)ORBIT:X`` and ``:Y``. With no
  stable orbit the beam is lost: current 0, beam readings INVALID.
* ``$(P)OPTICS:MODE`` (mbbo, machines with an ``optics.csv``): a put sets every converter of that
  optics mode to its table value, as one batch.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
from softioc import alarm
from twinioc.model.devices import read_optics
from twinioc.model.realism import BpmErrors, ConverterBank, StoredBeam, streams
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
    "energy_mev": lambda s: s.energy / 1e6,
    "true_orbit_x": lambda s: s.x * 1e3,  # the model's orbit, before the BPMs' errors and noise
    "true_orbit_y": lambda s: s.y * 1e3,
}


# The PVA table of the orbit: column name -> the signal whose record fills it.
TABLE_COLUMNS = {"BPM": "bpm_names", "X": "orbit_x", "Y": "orbit_y"}

MIN_TICK_GAP = 0.01  # s: puts bring the next tick forward, but ticks start at most this often

NO_BEAM = "no beam stored: inject ($(P)BEAM:INJECT) or enable top-up"


class Twin:
    def __init__(self, config: Config, physics: PhysicsProcess):
        self.config = config
        self.physics = physics
        self.rows = [dict(row, pv=row["pv"].replace("$(P)", config.prefix))
                     for row in read_csv(config.tables / "pvs.csv")]
        self.optics = read_optics(config.tables)  # mode -> {converter: setting}
        bpms = sorted(read_csv(config.tables / "bpms.csv"), key=lambda r: int(r["index"]))
        self.bpm_index = {r["name"]: int(r["index"]) for r in bpms}
        self.setpoints: dict[str, object] = {}  # device -> ao record
        # the converters in $(P)READBACKS order, and the σ of each one's readback noise
        self.readback_devices = list(dict.fromkeys(r["device"] for r in self.rows if r["signal"] == "readback"))
        self.readback_noise = np.zeros(len(self.readback_devices))
        self.status: dict[tuple[str, str], object] = {}  # (device, power|fault) -> mbbi
        self.signals: dict[str, list] = {}  # signal -> the records that show it
        self.controls: dict[str, object] = {}  # control signal -> record
        self._refusals: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by puts: the next tick comes at once
        self.updates = 0
        self.state: BeamState | None = None

        realism = config.realism
        self.random = streams(realism.seed)
        noise = [realism.bpm_noise_per_bpm.get(r["name"], realism.bpm_noise) for r in bpms]
        self.bpm_errors = BpmErrors.draw(len(bpms), self.random["bpm_errors"], realism.bpm_offset,
                                         realism.bpm_gain_error, realism.bpm_roll, np.array(noise))
        self.beam = StoredBeam(config.beam_current_mA, config.lifetime_h, config.topup, config.topup_band_mA,
                               config.fill_rate_mA_per_s, current=config.beam_current_mA)
        self.bank: ConverterBank | None = None  # the converters' outputs, from the first batch on

    # -- records --------------------------------------------------------------------------------

    def build(self) -> list[str]:
        """Create every record of the PV table; return the names served."""
        names = {"bpm_names": list(self.bpm_index), "readback_names": self.readback_devices,
                 "table_columns": list(TABLE_COLUMNS)}
        arrays = {r["signal"]: r["pv"] for r in self.rows if r["signal"] in ("orbit_x", "orbit_y", "readbacks")}
        table = None
        served = []
        for row in self.rows:
            kind, device, signal = row["record"], row["device"], row["signal"]
            served.append(row["pv"])
            if kind == "ao" and device:
                self.setpoints[device] = records.ao(row, self._on_put(device), self._validator(device))
                if device in self.readback_devices:
                    span = float(row["high"]) - float(row["low"])
                    self.readback_noise[self.readback_devices.index(device)] = \
                        self.config.realism.readback_noise_ppm * 1e-6 * span
                continue
            if kind in ("ao", "bo"):
                on_put = self._on_power(device) if signal == "power_switch" else self._on_control(signal)
                self.controls[f"{device}:{signal}"] = getattr(records, f"control_{kind}")(row, on_put)
                continue
            if kind == "table":
                table = row["pv"]
                continue
            if signal == "readback":
                records.element_ai(row, arrays["readbacks"], self.readback_devices.index(device))
                continue
            if signal in ("bpm_x", "bpm_y"):
                records.element_ai(row, arrays[signal.replace("bpm", "orbit")], self.bpm_index[device])
                continue
            if kind == "names":
                record = records.names(row, names[signal])
            elif kind == "mbbo":
                record = records.mbbo(row, list(self.optics), self.load_optics)
            else:
                record = getattr(records, kind)(row)
            if signal in ("power", "fault"):
                self.status[(device, signal)] = record
            else:
                self.signals.setdefault(signal, []).append(record)
        if table:
            (labels,) = self.signals["table_columns"]
            records.table_group(table, labels, {column: self.signals[signal][0]
                                                for column, signal in TABLE_COLUMNS.items()})
        self._show_controls()
        return served

    def _show_controls(self) -> None:
        """Start the run-time controls at the startup file's values."""
        values = {
            ":bpm_noise_um": float(np.mean(self.bpm_errors.noise)) * 1e6,
            ":lifetime_setting_h": self.beam.lifetime_h if math.isfinite(self.beam.lifetime_h) else 0.0,
            ":topup": int(self.beam.topup),
            ":topup_low_mA": self.beam.band[0],
            ":topup_high_mA": self.beam.band[1],
            ":ramp": int(self.config.realism.ramp),
            ":inject": 0,
        }
        for key, record in self.controls.items():
            record.set(values.get(key, 1), process=False)  # power switches start ON
        for record in self.signals.get("seed", ()):
            record.set(self.config.realism.seed)
        for (_, status), record in self.status.items():
            if status == "power":
                record.set(1)

    def load_optics(self, mode: str) -> None:
        """Set every converter of an optics mode to its table value, as one batch.

        The setpoint records show the new values (and autosave keeps them); the converters take
        them from the next tick on.
        """
        with self._lock:
            for device, value in self.optics[mode].items():
                self.setpoints[device].set(value, process=False)
                self.bank.set(device, value)
        self._wake.set()
        log.info("optics mode %s: %d converters", mode, len(self.optics[mode]))

    def select_optics(self, mode: str) -> None:
        """Load an optics mode as if a client had put it to ``$(P)OPTICS:MODE``."""
        for record in self.signals.get("optics_mode", ()):
            record.set(list(self.optics).index(mode), process=False)
        self.load_optics(mode)

    def _on_put(self, device: str) -> Callable[[float], None]:
        def on_put(value: float) -> None:
            with self._lock:
                self.bank.set(device, value)
            self._wake.set()

        return on_put

    def _on_power(self, device: str) -> Callable[[int], None]:
        def on_put(value: int) -> None:
            with self._lock:
                self.bank.switch(device, bool(value))
            self._wake.set()
            if (device, "power") in self.status:
                self.status[(device, "power")].set(int(bool(value)))

        return on_put

    def _on_control(self, signal: str) -> Callable[[float], None]:
        def on_put(value: float) -> None:
            with self._lock:
                self.control(signal, value)
            self._wake.set()

        return on_put

    def control(self, signal: str, value: float) -> None:
        """What a put on one of the twin's run-time controls does."""
        beam = self.beam
        if signal == "bpm_noise_um":
            self.bpm_errors.noise[:] = value * 1e-6
        elif signal == "lifetime_setting_h":
            beam.lifetime_h = value if value > 0 else math.inf
        elif signal == "topup":
            beam.topup = bool(value)
        elif signal == "topup_low_mA":
            beam.band = (value, beam.band[1])
        elif signal == "topup_high_mA":
            beam.band = (beam.band[0], value)
        elif signal == "inject" and value:
            beam.inject()
        elif signal == "ramp":
            self.config.realism.ramp = bool(value)
            self.bank.set_slew(self.config.realism.slew_rates)

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
        """The converters start at their setpoints as the records hold them (autosave may have
        restored them); the first tick sends all of them to the model."""
        initial = {device: record.get() for device, record in self.setpoints.items()}
        with self._lock:
            self.bank = ConverterBank(self.physics.kinds, self.config.realism.slew_rates, initial)

    def run(self) -> None:
        """Tick at the configured rate until ``stop()``: converters move, one batch goes to the model,
        the beam lives or dies, one publication.

        A put does not wait for the next tick: it wakes the loop (at most every ``MIN_TICK_GAP``),
        and the period starts again from there.
        """
        period = 1.0 / self.config.rate_hz
        last = next_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            dt, last = now - last, now
            with self._lock:
                moved = self.bank.advance(dt)
                if self.state is None:  # the first batch: every converter as it stands
                    moved = {name: out.output for name, out in self.bank.outputs.items()}
                refusals, self._refusals = self._refusals, []
            for device, reason in refusals:
                self._refuse(device, reason)
            batch = [Change(d, self.physics.quantities[d], v) for d, v in moved.items()]
            try:
                step = self.physics.step(batch) if batch or self.state is None else Step(self.state)
                with self._lock:
                    self.beam.advance(dt, holdable=step.state.stable)
                self.publish(step)
            except (EOFError, OSError):
                log.error("the physics process has gone; stopping the twin")
                raise
            except Exception:  # noqa: BLE001 - a publication bug must not stop the IOC
                log.exception("publication failed")
            next_tick = max(next_tick + period, time.monotonic())
            if self._wake.wait(max(0.0, next_tick - time.monotonic())):
                self._wake.clear()
                time.sleep(max(0.0, now + MIN_TICK_GAP - time.monotonic()))
                next_tick = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _refuse(self, device: str, reason: str) -> None:
        log.warning("refused %s: %s", device, reason)
        self.setpoints[device].set_alarm(alarm.MINOR_ALARM, alarm.WRITE_ALARM)

    # -- publication ----------------------------------------------------------------------------

    def publish(self, step: Step) -> None:
        state = self.state = step.state
        self.updates += 1
        self._publish_converters(step)
        alive = self.beam.alive
        if alive:
            x, y = self.bpm_errors.read(state.x, state.y, self.random["bpm_noise"])
            self._set(BEAM_SIGNALS, replace(state, x=x, y=y))  # what the BPMs read
            self._set({"beam_current": lambda s: self.beam.current, "lifetime_h": lambda s: self.beam.lifetime_h},
                      state)  # lifetime inf: no decay
        else:  # keep the last readings, marked INVALID (the per-BPM PVs follow); no current, no lifetime
            for signal in BEAM_SIGNALS:
                for record in self.signals.get(signal, ()):
                    record.set_alarm(alarm.INVALID_ALARM, alarm.READ_ALARM)
            for signal in ("beam_current", "lifetime_h"):
                for record in self.signals.get(signal, ()):
                    record.set(0.0, severity=alarm.MAJOR_ALARM, alarm=alarm.STATE_ALARM)
        reason = state.reason if not state.stable else "" if alive else NO_BEAM.replace("$(P)", self.config.prefix)
        self._set({"beam_lost": lambda s: int(not alive), "lost_reason": lambda s: reason[:255],
                   "updates": lambda s: self.updates}, state)
        self._set(TWIN_SIGNALS, state)

    def _publish_converters(self, step: Step) -> None:
        """Readbacks show the converters' outputs, with their noise when they have some."""
        rng = self.random["converter_noise"]
        for device, value in step.applied.items():
            if self.setpoints[device].get() == value:
                self.setpoints[device].set_alarm(alarm.NO_ALARM, alarm.NO_ALARM)
        for device, reason in step.refused.items():
            self._refuse(device, reason)
        noisy = np.any(self.readback_noise > 0)
        if noisy or step.applied or self.updates == 1:
            outputs = np.array([self.bank.outputs[d].output for d in self.readback_devices])
            if noisy:
                outputs += self.readback_noise * rng.standard_normal(len(outputs))
            for record in self.signals["readbacks"]:
                record.set(outputs)

    def _set(self, signals: dict[str, Callable[[BeamState], object]], state: BeamState) -> None:
        for signal, read in signals.items():
            records_ = self.signals.get(signal)
            if records_:
                value = read(state)
                for record in records_:
                    record.set(value)
