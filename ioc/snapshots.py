"""Snapshots: the twin's whole state by name, in ``<state dir>/snapshots/<name>.json``.

``$(P)SNAPSHOT:SAVE`` / ``:RESTORE`` take a name, ``$(P)SNAPSHOT:LIST`` lists the saved ones. A
snapshot holds every setpoint, the power switches and run-time controls, the optics mode, the magnet
errors (seed and settings) and the BPMs' calibration errors, the faults in force and the beam
current; ``Snapshot`` is the one place that says so.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from twinioc.model.realism import MagnetErrorSettings, StoredBeam
from twinioc.model.tables import PvRow

from .controls import ControlPanel
from .fault_desk import FaultDesk
from .faults import FaultError
from .journal import now_iso
from .physics import MagnetErrors
from .publisher import Publisher
from .put_log import SNAPSHOT, PutLog, command_callbacks
from .setpoints import SetpointDesk

NAME = re.compile(r"[A-Za-z0-9_.-]{1,60}")
BPM_ERRORS = ("offset", "gain", "roll", "noise")
POWER = "power_switch"  # a switch's key among the controls: "<PC>:power_switch"; a run-time control's is ":<signal>"


class SnapshotError(ValueError):
    """A snapshot that cannot be saved or restored; the message says why."""


@dataclass
class Snapshot:
    """The twin's whole state, as it is saved: the schema of a snapshot file."""

    machine: str
    saved_at: str
    setpoints: dict[str, float]  # converter -> setpoint
    controls: dict[str, float]  # "<PC>:power_switch" -> 0 | 1, ":<control signal>" -> its value
    optics_mode: list[int]  # the optics-mode records' states
    bpm_errors: dict[str, list]  # offset (2, n), gain (2, n), roll (n), noise (n)
    magnet_errors: MagnetErrorSettings
    faults: list[dict]  # the faults in force, as tables
    beam: dict[str, object]  # current_mA, injecting; saved also: physics (the equilibrium's settings)

    def to_json(self) -> str:
        return json.dumps({"machine": self.machine, "saved_at": self.saved_at, "setpoints": self.setpoints,
                           "controls": self.controls, "optics_mode": self.optics_mode,
                           "errors": {"bpm": self.bpm_errors, "magnets": self.magnet_errors.as_dict()},
                           "faults": self.faults, "beam": self.beam}, indent=1)

    @classmethod
    def from_json(cls, text: str, machine: str, n_bpms: int) -> Snapshot:
        """A snapshot of *machine* (with *n_bpms* BPMs) from its file's text; ``SnapshotError`` if
        it is not one."""
        data = json.loads(text)
        if data.get("machine") != machine:
            raise SnapshotError(f"it is of {data.get('machine')}, not {machine}")
        missing = {"saved_at", "setpoints", "controls", "optics_mode", "errors", "faults", "beam"} - data.keys()
        if missing:
            raise SnapshotError(f"it lacks {', '.join(sorted(missing))}")
        try:
            bpm = {key: np.asarray(data["errors"]["bpm"][key], dtype=float).tolist() for key in BPM_ERRORS}
            snapshot = cls(machine, str(data["saved_at"]), {d: float(v) for d, v in data["setpoints"].items()},
                           {k: _number(v) for k, v in data["controls"].items()}, [int(i) for i in data["optics_mode"]],
                           bpm, MagnetErrorSettings.from_dict(data["errors"]["magnets"]), list(data["faults"]),
                           {"current_mA": float(data["beam"]["current_mA"]),
                            "injecting": bool(data["beam"]["injecting"])})
        except (KeyError, TypeError, ValueError) as err:
            raise SnapshotError(f"it cannot be read: {type(err).__name__}: {err}") from None
        if not all(math.isfinite(value) for value in snapshot.setpoints.values()):
            raise SnapshotError("its setpoints are not all finite numbers")
        shapes = {key: np.shape(bpm[key]) for key in BPM_ERRORS}
        if shapes != {"offset": (2, n_bpms), "gain": (2, n_bpms), "roll": (n_bpms,), "noise": (n_bpms,)}:
            raise SnapshotError(f"its BPM errors are not those of {n_bpms} BPMs: {shapes}")
        return snapshot


def _number(value: object) -> int | float:
    """A control's saved value as it was (a switch's int, a setting's float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return value


@dataclass
class TwinParts:
    """The parts of the twin a snapshot is taken from and put back into."""

    setpoints: SetpointDesk
    controls: ControlPanel
    faults: FaultDesk
    publisher: Publisher
    beam: StoredBeam
    magnet_errors: MagnetErrors
    beam_physics: dict  # what the equilibrium and the lifetime are computed with (startup settings)


class SnapshotDesk:
    """Owns the snapshot folder and the snapshot commands and reports (the list, the seed); takes the
    twin's state from its parts and puts it back."""

    def __init__(self, folder: Path, machine: str, parts: TwinParts, lock: threading.Lock, put_log: PutLog,
                 result, build):
        self._build = build  # the record builders (``records``)
        self.folder, self.machine, self.parts = Path(folder), machine, parts
        self._lock, self._put_log, self._result = lock, put_log, result
        self.reports: dict[str, list] = {}  # snapshot_list | seed -> records

    # -- records --------------------------------------------------------------------------------

    def add_report(self, row: PvRow) -> object:
        record = getattr(self._build, row.record)(row)
        self.reports.setdefault(row.signal, []).append(record)
        return record

    def add_command(self, row: PvRow) -> object:
        check, run = {"snapshot_save": (self.path, self.save),
                      "snapshot_restore": (self.read, lambda name: self.restore(name, row.pv))}[row.signal]
        return self._build.command(row, *command_callbacks(self._put_log, self._result, "snapshot", row.pv, check, run,
                                                           (SnapshotError, FaultError, OSError)))

    def show(self) -> None:
        for record in self.reports.get("snapshot_list", ()):
            record.set("\n".join(self.names())[:4095])
        for record in self.reports.get("seed", ()):
            record.set(self.parts.magnet_errors.settings.seed)

    # -- the folder -----------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        if not NAME.fullmatch(name):
            raise SnapshotError(f"a snapshot name is 1-60 letters, digits, '_', '.' or '-', not {name!r}")
        return self.folder / f"{name}.json"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json"))

    def read(self, name: str) -> Snapshot:
        path = self.path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot {name!r} (saved: {', '.join(self.names()) or 'none'})") from None
        except OSError as err:
            raise SnapshotError(f"snapshot {name!r} cannot be read: {err}") from None
        try:
            snapshot = Snapshot.from_json(text, self.machine, len(self.parts.publisher.bpm_index))
            for table in snapshot.faults:
                self.parts.faults.check(table)
        except (SnapshotError, FaultError, ValueError) as err:
            raise SnapshotError(f"snapshot {name!r}: {err}") from None
        unknown = snapshot.setpoints.keys() - self.parts.setpoints.setpoints.keys()
        if unknown:
            raise SnapshotError(f"snapshot {name!r} sets converters this machine lacks: {', '.join(sorted(unknown))}")
        return snapshot

    def save(self, name: str) -> str:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(self.take().to_json())
        temporary.replace(path)
        self.show()
        return self._result(f"snapshot {name!r} saved")

    # -- the twin's state -----------------------------------------------------------------------

    def take(self) -> Snapshot:
        """The twin's whole state now."""
        p = self.parts
        controls = {f":{signal}": value for signal, value in p.controls.settings().items()}
        controls |= {f"{device}:{POWER}": record.get() for device, record in p.setpoints.switches.items()}
        with self._lock:
            errors = p.publisher.bpm_errors
            return Snapshot(self.machine, now_iso(), {d: r.get() for d, r in p.setpoints.setpoints.items()},
                            controls, [r.get() for r in p.setpoints.optics_records],
                            {key: getattr(errors, key).tolist() for key in BPM_ERRORS}, p.magnet_errors.settings,
                            p.faults.tables(), {"current_mA": p.beam.current, "injecting": p.beam.injecting,
                                                "physics": p.beam_physics})

    def restore(self, name: str, pv: str) -> None:
        """Put the twin back in the state saved as *name*; journaled as one entry with its setpoints."""
        snapshot, p = self.read(name), self.parts
        p.controls.restore({key[1:]: value for key, value in snapshot.controls.items() if key.startswith(":")})
        for key, value in snapshot.controls.items():
            device, _, kind = key.rpartition(":")
            if kind == POWER and device in p.setpoints.switches:
                p.setpoints.switches[device].set(value, process=False)
                p.setpoints.switch(device, bool(value))
        for record, value in zip(p.setpoints.optics_records, snapshot.optics_mode, strict=False):
            record.set(value, process=False)
        with self._lock:
            for key in BPM_ERRORS:
                getattr(p.publisher.bpm_errors, key)[...] = np.array(snapshot.bpm_errors[key])
            p.magnet_errors.change(snapshot.magnet_errors)
            p.beam.current, p.beam.injecting = snapshot.beam["current_mA"], snapshot.beam["injecting"]
        p.faults.replace_all(snapshot.faults)
        detail = self._result(f"snapshot {name!r} of {snapshot.saved_at} restored")
        p.setpoints.set_setpoints(snapshot.setpoints, lambda: self._put_log.accepted(
            "snapshot", pv, name, detail=detail, setpoints=snapshot.setpoints, source=SNAPSHOT))
        p.faults.show()
        self.show()
