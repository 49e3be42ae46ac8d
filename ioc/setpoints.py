"""The setpoint desk: what a put on a setpoint, a power switch or the optics mode does.

A put on a setpoint (``<PC>:set``, ``<PC>:setCur``, ``MCLKHX251C:freq``, ``PAHRP:setVoltCav``, ...)
is checked while the record processes it (not a finite number: refused, the old value kept, a
MINOR/WRITE alarm at the next tick; beyond DRVL/DRVH: clamped by the record, with its HIHI/LOLO
alarm), journaled, and handed to its converter through the faults on its setpoints (dropped, delayed,
modified) before the put completes. A power switch turns a converter's output off (it ramps to
zero) or on; an optics mode sets every converter of the mode as one batch.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from twinioc.model.realism import ConverterBank
from twinioc.model.tables import PvRow, TableError

from . import alarms
from .faults import Fault
from .put_log import CLIENT, OPTICS, REPLAY, PutLog

log = logging.getLogger("twinioc")
REPLAY_IDLE_S = 30.0  # a replay marker with no setpoint put for this long was left on: it goes off


class SetpointDesk:
    """Owns the setpoint, power-switch and optics-mode records and the converter bank behind them,
    the commands a delay fault holds back, and the puts still waiting for a lattice version."""

    def __init__(self, optics: dict[str, dict[str, float]], lock: threading.Lock, wake: threading.Event,
                 put_log: PutLog, setpoint_fault: Callable[[str], Fault | None], build):
        self.optics = optics  # mode -> {converter: setting}
        self._build = build  # the record builders (``records``)
        self._lock, self._wake, self._put_log, self._setpoint_fault = lock, wake, put_log, setpoint_fault
        self.setpoints: dict[str, object] = {}  # converter -> ao record
        self.limits: dict[str, tuple[float, float]] = {}  # converter -> (DRVL, DRVH)
        self.switches: dict[str, object] = {}  # converter -> its power switch (bo)
        self.optics_records: list = []
        self._optics_states: list[list[str]] = []  # each selector's states, in its index order
        self._optics_pvs: list[str] = []
        self._replay_record = None
        self._replay_until = 0.0  # monotonic time until which setpoint puts are a replay's
        self.bank: ConverterBank | None = None  # the converters' outputs, from the first batch on
        self.on_power: Callable[[str], None] = lambda device: None  # a converter was switched
        self._refusals: list[tuple[str, str]] = []  # (converter, why): alarms for the next tick
        self._delayed: list[tuple[float, str, float, int]] = []  # (due, converter, value, seq)
        self._pending: dict[str, list[int]] = {}  # converter -> puts whose value has not reached its output
        self._internal = threading.local()  # .active: this thread's record processing is the twin's own

    # -- records --------------------------------------------------------------------------------

    def add_setpoint(self, row: PvRow) -> object:
        self.limits[row.device] = (float(row.low), float(row.high))
        self.setpoints[row.device] = record = self._build.ao(row, self._accept(row.device, row.pv))
        return record

    def add_switch(self, row: PvRow) -> object:
        def on_put(value: int) -> None:
            self.switch(row.device, bool(value))
            self._put_log.accepted("power", row.pv, value, device=row.device)

        self.switches[row.device] = record = self._build.control_bo(row, on_put)
        self._put_log.hold(row.pv, record.get())
        return record

    def add_optics(self, row: PvRow) -> object:
        """An optics selector: ``$(P)OPTICS:MODE``, or a machine's own with its states in its own
        order (the row's description, "a/b/c"). A put on one loads the mode and shows it on all."""
        states = row.description.split("/") if "/" in row.description else list(self.optics)
        unknown = set(states) - set(self.optics)
        if unknown:
            raise TableError(f"{row.where}: no optics modes {sorted(unknown)} (known: {', '.join(self.optics)})")

        def on_select(mode: str) -> None:
            self._show_optics(mode)
            self.set_setpoints(self.optics[mode], lambda: self._put_log.accepted(
                "optics", row.pv, mode, setpoints=self.optics[mode], source=OPTICS))
            log.info("optics mode %s: %d converters", mode, len(self.optics[mode]))

        record = self._build.mbbo(row, states, on_select)
        self.optics_records.append(record)
        self._optics_states.append(states)
        self._optics_pvs.append(row.pv)
        return record

    def _show_optics(self, mode: str) -> None:
        """Every optics selector shows *mode* (without processing: no selector loads it again)."""
        for pv, record, states in zip(self._optics_pvs, self.optics_records, self._optics_states, strict=True):
            if record.get() != states.index(mode):
                record.set(states.index(mode), process=False)
            self._put_log.hold(pv, mode)

    def add_replay_marker(self, row: PvRow) -> object:
        """``$(P)REPLAY:ACTIVE``: while a replay holds it on, setpoint puts are journaled as the
        replay's; it falls back off by itself ``REPLAY_IDLE_S`` after the last put."""
        def on_put(value: int) -> None:
            self._replay_until = time.monotonic() + REPLAY_IDLE_S if value else 0.0
            self._put_log.accepted("control", row.pv, value)

        # blocking: the replay's put of 1 completes once this ran, before its first setpoint put
        self._replay_record = record = self._build.control_bo(row, on_put, blocking=True)
        record.set(0, process=False)
        self._put_log.hold(row.pv, 0)
        return record

    def _source(self) -> str:
        """Who a put on a setpoint comes from now: a replay that holds the marker, or a client."""
        if self._replay_until and time.monotonic() < self._replay_until:
            self._replay_until = time.monotonic() + REPLAY_IDLE_S
            return REPLAY
        if self._replay_until and self._replay_record is not None:
            self._replay_until = 0.0
            self._replay_record.set(0, process=False)
        return CLIENT

    # -- the put path ---------------------------------------------------------------------------

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
                    self._put_log.refused("set", pv, value, reason, device=device, old=old, source=self._source())
                    accepted = False
                else:
                    delay, given, detail = self._route(device, value)
                    low, high = self.limits[device]
                    if value in (low, high):
                        detail = ", ".join(filter(None, [f"at the {'lower' if value == low else 'upper'} limit",
                                                         detail]))
                    seq = self._put_log.accepted("set", pv, value, device=device, old=old, detail=detail,
                                                 source=self._source())
                    self._hand(device, given, seq, delay)
                    accepted = True
            self._wake.set()
            return accepted

        return accept

    def _route(self, device: str, value: float) -> tuple[float | None, float, str]:
        """Where a new setpoint goes through the faults on its converter: (the delay in s, None if it
        is dropped; the value the converter is given; what happened). Holds the lock."""
        fault = self._setpoint_fault(device)
        if fault is not None and fault.kind == "drop":
            return None, value, f"dropped by fault {fault.id}"
        if fault is not None and fault.kind == "delay":
            seconds = fault.params["seconds"]
            return seconds, value, f"delayed {seconds:g} s by fault {fault.id}"
        if fault is not None:  # modify
            low, high = self.limits[device]
            value = min(max(fault.params["scale"] * value + fault.params["offset"], low), high)
            return 0.0, value, f"the converter was given {value:.9g} by fault {fault.id}"
        out = self.bank.outputs[device] if self.bank is not None else None
        quiet = "" if out is None else "converter tripped" if out.tripped else "converter off" if not out.on \
            else "output already there" if out.output == value else ""
        return 0.0, value, quiet

    def _hand(self, device: str, value: float, seq: int | None, delay: float | None) -> None:
        """Give *value* to the converter now, after *delay* seconds, or never (None). Holds the lock."""
        if delay is None or self.bank is None:
            return
        if delay > 0:
            self._delayed.append((time.monotonic() + delay, device, value, seq))
            return
        self.bank.set(device, value)
        if seq is not None:
            self._pending.setdefault(device, []).append(seq)

    def set_setpoints(self, values: dict[str, float], entry: Callable[[], int] | None = None) -> None:
        """Setpoints as if each had been put: the records show them, the converters follow, through
        the faults. *entry* writes the one journal entry for all of them and returns its seq."""
        for device, value in values.items():  # not under the lock: a put holds its record's lock, then the twin's
            self.setpoints[device].set(value, process=False)
        with self._lock:
            seq = entry() if entry else None
            for device, value in values.items():
                delay, given, _ = self._route(device, value)
                self._hand(device, given, seq, delay)
        self._wake.set()

    def select_optics(self, mode: str) -> None:
        """Load an optics mode at start (``--optics``) as a put on ``$(P)OPTICS:MODE`` would."""
        self._show_optics(mode)
        self.set_setpoints(self.optics[mode], lambda: self._put_log.accepted(
            "optics", self._optics_pvs[0], mode, setpoints=self.optics[mode], detail="--optics at start",
            source=OPTICS))

    def switch(self, device: str, on: bool) -> None:
        """Switch a converter on or off; off, its output ramps to zero (and back to the setpoint on)."""
        with self._lock:
            self.bank.switch(device, on)
        self._wake.set()
        self.on_power(device)

    # -- the tick -------------------------------------------------------------------------------

    def start(self, kinds: dict[str, str], slew: dict[str, float]) -> None:
        """The converters start at their setpoints as the records hold them (autosave and the
        journal may have restored them)."""
        initial = {device: record.get() for device, record in self.setpoints.items()}
        for pv, record, states in zip(self._optics_pvs, self.optics_records, self._optics_states, strict=True):
            self._put_log.hold(pv, states[record.get()])  # as autosave restored it
        with self._lock:
            self.bank = ConverterBank(kinds, slew, initial)
            for device, record in self.switches.items():
                self.bank.switch(device, bool(record.get()))

    def advance(self, dt: float, now: float, tripped: set[str]) -> dict[str, float]:
        """The converters' step of a tick: the delayed commands that are due arrive, trips take
        effect, the outputs ramp; return the outputs that moved. Holds the lock."""
        for _, device, value, seq in (entry for entry in self._delayed if entry[0] <= now):
            self._hand(device, value, seq, 0.0)
        self._delayed = [entry for entry in self._delayed if entry[0] > now]
        for device, out in self.bank.outputs.items():
            if out.tripped != (device in tripped):
                self.bank.trip(device, device in tripped)
        return self.bank.advance(dt)

    def carried(self, moved: dict[str, float]) -> list[int]:
        """The puts whose values are at their converters' outputs now (that moved, or were there
        already): the next lattice version carries them. Holds the lock."""
        outputs = self.bank.outputs
        done = [d for d in self._pending if d in moved or outputs[d].output == outputs[d].setpoint]
        return sorted(seq for device in done for seq in self._pending.pop(device))

    def take_refusals(self) -> list[tuple[str, str]]:
        """Holds the lock."""
        refusals, self._refusals = self._refusals, []
        return refusals

    def refuse(self, device: str, reason: str) -> None:
        log.warning("refused %s: %s", device, reason)
        self._alarm(device, alarms.MINOR_ALARM, alarms.WRITE_ALARM)

    def settled(self, applied: dict[str, float]) -> None:
        """A setpoint whose converter now delivers it has no alarm (a good put clears a refusal's)."""
        for device, value in applied.items():
            if self.setpoints[device].get() == value:
                self._alarm(device, alarms.NO_ALARM, alarms.NO_ALARM)

    def _alarm(self, device: str, severity: int, status: int) -> None:
        """Set a setpoint's alarm. That processes the record, in this thread, and is no put
        (``_accept`` knows it by ``_internal``)."""
        self._internal.active = True
        try:
            self.setpoints[device].set_alarm(severity, status)
        finally:
            self._internal.active = False
