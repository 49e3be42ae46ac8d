"""Stand-in records for testing the IOC's parts without an IOC.

``StandIns`` has the builders of ``twinioc.ioc.records`` (one per record kind, the same arguments);
each returns a ``StandInRecord``, which keeps a value and an alarm as a softioc record does and takes
a client's ``put`` the way the record would: limits clamp, ``validate`` may refuse, ``on_update``
runs.
"""

from __future__ import annotations

import math

NO_ALARM = 0


class StandInRecord:
    def __init__(self, row, value: object = 0.0, validate=None, on_update=None, states: list[str] | None = None):
        self.row, self.value, self.validate, self.on_update, self.states = row, value, validate, on_update, states
        self.severity = self.status = NO_ALARM
        self.processed = 0  # how often the record was set with processing

    @property
    def name(self) -> str:
        return self.row.pv

    def get(self) -> object:
        return self.value

    def set(self, value: object, process: bool = True, severity: int = NO_ALARM, alarm: int = NO_ALARM) -> None:
        self.value, self.severity, self.status = value, severity, alarm
        self.processed += process

    def set_alarm(self, severity: int, alarm: int) -> None:
        """As softioc does it: the record processes again with the value it holds (a put to itself)."""
        if self.validate is not None:
            self.validate(self, self.value)
        self.severity, self.status = severity, alarm

    def put(self, value: object) -> bool:
        """A client's put: clamped to the row's limits, then offered to validate, then taken."""
        if isinstance(value, float) and self.row.low != "" and not math.isnan(value):
            value = min(max(value, float(self.row.low)), float(self.row.high))
        if self.validate is not None and not self.validate(self, value):
            return False
        self.value = value
        if self.on_update is not None:
            self.on_update(self.states[value] if self.states else value)
        return True


class StandIns:
    """The record builders of ``twinioc.ioc.records``, making stand-ins; ``made`` maps PV -> record."""

    def __init__(self):
        self.made: dict[str, StandInRecord] = {}
        self.groups: dict[str, dict] = {}

    def _keep(self, record: StandInRecord) -> StandInRecord:
        self.made[record.row.pv] = record
        return record

    def ao(self, row, accept):
        return self._keep(StandInRecord(row, float(row.initial or 0.0), validate=accept))

    def control_ao(self, row, on_update, accept):
        return self._keep(StandInRecord(row, 0.0, validate=accept, on_update=on_update))

    def control_bo(self, row, on_update, autosave=False, blocking=False):
        return self._keep(StandInRecord(row, 1, on_update=on_update))

    def longout(self, row, on_update):
        return self._keep(StandInRecord(row, int(float(row.initial or 0)), on_update=on_update))

    def waveform_out(self, row, on_update, accept):
        return self._keep(StandInRecord(row, [0.0] * int(row.nelm), validate=accept, on_update=on_update))

    def command(self, row, check, on_command):
        return self._keep(StandInRecord(row, "", validate=check, on_update=on_command))

    def mbbo(self, row, states, on_select):
        record = StandInRecord(row, states.index(row.initial) if row.initial in states else 0, on_update=on_select)
        record.states = states
        return self._keep(record)

    def names(self, row, values):
        return self._keep(StandInRecord(row, list(values)))

    def element_ai(self, row, source, index):
        return self._keep(StandInRecord(row, (source, index)))

    def linked_ai(self, row, source):
        return self._keep(StandInRecord(row, source))

    def setting_ao(self, row, accept):
        return self._keep(StandInRecord(row, float(row.initial or 0.0), validate=accept))

    def setting_bo(self, row, accept):
        states = row.description.split("/")
        return self._keep(StandInRecord(row, states.index(row.initial) if row.initial else 0, validate=accept))

    def table_group(self, name, labels, columns):
        self.groups[name] = columns

    def __getattr__(self, kind: str):
        """ai, longin, stringin, longstring, bi, mbbi, waveform, long_waveform: inputs the twin sets."""
        if kind.startswith("_"):
            raise AttributeError(kind)
        return lambda row: self._keep(StandInRecord(row, "" if "string" in kind else 0))
