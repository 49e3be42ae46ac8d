"""The publisher: beam state and readbacks to records, once per tick, with the alarms they carry.

Readings (``signals.READINGS``) are set from the tick's ``Publication``; one not known yet (the
equilibrium before its first computation) is INVALID (UDF). Without a beam, beam
readings keep their last values marked INVALID (the per-BPM PVs follow through their links) and the
current and lifetime read 0 with a MAJOR alarm. Without a model (the physics worker has gone, a new
one is starting), every reading of the beam or the model is marked INVALID (COMM) until the model
is back. The readbacks are the converters' outputs with their noise, one array per tick.
"""

from __future__ import annotations

import numpy as np
from twinioc.model.realism import Realism, streams
from twinioc.model.state import BeamState
from twinioc.model.tables import MachineTables, PvRow

from . import alarms
from .signals import SIGNALS, Publication

# The PVA table of the orbit: column name -> the signal whose record fills it.
TABLE_COLUMNS = {"BPM": "bpm_names", "X": "orbit_x", "Y": "orbit_y"}
ARRAYS = {"readback": "readbacks", "bpm_x": "orbit_x", "bpm_y": "orbit_y"}  # element signal -> its array


class Publisher:
    """Owns the records that show readings and readbacks, the BPMs' errors and noise, the
    readbacks' noise, and the marking of readings without a beam or a model."""

    def __init__(self, tables: MachineTables, rows: list[PvRow], realism: Realism, build):
        self._build = build  # the record builders (``records``)
        self.random = streams(realism.seed)
        self.bpm_errors = realism.bpm_errors(tables.bpm_names)
        self.bpm_index = {name: i for i, name in enumerate(tables.bpm_names)}
        # the converters in $(P)READBACKS order, and the σ of each one's readback noise
        self.readback_devices = list(dict.fromkeys(r.device for r in rows if r.signal == "readback"))
        converters = tables.converters
        self.readback_noise = np.array([realism.readback_noise_ppm * 1e-6 * (converters[d].high - converters[d].low)
                                        for d in self.readback_devices])
        self._names = {"bpm_names": tables.bpm_names, "readback_names": self.readback_devices,
                       "table_columns": list(TABLE_COLUMNS)}
        self._arrays = {r.signal: r.pv for r in rows if r.signal in ARRAYS.values()}
        self.records: dict[str, list] = {}  # signal -> the records that show it
        self._point: dict[int, str] = {}  # id of a record of a reading by point -> its source point
        self._table: str | None = None
        self._readings: list = []  # (signal, its records) in the order a tick sets them (``finish``)
        self.updates = 0  # publications of a beam state
        self._model = True  # the last publication had a model

    def add(self, row: PvRow) -> object | None:
        """The record of a row whose signal the publisher shows (None for the orbit table, built by
        ``finish``)."""
        role = SIGNALS[row.signal].role
        if role == "table":
            self._table = row.pv
            return None
        if role in ("readback", "bpm_reading"):
            index = self.bpm_index[row.device] if role == "bpm_reading" else self.readback_devices.index(row.device)
            return self._build.element_ai(row, self._arrays[ARRAYS[row.signal]], index)
        if role == "names":
            record = self._build.names(row, self._names[row.signal])
        else:
            record = getattr(self._build, row.record)(row)
        self.records.setdefault(row.signal, []).append(record)
        if SIGNALS[row.signal].by_point:
            self._point[id(record)] = row.device
        return record

    def finish(self) -> None:
        """Put the readings in the order a tick sets them: the beam's, the stored beam's, the model's,
        the twin's own, and the publication counter last, so that a client who sees it move finds the
        whole tick published. Serve the orbit table over PVA, once its columns' records exist."""
        order = {"beam": 0, "stored": 1, "model": 2, "": 3}
        self._readings = sorted(((SIGNALS[name], found) for name, found in self.records.items()
                                 if SIGNALS[name].read is not None),
                                key=lambda item: (order[item[0].needs], item[0].name == "updates"))
        if self._table:
            (labels,) = self.records["table_columns"]
            self._build.table_group(self._table, labels, {column: self.records[signal][0]
                                                      for column, signal in TABLE_COLUMNS.items()})

    def read_bpms(self, state: BeamState) -> tuple[np.ndarray, np.ndarray]:
        """What the BPMs read of *state*'s orbit: their errors and a fresh noise sample (m)."""
        return self.bpm_errors.read(state.x, state.y, self.random["bpm_noise"])

    def publish(self, publication: Publication) -> None:
        """Every reading of one tick."""
        self.updates += 1
        publication.updates = self.updates
        self._model = True
        for signal, records_ in self._readings:
            if not publication.alive and signal.needs == "beam":
                self._mark(records_, alarms.INVALID_ALARM, alarms.READ_ALARM)
            elif not publication.alive and signal.needs == "stored":
                for record in records_:
                    record.set(0.0, severity=alarms.MAJOR_ALARM, alarm=alarms.STATE_ALARM)
            else:
                self._show(signal, records_, signal.read(publication))

    def _show(self, signal, records_: list, value: object) -> None:
        """Set each record to *value* (its point's, for a reading by point); one that is not known
        (None) keeps its value, marked INVALID (UDF)."""
        for record in records_:
            shown = value.get(self._point[id(record)]) if signal.by_point and value is not None else value
            if shown is None:
                record.set_alarm(alarms.INVALID_ALARM, alarms.UDF_ALARM)
            else:
                record.set(shown)

    def without_model(self, publication: Publication) -> None:
        """A tick without a model: its readings INVALID (once), the twin's own ones as they are."""
        for signal, records_ in self._readings:
            if signal.needs:
                if self._model:
                    self._mark(records_, alarms.INVALID_ALARM, alarms.COMM_ALARM)
            elif signal.name != "updates":
                value = signal.read(publication)
                for record in records_:
                    if record.get() != value:
                        record.set(value)
        self._model = False

    @staticmethod
    def _mark(records_: list, severity: int, status: int) -> None:
        """The last values stay, with this alarm."""
        for record in records_:
            record.set_alarm(severity, status)

    def publish_readbacks(self, outputs: dict[str, float], changed: bool) -> None:
        """Readbacks show the converters' outputs, with their noise when they have some (then every
        tick); without noise, only when an output *changed*."""
        noisy = bool(np.any(self.readback_noise > 0))
        if not (noisy or changed):
            return
        values = np.array([outputs[d] for d in self.readback_devices])
        if noisy:
            values += self.readback_noise * self.random["converter_noise"].standard_normal(len(values))
        for record in self.records.get("readbacks", ()):
            record.set(values)
