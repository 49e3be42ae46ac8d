"""The inert desk: settings the control room puts that drive nothing in the twin's model, and their readbacks.

A machine has names that its tools write but whose effect the twin does not model: on the MLS, the
S2P2 family setpoint left from before the split into S2P2K/S2P2L, the bunch-by-bunch feedback's
switches, the RF phase modulation, the tune measurement's white-noise excitation. The twin keeps
each as a setting (rows of signal ``inert_setting``): the value a client put, autosaved, every put
journaled, a put that is not a finite number (a switch: not one of its two states) refused with the
old value kept. A readback of one (signal ``inert_readback``, the same device) follows it through a
CP link in the IOC's C code, so that it shows the restored value after a restart too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from twinioc.model.tables import PvRow, TableError

from .put_log import PutLog

COMMAND = "control"  # the journal's command of a put on an inert setting: a setting of the twin's own


class InertDesk:
    """Owns the inert settings' records (device -> record) and their readbacks; a put is checked and
    journaled while the record processes it, and changes nothing else in the twin."""

    def __init__(self, rows: list[PvRow], put_log: PutLog, build):
        """*rows*: the PV table, whose inert settings the readbacks are linked to by device."""
        self._put_log, self._build = put_log, build
        self.settings: dict[str, object] = {}  # device -> its setting's record
        self._pvs: dict[str, str] = {}  # device -> its setting's PV
        for row in rows:
            if row.signal == "inert_setting":
                if row.device in self._pvs:
                    raise TableError(f"{row.where}: a second inert setting of device {row.device!r}")
                self._pvs[row.device] = row.pv
        for row in rows:
            if row.signal == "inert_readback" and row.device not in self._pvs:
                raise TableError(f"{row.where}: no inert setting of device {row.device!r} to read back")

    def add_setting(self, row: PvRow) -> object:
        accept = self._accept(row)
        if row.record == "ao":
            record = self._build.setting_ao(row, accept)
        else:
            record = self._build.setting_bo(row, accept)
        self.settings[row.device] = record
        return record

    def add_readback(self, row: PvRow) -> object:
        return self._build.linked_ai(row, self._pvs[row.device])

    def _accept(self, row: PvRow) -> Callable[[object, float], bool]:
        """A put on *row*'s setting: journaled, and refused (the old value stays) if it is not a
        finite number, or for a switch not 0 or 1. The record has clamped it to its limits before."""
        limits = {float(bound): f"at the {side} limit" for bound, side in ((row.low, "lower"), (row.high, "upper"))
                  if bound != ""}

        def accept(record, value: float) -> bool:
            old = record.get()
            reason = _refusal(row.record, value)
            if reason:
                self._put_log.refused(COMMAND, row.pv, value, reason, device=row.device, old=old)
                return False
            self._put_log.accepted(COMMAND, row.pv, value, device=row.device, old=old, detail=limits.get(value, ""))
            return True

        return accept


def _refusal(record: str, value: object) -> str:
    """Why *value* cannot be put on a setting of kind *record* ("" if it can)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"{value!r} is not a number"
    if not math.isfinite(number):
        return f"{value} is not a finite number"
    if record == "bo" and number not in (0, 1):
        return f"{value} is not a state of this switch (0 or 1)"
    return ""
