"""The twin as an IOC: records from the machine's PV table, puts to the model, beam state out.

What a client sees:

* setpoints (ao: ``<PC>:set``, ``<PC>:setCur``, ``MCLKHX251C:freq``, ``PAHRP:setVoltCav``, ...): a
  put is checked (not a finite number: refused, old value kept, MINOR/WRITE alarm; beyond
  DRVL/DRVH: clamped by the record with a HIHI/LOLO alarm), journaled and handed to its converter
  (unless a fault drops, delays or alters it) before the put completes. Every tick the converters
  that moved go to the physics process as one batch: a new lattice version.
* readbacks (``:rdbk``, ``:rdCur``, ``:hwRdFreq``, ``:rdFrq``): the converters' outputs (with their
  noise), published once per tick as one array, ``$(P)READBACKS``, whose elements they show.
* BPMs, orbit arrays, tunes, current and the twin's own PVs: the state computed from that batch,
  published once per tick; the per-BPM PVs show the elements of ``$(P)ORBIT:X`` and ``:Y``. With no
  stable orbit the beam is lost: current 0, beam readings INVALID.
* ``$(P)OPTICS:MODE`` (mbbo, machines with an ``optics.csv``): a put sets every converter of that
  optics mode to its table value, as one batch.
* ``$(P)FAULT:ADD`` / ``:CLEAR`` (``faults.py`` says what can go wrong), ``$(P)FAULT:LIST``;
  ``$(P)SNAPSHOT:SAVE`` / ``:RESTORE`` (a name), ``$(P)SNAPSHOT:LIST``; ``$(P)COMMAND:RESULT`` says
  what the last of these did. A bad command is refused at once and the result says why.
* every put on any of these goes to the journal (``journal.py``), ``$(P)JOURNAL:SEQ`` is its last
  entry; every lattice version goes to the lattice journal.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from softioc import alarm
from twinioc.model.devices import read_optics
from twinioc.model.realism import BpmErrors, ConverterBank, StoredBeam, streams
from twinioc.model.state import BeamState, Change
from twinioc.model.tables import read_csv

from . import records
from .config import Config, Realism
from .faults import Fault, FaultError, Faults, parse
from .journal import Journal, now_iso
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

SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,60}")
# The magnet errors a snapshot carries: the settings they are drawn from.
ERROR_SETTINGS = ("seed", "quadrupole_offset", "sextupole_offset", "magnet_roll", "magnet_offsets")


class CommandError(ValueError):
    """A twin command (fault, snapshot) that cannot be carried out; the message says why."""


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _settings(magnets: dict) -> dict:
    """The magnet-error settings a snapshot holds, in the types of ``Realism``."""
    return {"seed": int(magnets["seed"]), "quadrupole_offset": float(magnets["quadrupole_offset"]),
            "sextupole_offset": float(magnets["sextupole_offset"]), "magnet_roll": float(magnets["magnet_roll"]),
            "magnet_offsets": {name: tuple(map(float, dxy)) for name, dxy in magnets["magnet_offsets"].items()}}


class Twin:
    def __init__(self, config: Config, physics: PhysicsProcess, state_dir: Path):
        self.config = config
        self.physics = physics
        max_bytes = int(config.journal_max_mb * 1e6)
        self.journal = Journal(state_dir / "journal.jsonl", max_bytes, config.journal_keep)
        self.versions = Journal(state_dir / "lattice.jsonl", max_bytes, config.journal_keep)
        self.snapshot_dir = state_dir / "snapshots"
        self.rows = [dict(row, pv=row["pv"].replace("$(P)", config.prefix))
                     for row in read_csv(config.tables / "pvs.csv")]
        self.optics = read_optics(config.tables)  # mode -> {converter: setting}
        bpms = sorted(read_csv(config.tables / "bpms.csv"), key=lambda r: int(r["index"]))
        self.bpm_index = {r["name"]: int(r["index"]) for r in bpms}
        self.setpoints: dict[str, object] = {}  # device -> ao record
        self.limits: dict[str, tuple[float, float]] = {}  # device -> (DRVL, DRVH)
        # the converters in $(P)READBACKS order, and the σ of each one's readback noise
        self.readback_devices = list(dict.fromkeys(r["device"] for r in self.rows if r["signal"] == "readback"))
        self.readback_noise = np.zeros(len(self.readback_devices))
        self.status: dict[tuple[str, str], object] = {}  # (device, power|fault) -> mbbi
        self.signals: dict[str, list] = {}  # signal -> the records that show it
        self.controls: dict[str, object] = {}  # control signal -> record
        self.commands: dict[str, object] = {}  # fault_add, snapshot_save, ... -> record
        self.faults = Faults([], list(self.bpm_index))  # the converters join in build()
        self._refusals: list[tuple[str, str]] = []
        self._delayed: list[tuple[float, str, float]] = []  # commands a fault holds back: (due, device, value)
        self._scheduled: list[tuple[float, dict]] = []  # scenario faults still to strike: (due, table)
        self._previous: dict[str, object] = {}  # pv -> its last value, the journal's "old"
        self._latest = 0  # the lattice version the last batch sent gives: a put's effect comes after it
        self._new_errors: Realism | None = None  # magnet errors to send with the next batch
        self._reading: tuple[np.ndarray, np.ndarray] | None = None  # the BPMs' last (x, y), before faults
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by puts: the next tick comes at once
        self._internal = threading.local()  # .active: this thread's record processing is the twin's own
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
                self.setpoints[device] = records.ao(row, self._accept(device, row["pv"]))
                self.limits[device] = (float(row["low"]), float(row["high"]))
                if device in self.readback_devices:
                    span = float(row["high"]) - float(row["low"])
                    self.readback_noise[self.readback_devices.index(device)] = \
                        self.config.realism.readback_noise_ppm * 1e-6 * span
                continue
            if kind in ("ao", "bo"):
                if signal == "power_switch":
                    on_put = self._journaled("power", row["pv"], device, self._on_power(device))
                else:
                    on_put = self._journaled("control", row["pv"], "", self._on_control(signal))
                self.controls[f"{device}:{signal}"] = getattr(records, f"control_{kind}")(row, on_put)
                continue
            if kind == "command":
                self.commands[signal] = records.command(row, self._check(signal, row["pv"]),
                                                        self._journaled(signal.split("_")[0], row["pv"], "",
                                                                        self._run(signal)))
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
                select = self._journaled("optics", row["pv"], "", self.load_optics)
                record = records.mbbo(row, list(self.optics), select)
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
        self.faults.converters = list(self.setpoints)
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
            self._previous[record.name] = values.get(key, 1)
        for record in self.signals.get("seed", ()):
            record.set(self.config.realism.seed)
        for (_, status), record in self.status.items():
            if status == "power":
                record.set(1)

    def load_optics(self, mode: str) -> dict:
        """Set every converter of an optics mode to its table value, as one batch.

        The setpoint records show the new values (and autosave keeps them); the converters take
        them from the next tick on. Returns the setpoints, for the journal.
        """
        version = self.set_setpoints(self.optics[mode])
        log.info("optics mode %s: %d converters", mode, len(self.optics[mode]))
        return {"setpoints": self.optics[mode], "lattice_version": version}

    def set_setpoints(self, values: dict[str, float]) -> int:
        """Setpoints as if each had been put (the records show them, the converters follow), but
        without a journal entry of their own: the caller journals them as one. Returns the lattice
        version that first carries them."""
        for device, value in values.items():  # not under _lock: a put holds its record's lock, then takes _lock
            self.setpoints[device].set(value, process=False)
        version = self._latest
        if self.bank is not None:  # before the IOC runs there are only the records
            with self._lock:
                for device, value in values.items():
                    version = max(version, self._command(device, value)[1] or version)
        self._wake.set()
        return version

    def select_optics(self, mode: str) -> None:
        """Load an optics mode as if a client had put it to ``$(P)OPTICS:MODE``."""
        for record in self.signals.get("optics_mode", ()):
            record.set(list(self.optics).index(mode), process=False)
        self.load_optics(mode)

    def _accept(self, device: str, pv: str) -> Callable[[object, float], bool]:
        """What a put on a setpoint does. softioc calls this while the record processes the put, so
        the put is journaled and handed to its converter before any client can read the new value:
        a put that completed is on disk, even if the IOC is killed the next moment."""
        def accept(record, value: float) -> bool:
            old = record.get()
            if getattr(self._internal, "active", False):
                # the twin itself, setting an alarm: softioc does that by putting the value it read
                # a moment before. A client's put may have come in between; then that value is
                # stale, and refusing it keeps the client's (the alarm is set all the same).
                return value == old
            with self._lock:
                if not math.isfinite(value):
                    reason = f"{value} is not a finite number"
                    self._refusals.append((device, reason))  # the next tick raises the alarm
                    self._log_put("set", pv, device, old, value, "refused", reason)
                    self._wake.set()
                    return False
                detail, version = self._command(device, value)
                low, high = self.limits[device]
                if value in (low, high):
                    detail = ", ".join(filter(None, [f"at the {'lower' if value == low else 'upper'} limit", detail]))
                self._log_put("set", pv, device, old, value, "accepted", detail, version)
            self._wake.set()
            return True

        return accept

    def _command(self, device: str, value: float) -> tuple[str, int | None]:
        """Hand a new setpoint to its converter, through the faults on it; return what happened and
        the lattice version that first carries it (None: not yet known). Holds ``_lock``."""
        fault = self.faults.command(device)
        if fault is not None and fault.kind == "drop":
            return f"dropped by fault {fault.id}", None
        if fault is not None and fault.kind == "delay":
            seconds = fault.params["seconds"]
            self._delayed.append((time.monotonic() + seconds, device, value))
            return f"delayed {seconds:g} s by fault {fault.id}", None
        detail = ""
        if fault is not None:  # modify
            low, high = self.limits[device]
            value = min(max(fault.params["scale"] * value + fault.params["offset"], low), high)
            detail = f"the converter was given {value:.9g} by fault {fault.id}"
        self.bank.set(device, value)
        out = self.bank.outputs[device]
        if out.output != out.target:
            return detail, self._latest + 1
        quiet = "converter tripped" if out.tripped else "converter off" if not out.on else "output already there"
        return detail or quiet, self._latest

    def _log_put(self, command: str, pv: str, device: str, old: object, new: object, outcome: str,
                 detail: str = "", version: int | None = None, **extra) -> None:
        self.journal.append({"command": command, "pv": pv, "device": device, "old": old, "new": new,
                             "outcome": outcome, "detail": detail, "lattice_version": version, **extra})

    def _journaled(self, command: str, pv: str, device: str, apply: Callable) -> Callable:
        """A put callback that carries out *apply* and journals the put (with what *apply* returns:
        a dict of extra fields, or a string saying what it did)."""
        def on_put(value) -> None:
            try:
                done = apply(value)
            except (CommandError, FaultError) as err:  # checked already; a race (a file gone) can end here
                self._result(f"failed: {err}")
                self._log_put(command, pv, device, self._previous.get(pv), value, "refused", str(err))
                return
            old, self._previous[pv] = self._previous.get(pv), value
            extra = dict(done) if isinstance(done, dict) else {"detail": done or ""}
            version = extra.pop("lattice_version", self._latest)
            self._log_put(command, pv, device, old, value, "accepted", version=version, **extra)

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

    # -- faults and snapshots ------------------------------------------------------------------------

    def _check(self, signal: str, pv: str) -> Callable[[object, str], bool]:
        """Refuse a bad command at once (the put fails, the result PV and the journal say why)."""
        checks = {"fault_add": lambda text: self.faults.make(parse(text)), "fault_clear": self._check_clear,
                  "snapshot_save": self._snapshot_path, "snapshot_restore": self._read_snapshot}

        def check(record, text: str) -> bool:
            try:
                checks[signal](text)
            except (FaultError, CommandError) as err:
                self._result(f"refused {text!r}: {err}")
                self._log_put(signal.split("_")[0], pv, "", record.get(), text, "refused", str(err))
                return False
            return True

        return check

    def _check_clear(self, text: str) -> None:
        if text.strip().lower() != "all" and not (text.strip().isdigit() and int(text) in self.faults.active):
            raise CommandError(f"no fault {text!r} (active: {', '.join(map(str, self.faults.active)) or 'none'})")

    def _run(self, signal: str) -> Callable[[str], str]:
        return {"fault_add": lambda text: self.add_fault(parse(text)),
                "fault_clear": self.clear_faults,
                "snapshot_save": self.save_snapshot,
                "snapshot_restore": self.restore_snapshot}[signal]

    def _result(self, text: str) -> str:
        """Say what a command did, with the time: the same outcome twice is still a new result.
        Returns *text*, for the journal."""
        log.info("%s", text)
        stamp = f" (at {datetime.now(UTC).strftime('%H:%M:%S.%f')[:-3]} UTC)"
        for record in self.signals.get("command_result", ()):
            record.set(text[:255 - len(stamp)] + stamp)
        return text

    def schedule_faults(self, tables: list[dict]) -> None:
        """Faults of a scenario file: each strikes ``at_s`` seconds from now (raises ``FaultError``
        for a bad one)."""
        for table in tables:
            self.faults.make(table)
        now = time.monotonic()
        self._scheduled += [(now + table["at_s"], table) for table in tables]

    def add_fault(self, table: dict) -> str:
        with self._lock:
            fault = self._in_force(self.faults.make(table, self._reading))
        self._wake.set()
        self._show_faults()
        return self._result(f"fault {fault.id} added: {fault.spec} ({_count(fault.devices, 'device')})")

    def clear_faults(self, which: str) -> str:
        with self._lock:
            gone = self.faults.clear(which)
            self._untrip(gone)
        self._wake.set()
        self._show_faults()
        return self._result(f"cleared {_count(gone, 'fault')}: "
                          + ", ".join(f"{f.id} ({f.spec})" for f in gone))

    def _in_force(self, fault: Fault) -> Fault:
        """Put a checked fault in force; a trip trips its converters at once. Holds ``_lock``."""
        self.faults.add(fault)
        for device in fault.devices if fault.kind == "trip" else ():
            self.bank.trip(device)
        return fault

    def _untrip(self, gone: list[Fault]) -> None:
        """Reset the converters no trip holds any more; they ramp back to their setpoints."""
        still = self.faults.tripped()
        for fault in gone:
            for device in fault.devices if fault.kind == "trip" else ():
                if device not in still:
                    self.bank.trip(device, False)

    def _show_faults(self) -> None:
        """The fault list, and the status of every converter: a tripped one shows FAULT and OFF."""
        for record in self.signals.get("fault_list", ()):
            record.set(self.faults.listing()[:4095])
        for record in self.signals.get("fault_count", ()):
            record.set(len(self.faults.active))
        tripped = self.faults.tripped()
        for (device, status), record in self.status.items():
            out = self.bank.outputs[device]
            value = int(device in tripped) if status == "fault" else int(out.on and device not in tripped)
            if record.get() != value:
                record.set(value)

    def _snapshot_path(self, name: str) -> Path:
        if not SNAPSHOT_NAME.fullmatch(name):
            raise CommandError(f"a snapshot name is 1-60 letters, digits, '_', '.' or '-', not {name!r}")
        return self.snapshot_dir / f"{name}.json"

    def _read_snapshot(self, name: str) -> dict:
        path = self._snapshot_path(name)
        try:
            snapshot = json.loads(path.read_text())
        except FileNotFoundError:
            raise CommandError(f"no snapshot {name!r} (saved: {', '.join(self.snapshot_names()) or 'none'})") from None
        except (OSError, ValueError) as err:
            raise CommandError(f"snapshot {name!r} cannot be read: {err}") from None
        if snapshot.get("machine") != self.config.machine:
            raise CommandError(f"snapshot {name!r} is of {snapshot.get('machine')}, not {self.config.machine}")
        missing = {"saved_at", "setpoints", "controls", "optics_mode", "errors", "faults", "beam"} - snapshot.keys()
        if missing:
            raise CommandError(f"snapshot {name!r} lacks {', '.join(sorted(missing))}")
        return snapshot

    def snapshot_names(self) -> list[str]:
        return sorted(p.stem for p in self.snapshot_dir.glob("*.json"))

    def _show_snapshots(self) -> None:
        for record in self.signals.get("snapshot_list", ()):
            record.set("\n".join(self.snapshot_names())[:4095])

    def snapshot(self) -> dict:
        """The twin's whole state: setpoints, switches and controls, errors, faults, beam."""
        realism = self.config.realism
        with self._lock:
            return {
                "machine": self.config.machine,
                "saved_at": now_iso(),
                "setpoints": {device: record.get() for device, record in self.setpoints.items()},
                "controls": {key: record.get() for key, record in self.controls.items() if not key.endswith(":inject")},
                "optics_mode": [r.get() for r in self.signals.get("optics_mode", ())],
                "errors": {"bpm": {"offset": self.bpm_errors.offset.tolist(), "gain": self.bpm_errors.gain.tolist(),
                                   "roll": self.bpm_errors.roll.tolist(), "noise": self.bpm_errors.noise.tolist()},
                           "magnets": {key: getattr(realism, key) for key in ERROR_SETTINGS}},
                "faults": [f.as_dict() for f in self.faults.active.values()],
                "beam": {"current_mA": self.beam.current, "injecting": self.beam.injecting},
            }

    def save_snapshot(self, name: str) -> str:
        path = self._snapshot_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.snapshot(), indent=1))
        temporary.replace(path)
        self._show_snapshots()
        return self._result(f"snapshot {name!r} saved")

    def restore_snapshot(self, name: str) -> dict:
        """Put the twin back in a saved state; return the journal's fields (the setpoints it set)."""
        snapshot = self._read_snapshot(name)
        for key, value in snapshot["controls"].items():
            if key in self.controls:
                self.controls[key].set(value, process=False)
                self._previous[self.controls[key].name] = value
                device, _, signal = key.rpartition(":")
                if signal == "power_switch":
                    self._on_power(device)(value)
                else:
                    with self._lock:
                        self.control(signal, value)
        for record, value in zip(self.signals.get("optics_mode", ()), snapshot["optics_mode"], strict=False):
            record.set(value, process=False)
        bpm, magnets = snapshot["errors"]["bpm"], _settings(snapshot["errors"]["magnets"])
        with self._lock:
            for key in ("offset", "gain", "roll", "noise"):
                getattr(self.bpm_errors, key)[...] = np.array(bpm[key])
            realism = self.config.realism
            if any(getattr(realism, key) != magnets[key] for key in ERROR_SETTINGS):
                self.config.realism = replace(realism, **magnets)
                self._new_errors = self.config.realism
            gone = list(self.faults.active.values())
            self.faults.active.clear()
            self._untrip(gone)
            for table in snapshot["faults"]:
                self._in_force(self.faults.make(table))
            self.beam.current, self.beam.injecting = snapshot["beam"]["current_mA"], snapshot["beam"]["injecting"]
        for record in self.signals.get("seed", ()):
            record.set(self.config.realism.seed)
        version = self.set_setpoints(snapshot["setpoints"])
        self._show_faults()
        return {"detail": self._result(f"snapshot {name!r} of {snapshot['saved_at']} restored"),
                "setpoints": snapshot["setpoints"], "lattice_version": version}

    # -- the tick -------------------------------------------------------------------------------

    def restore_setpoints(self, values: dict[str, float]) -> list[str]:
        """Before the IOC runs: show *values* (from the journal) in the setpoint records; return the
        devices this twin does not have."""
        self.set_setpoints({device: value for device, value in values.items() if device in self.setpoints})
        return sorted(set(values) - set(self.setpoints))

    def initial_batch(self) -> None:
        """The converters start at their setpoints as the records hold them (autosave and the
        journal may have restored them); the first tick sends all of them to the model."""
        initial = {device: record.get() for device, record in self.setpoints.items()}
        with self._lock:
            self.bank = ConverterBank(self.physics.kinds, self.config.realism.slew_rates, initial)
            self._latest = self.physics.version
        self.versions.append({"event": "start", "machine": self.config.machine, "seed": self.config.realism.seed,
                              "version": self._latest})
        self._show_snapshots()

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
                strikes = self._due(now)
                moved = self.bank.advance(dt)
                if self.state is None:  # the first batch: every converter as it stands
                    moved = {name: out.output for name, out in self.bank.outputs.items()}
                refusals, self._refusals = self._refusals, []
                errors, self._new_errors = self._new_errors, None
                self._latest += bool(moved) + (errors is not None)
            for device, reason in refusals:
                self._refuse(device, reason)
            for table in strikes:
                self.add_fault(table)
            batch = [Change(d, self.physics.quantities[d], v) for d, v in moved.items()]
            try:
                if batch or errors or self.state is None:
                    step = self.physics.step(batch, errors)
                    self._journal_version(step, errors)
                else:
                    step = Step(self.state)
                with self._lock:
                    self._latest = step.state.version
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

    def _due(self, now: float) -> list[dict]:
        """Hand the commands a delay fault held back to their converters when their time has come;
        return the scenario faults whose time has come. Holds ``_lock``."""
        for _, device, value in (entry for entry in self._delayed if entry[0] <= now):
            self.bank.set(device, value)
        self._delayed = [entry for entry in self._delayed if entry[0] > now]
        # a stuck BPM keeps a reading: it waits for the first one
        due = [entry for entry in self._scheduled
               if entry[0] <= now and (entry[1]["kind"] != "bpm-stuck" or self._reading is not None)]
        self._scheduled = [entry for entry in self._scheduled if entry not in due]
        return [table for _, table in due]

    def _journal_version(self, step: Step, errors: Realism | None) -> None:
        entry = {"version": step.state.version, "outputs": step.applied}
        if errors is not None:
            entry["magnet_errors"] = {key: getattr(errors, key) for key in ERROR_SETTINGS}
        if step.applied or errors is not None:
            self.versions.append(entry)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()  # the journals stay open: puts may come until the IOC exits, and each is flushed

    def _refuse(self, device: str, reason: str) -> None:
        log.warning("refused %s: %s", device, reason)
        self._alarm(device, alarm.MINOR_ALARM, alarm.WRITE_ALARM)

    def _alarm(self, device: str, severity: int, status: int) -> None:
        """Set a setpoint's alarm. That processes the record, in this thread, and is no put
        (``_accept`` knows it by ``_internal``)."""
        self._internal.active = True
        try:
            self.setpoints[device].set_alarm(severity, status)
        finally:
            self._internal.active = False

    # -- publication ----------------------------------------------------------------------------

    def publish(self, step: Step) -> None:
        state = self.state = step.state
        self.updates += 1
        self._publish_converters(step)
        alive = self.beam.alive
        if alive:
            self._reading = self.bpm_errors.read(state.x, state.y, self.random["bpm_noise"])
            x, y = self.faults.read(*self._reading)
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
                   "updates": lambda s: self.updates, "journal_seq": lambda s: self.journal.seq}, state)
        self._set(TWIN_SIGNALS, state)

    def _publish_converters(self, step: Step) -> None:
        """Readbacks show the converters' outputs, with their noise when they have some."""
        rng = self.random["converter_noise"]
        for device, value in step.applied.items():
            if self.setpoints[device].get() == value:
                self._alarm(device, alarm.NO_ALARM, alarm.NO_ALARM)
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
