"""The fault desk: ``$(P)FAULT:ADD`` / ``:CLEAR``, the scenario's schedule, trips, the fault list, and
the converters' status records (``:stat1`` / ``:stat2`` on BESSY II).

A bad command is refused at once: the put fails, ``$(P)COMMAND:RESULT`` and the journal say why.
What each kind of fault does is ``faults.py``'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from twinioc.model.tables import PvRow

from .faults import Fault, FaultError, Faults, parse
from .put_log import PutLog, command_callbacks


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


class FaultDesk:
    """Owns the faults in force and those a scenario has yet to strike, the fault commands and
    reports, and the converter status records (on/off, tripped)."""

    def __init__(self, converters: list[str], bpms: list[str], lock: threading.Lock, wake: threading.Event,
                 put_log: PutLog, result: Callable[[str], str], powered: Callable[[str], bool], build):
        self.faults = Faults(converters, bpms)
        self._build = build  # the record builders (``records``)
        self._lock, self._wake, self._put_log, self._result, self._powered = lock, wake, put_log, result, powered
        self.status: dict[tuple[str, str], object] = {}  # (converter, "power" | "fault") -> mbbi
        self.reports: dict[str, list] = {}  # fault_list | fault_count -> records
        self._scheduled: list[tuple[float, dict]] = []  # scenario faults still to strike: (due, table)
        self.reading: tuple[np.ndarray, np.ndarray] | None = None  # the BPMs' last (x, y), before faults

    # -- records --------------------------------------------------------------------------------

    def add_status(self, row: PvRow) -> object:
        self.status[(row.device, row.signal)] = record = self._build.mbbi(row)
        if row.signal == "power":
            record.set(1)
        return record

    def add_report(self, row: PvRow) -> object:
        record = getattr(self._build, row.record)(row)
        self.reports.setdefault(row.signal, []).append(record)
        return record

    def add_command(self, row: PvRow) -> object:
        check, run = {"fault_add": (self._check_add, self._add_text), "fault_clear": (self._check_clear, self.clear)
                      }[row.signal]
        return self._build.command(row, *command_callbacks(self._put_log, self._result, "fault", row.pv, check, run,
                                                           (FaultError,)))

    def _check_add(self, text: str) -> None:
        self.check(parse(text))

    def check(self, table: dict) -> None:
        """Raise ``FaultError`` if *table* is not a fault this twin can have."""
        self.faults.make(table)

    def _check_clear(self, text: str) -> None:
        if text.strip().lower() != "all" and not (text.strip().isdigit() and int(text) in self.faults.active):
            raise FaultError(f"no fault {text!r} (active: {', '.join(map(str, self.faults.active)) or 'none'})")

    # -- faults ---------------------------------------------------------------------------------

    def _add_text(self, text: str) -> str:
        return self.add(parse(text))

    def add(self, table: dict) -> str:
        """Put the fault *table* describes in force (a trip trips its converters at the next tick);
        return what was done."""
        with self._lock:
            fault = self.faults.add(self.faults.make(table, self.reading))
        self._wake.set()
        self.show()
        return self._result(f"fault {fault.id} added: {fault.spec} ({_count(fault.devices, 'device')})")

    def clear(self, which: str) -> str:
        """Clear fault number *which*, or ``all``; a converter no trip holds any more ramps back."""
        with self._lock:
            gone = self.faults.clear(which)
        self._wake.set()
        self.show()
        return self._result(f"cleared {_count(gone, 'fault')}: " + ", ".join(f"{f.id} ({f.spec})" for f in gone))

    def replace_all(self, tables: list[dict]) -> None:
        """The faults of a snapshot instead of those in force."""
        with self._lock:
            self.faults.active.clear()
            for table in tables:
                self.faults.add(self.faults.make(table))
        self._wake.set()

    def schedule(self, tables: list[dict]) -> None:
        """Faults of a scenario file: each strikes ``at_s`` seconds from now (raises ``FaultError``
        for a bad one)."""
        for table in tables:
            self.check(table)
        now = time.monotonic()
        self._scheduled += [(now + table["at_s"], table) for table in tables]

    def strike(self, now: float) -> None:
        """Put in force the scenario faults whose time has come (a stuck BPM waits for a first reading)."""
        due = [entry for entry in self._scheduled
               if entry[0] <= now and (entry[1]["kind"] != "bpm-stuck" or self.reading is not None)]
        self._scheduled = [entry for entry in self._scheduled if entry not in due]
        for _, table in due:
            self.add(table)

    def setpoint_fault(self, device: str) -> Fault | None:
        """The newest fault on the setpoints of converter *device* (drop, delay, modify), if any. Holds
        the lock."""
        return self.faults.command(device)

    def tripped(self) -> set[str]:
        return self.faults.tripped()

    def tables(self) -> list[dict]:
        """The faults in force as tables (a snapshot keeps them)."""
        return [fault.as_dict() for fault in self.faults.active.values()]

    def read(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the BPMs show for the readings (*x*, *y*): the faulty ones as their faults say."""
        self.reading = (x, y)
        return self.faults.read(x, y)

    def show(self) -> None:
        """The fault list, and the status of every converter: a tripped one shows FAULT and OFF."""
        for record in self.reports.get("fault_list", ()):
            record.set(self.faults.listing()[:4095])
        for record in self.reports.get("fault_count", ()):
            record.set(len(self.faults.active))
        tripped = self.faults.tripped()
        for (device, status), record in self.status.items():
            on = self._powered(device) and device not in tripped
            value = int(device in tripped) if status == "fault" else int(on)
            if record.get() != value:
                record.set(value)
