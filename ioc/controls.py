"""The run-time controls: the twin's own settings a client changes while it runs (``signals.CONTROLS``).

``$(P)BPM:NOISE``, ``$(P)BEAM:LIFETIME``, ``$(P)BEAM:INJECT``, ``$(P)TOPUP:ENABLE`` / ``:LOW`` /
``:HIGH`` and ``$(P)RAMP:ENABLE``: a put changes the setting at once (under the twin's lock) and is
journaled; the records start at the startup file's values.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from twinioc.model.lifetime import BeamLifetime
from twinioc.model.realism import BpmErrors, ConverterBank, Realism, StoredBeam
from twinioc.model.tables import PvRow

from .put_log import PutLog
from .signals import CONTROLS

NOT_SAVED = ("inject",)  # a control that starts something rather than setting it


class RunTime:
    """What the run-time controls act on: the stored beam and its lifetime, the BPMs' noise, the
    converters' ramps."""

    def __init__(self, beam: StoredBeam, bpm_errors: BpmErrors, realism: Realism, lifetime: BeamLifetime):
        self.beam, self.bpm_errors, self.realism, self.lifetime = beam, bpm_errors, realism, lifetime
        self.bank: ConverterBank | None = None  # from the first batch on

    @property
    def ramp(self) -> bool:
        return self.realism.ramp

    def set_ramp(self, on: bool) -> None:
        self.realism.ramp = on
        if self.bank is not None:
            self.bank.set_slew(self.realism.slew_rates)


class ControlPanel:
    """The control records, each starting at its setting; a put acts on the ``RunTime`` through
    ``signals.CONTROLS`` and is journaled."""

    def __init__(self, run: RunTime, lock: threading.Lock, wake: threading.Event, put_log: PutLog, build):
        self.run, self._lock, self._wake, self._put_log, self._build = run, lock, wake, put_log, build
        self.records: dict[str, object] = {}  # signal -> record
        self._pvs: dict[str, str] = {}  # signal -> its PV name

    def add(self, row: PvRow) -> object:
        on_put = self._on_put(row.signal, row.pv)
        if row.record == "ao":
            record = self._build.control_ao(row, on_put, self._finite(row.pv))
        else:
            record = self._build.control_bo(row, on_put)
        self.records[row.signal], self._pvs[row.signal] = record, row.pv
        return record

    def _finite(self, pv: str) -> Callable[[object, float], bool]:
        """Refuse a setting that is not a finite number (journaled; the old value stays)."""
        def accept(record, value: float) -> bool:
            if math.isfinite(value):
                return True
            self._put_log.refused("control", pv, value, f"{value} is not a finite number", old=record.get())
            return False

        return accept

    def _on_put(self, signal: str, pv: str) -> Callable[[float], None]:
        def on_put(value: float) -> None:
            with self._lock:
                CONTROLS[signal].put(self.run, value)
            self._wake.set()
            self._put_log.accepted("control", pv, value)

        return on_put

    def show(self) -> None:
        """Every record at the setting it controls (at start, and after a snapshot)."""
        for signal, record in self.records.items():
            value = CONTROLS[signal].show(self.run)
            record.set(value, process=False)
            self._put_log.hold(self._pvs[signal], value)

    def settings(self) -> dict[str, float]:
        """What a snapshot keeps: signal -> value."""
        return {signal: record.get() for signal, record in self.records.items() if signal not in NOT_SAVED}

    def restore(self, values: dict[str, float]) -> None:
        """Settings of a snapshot, as if each had been put (but not journaled one by one)."""
        known = {signal: value for signal, value in values.items() if signal in self.records}
        for signal, value in known.items():
            self.records[signal].set(value, process=False)
            self._put_log.hold(self._pvs[signal], value)
        with self._lock:
            for signal, value in known.items():
                CONTROLS[signal].put(self.run, value)
