"""One short builder per record kind of the PV tables; defaults stated once.

Each function takes a table row (a ``PvRow``, its ``$(P)`` already substituted) and returns the
pythonSoftIOC record. Setpoints (``ao``) get the put callbacks; everything else is an input that
the twin publishes to.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from softioc import builder
from twinioc.model.tables import PvRow


def _number(text: str, default: float | None = None) -> float | None:
    return float(text) if text not in ("", None) else default


def _display(row: PvRow) -> dict:
    fields = {}
    if row.unit:
        fields["EGU"] = row.unit
    if row.prec != "":
        fields["PREC"] = int(row.prec)
    if row.description:
        fields["DESC"] = row.description[:40]
    return fields


def ao(row: PvRow, accept: Callable[[object, float], bool]):
    """A setpoint. *accept* (record, value) -> bool sees every put, while the record processes it,
    before any client can read the new value; False refuses the put and keeps the old value.

    Puts beyond the limits are clamped to DRVL/DRVH by the record and raise a MINOR alarm
    (HIHI/LOLO sit at the limits).
    """
    low, high = _number(row.low), _number(row.high)
    return builder.aOut(
        row.pv, DRVL=low, DRVH=high, LOPR=low, HOPR=high, HIHI=high, LOLO=low,
        HHSV="MINOR", LLSV="MINOR", initial_value=_number(row.initial, 0.0),
        validate=accept, always_update=True, autosave=True, **_display(row))


def ai(row: PvRow):
    return builder.aIn(row.pv, initial_value=0.0, **_display(row))


def longin(row: PvRow):
    return builder.longIn(row.pv, initial_value=0, **_display(row))


def element_ai(row: PvRow, source: str, index: int):
    """An ai showing element *index* of the waveform record *source*, with its alarm and time stamp.

    Plain EPICS: the CP link processes it in the IOC's C code whenever *source* is published, so
    that hundreds of these cost the twin one array per tick. It posts every update (MDEL -1).
    """
    return builder.records.ai(row.pv, INP=f"{source}.[{index}] CP MS", TSEL=f"{source}.TIME", MDEL=-1,
                              **_display(row))


def mbbi(row: PvRow):
    low, high = row.description.split("/")
    return builder.mbbIn(row.pv, low, (high, "MAJOR") if high == "FAULT" else high, initial_value=0)


def bi(row: PvRow):
    return builder.boolIn(row.pv, "OK", "LOST", OSV="MAJOR", initial_value=0)


def stringin(row: PvRow):
    return builder.stringIn(row.pv, initial_value="", **_display(row))


def longstring(row: PvRow):
    return builder.longStringIn(row.pv, initial_value="", length=int(row.nelm or 256))


def command(row: PvRow, check: Callable[[object, str], bool], on_command: Callable[[str], None]):
    """A command the twin takes as a string: *check* (record, text) refuses a bad one at once (False),
    *on_command* carries out a good one, and a put with completion (``caput -c``) ends when it has."""
    return builder.longStringOut(row.pv, initial_value="", length=int(row.nelm or 256), validate=check,
                                 on_update=on_command, always_update=True, blocking=True)


def waveform(row: PvRow):
    return builder.WaveformIn(row.pv, np.zeros(int(row.nelm)), **_display(row))


def long_waveform(row: PvRow):
    """A waveform of NELM whole numbers (DBF_LONG), as a machine's raw buffers are."""
    return builder.WaveformIn(row.pv, np.zeros(int(row.nelm), dtype=np.int32), **_display(row))


def linked_ai(row: PvRow, source: str):
    """An ai showing the record *source*, with its alarm and time stamp, through a CP link (in C)."""
    return builder.records.ai(row.pv, INP=f"{source} CP MS", TSEL=f"{source}.TIME", **_display(row))


def setting_ao(row: PvRow, accept: Callable[[object, float], bool]):
    """A number the twin keeps, autosaved, within LOW..HIGH where the row gives them; *accept*
    (record, value) sees every put and may refuse it (False: the old value stays)."""
    low, high = _number(row.low), _number(row.high)
    return builder.aOut(row.pv, DRVL=low, DRVH=high, LOPR=low, HOPR=high, initial_value=_number(row.initial, 0.0),
                        validate=accept, always_update=True, autosave=True, **_display(row))


def setting_bo(row: PvRow, accept: Callable[[object, int], bool]):
    """A two-state setting the twin keeps, autosaved: its state names are the description ("OFF/ON"),
    it starts in the state the row's initial names; *accept* may refuse a put."""
    states = row.description.split("/")
    return builder.boolOut(row.pv, *states, initial_value=states.index(row.initial) if row.initial else 0,
                           validate=accept, always_update=True, autosave=True)


def names(row: PvRow, values: list[str]):
    return builder.WaveformIn(row.pv, initial_value=values, **_display(row))


def table_group(name: str, labels, columns: dict[str, object]) -> None:
    """Serve the records in *columns* together as one PVA NTTable (a QSRV group) named *name*.

    *labels* is a string-array record holding the column names. The group is published as a
    whole when the last column's record is updated.
    """
    labels.add_info("Q:group", {name: {"+id": "epics:nt/NTTable:1.0",
                                       "labels": {"+channel": "VAL", "+type": "plain"}}})
    last = list(columns)[-1]
    for column, record in columns.items():
        field = {"+channel": "VAL", "+type": "plain"}
        if column == last:
            field["+trigger"] = "*"
        record.add_info("Q:group", {name: {f"value.{column}": field}})


def mbbo(row: PvRow, states: list[str], on_select: Callable[[str], None]):
    """A choice among *states* (at most 16); a put calls *on_select* with the chosen state's name."""
    initial = states.index(row.initial) if row.initial in states else 0
    return builder.mbbOut(row.pv, *states, initial_value=initial, autosave=True, always_update=True,
                          on_update=lambda index: on_select(states[int(index)]))


def control_ao(row: PvRow, on_update: Callable[[float], None], accept: Callable[[object, float], bool]):
    """A run-time setting of the twin (noise, lifetime, band): a number within LOW..HIGH; *accept*
    may refuse a put (False: the old value stays) before *on_update* takes it."""
    low, high = _number(row.low), _number(row.high)
    return builder.aOut(row.pv, DRVL=low, DRVH=high, LOPR=low, HOPR=high, initial_value=0.0, validate=accept,
                        on_update=on_update, always_update=True, **_display(row))


def control_bo(row: PvRow, on_update: Callable[[int], None], autosave: bool = False, blocking: bool = False):
    """A run-time switch of the twin; its two state names are the description "OFF/ON"; *autosave*:
    it keeps its state over a restart; *blocking*: a put with a callback completes only once
    *on_update* has run (a client that waits for it knows the switch has taken effect)."""
    low, high = row.description.split("/")
    return builder.boolOut(row.pv, low, high, initial_value=1, on_update=on_update, always_update=True,
                           autosave=autosave, blocking=blocking)


def longout(row: PvRow, on_update: Callable[[int], None]):
    """A whole-number setting (DBF_LONG), clamped to LOW..HIGH by the record, autosaved."""
    low, high = int(_number(row.low)), int(_number(row.high))
    return builder.longOut(row.pv, DRVL=low, DRVH=high, LOPR=low, HOPR=high, initial_value=int(_number(row.initial, 0)),
                           on_update=on_update, always_update=True, autosave=True, **_display(row))


def waveform_out(row: PvRow, on_update: Callable[[np.ndarray], None], accept: Callable[[object, np.ndarray], bool]):
    """A writable array of NELM numbers, autosaved; *accept* may refuse a put (a wrong length, NaN)."""
    return builder.WaveformOut(row.pv, np.zeros(int(row.nelm)), validate=accept, on_update=on_update,
                               always_update=True, autosave=True, **_display(row))
