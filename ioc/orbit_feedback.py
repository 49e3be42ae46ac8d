"""The ring's slow orbit feedback, as the machines run one in user operation.

Its PVs (``signals``, role ``orbit_feedback``): the switch (the MLS's run mode ``ORBITCCP:selRunMode``,
0 off, any other value on; on BESSY II, whose real names are not public, ``$(P)ORBIT:FEEDBACK``), the
status ``RMC00VP`` (the run mode in effect: 0 while it is not correcting), ``$(P)ORBIT:FEEDBACK:STATUS``
(what it is doing) and the reference orbit ``$(P)ORBIT:REFERENCE:X/Y`` (mm, one value per BPM).

While it is on, every period the average of the BPM readings over the period goes to an
``OrbitCorrector`` built from the model's orbit response at the optics of the moment (the physics
worker computes it when the optics have changed), and the steerers' new setpoints go through the
setpoint desk as one journal entry of source ``orbit feedback``: the same path a client's put takes
(faults, ramps, autosave). ``FeedbackLogic`` is the arithmetic, testable without records.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
from twinioc.model.correction import CorrectionSettings, OrbitCorrector
from twinioc.model.tables import PvRow

from .put_log import FEEDBACK, PutLog
from .setpoints import SetpointDesk
from .signals import Publication

log = logging.getLogger("twinioc")
SETTLED_A = 1e-7  # a steerer whose new setpoint differs less than this is not put


class FeedbackLogic:
    """The feedback's state: on or off (the run mode), the reference orbit, the readings averaged
    since the last correction, and the corrector of the last orbit response."""

    def __init__(self, n_bpm: int, period_s: float, settings: CorrectionSettings, mode: int = 0):
        self.mode, self.period_s, self.settings = mode, period_s, settings
        self.reference = np.zeros(2 * n_bpm)  # m, x then y
        self.corrector: OrbitCorrector | None = None
        self._sum, self._count = np.zeros(2 * n_bpm), np.zeros(2 * n_bpm)
        self._last = -math.inf
        self.status = "off"
        self.error_rms = math.nan  # m, of the last averaged readings from the reference

    def observe(self, x: np.ndarray, y: np.ndarray) -> None:
        """One tick's readings (m); a BPM that reads NaN counts for nothing."""
        reading = np.concatenate([x, y])
        good = np.isfinite(reading)
        self._sum[good] += reading[good]
        self._count[good] += 1

    def forget(self, why: str) -> None:
        """Start the average afresh (no beam, the optics changed); say why the feedback waits."""
        self._sum[:], self._count[:] = 0.0, 0.0
        self.status = f"on: {why}" if self.mode else "off"

    def due(self, now: float) -> bool:
        """Whether the feedback is on and a period has passed."""
        return bool(self.mode) and now - self._last >= self.period_s

    def correct(self, now: float, setpoints: np.ndarray) -> np.ndarray | None:
        """The steerers' new setpoints when a period has passed and there is something to correct
        with; None otherwise."""
        if not self.due(now):
            return None
        if self.corrector is None:
            self.status = "on: waiting for the model's orbit response"
            return None
        if not self._count.any():
            self.status = "on: no BPM reads"
            return None
        self._last = now
        with np.errstate(invalid="ignore", divide="ignore"):
            error = np.where(self._count > 0, self._sum / self._count, np.nan) - self.reference
        self._sum[:], self._count[:] = 0.0, 0.0
        new = self.corrector.step(setpoints, error)
        self.error_rms = float(np.sqrt(np.nanmean(error**2)))
        step = float(np.max(np.abs(new - setpoints), initial=0.0))
        self.status = (f"on: correcting, readings {self.error_rms * 1e3:.4f} mm rms from the reference, "
                       f"{int(np.isfinite(error).sum())} readings, largest step {step:.2g} A")
        return new

    @property
    def correcting(self) -> bool:
        return bool(self.mode) and self.status.startswith("on: correcting")


class OrbitFeedback:
    """Owns the feedback's records and its logic; each tick it takes the readings, and each period
    it puts the steerers' correction through the setpoint desk."""

    def __init__(self, desk: SetpointDesk, put_log: PutLog, n_bpm: int, max_step: dict[str, float],
                 period_s: float, settings: CorrectionSettings, enabled: bool, build):
        self.logic = FeedbackLogic(n_bpm, period_s, settings, mode=int(enabled))
        self._desk, self._put_log, self._build, self._max_step = desk, put_log, build, max_step
        self._lock = threading.Lock()  # the logic, between the tick and a put on the feedback's records
        self._switch_pv = ""
        self._records: dict[str, list] = {}  # signal -> its records
        self._steerers: list[str] = []
        self._stale = True  # the optics changed since the last response (or there is none)
        self._asked = -math.inf  # monotonic time a response was last asked for

    # -- records --------------------------------------------------------------------------------

    def add(self, row: PvRow) -> object:
        make = {"feedback_run_mode": self._add_switch, "feedback_switch": self._add_switch,
                "orbit_reference_x": self._add_reference, "orbit_reference_y": self._add_reference}
        if row.signal in make:
            record = make[row.signal](row)
        else:  # what it shows: the status value, the status text
            record = getattr(self._build, row.record)(row)
        self._records.setdefault(row.signal, []).append(record)
        return record

    def _add_switch(self, row: PvRow) -> object:
        def on_put(value) -> None:
            with self._lock:
                self.logic.mode = int(value)
                self.logic.forget("starting")
            self._put_log.accepted("control", row.pv, int(value))
            log.info("orbit feedback %s (%s = %d)", "on" if value else "off", row.pv, int(value))

        if row.record == "bo":
            record = self._build.control_bo(row, on_put, autosave=True)
        else:
            record = self._build.longout(row, on_put)
        record.set(self.logic.mode, process=False)  # the startup file's; autosave may restore another
        self._switch_pv = row.pv
        return record

    def _add_reference(self, row: PvRow) -> object:
        plane = 0 if row.signal == "orbit_reference_x" else 1
        n = len(self.logic.reference) // 2

        def accept(record, value) -> bool:
            values = np.asarray(value, dtype=float)
            reason = (f"{values.size} values for {n} BPMs" if values.size != n
                      else "not every value is a finite number" if not np.all(np.isfinite(values)) else "")
            if reason:
                self._put_log.refused("control", row.pv, values.tolist(), reason)
            return not reason

        def on_put(value) -> None:
            with self._lock:
                self.logic.reference[plane * n:(plane + 1) * n] = np.asarray(value, dtype=float) * 1e-3
            self._put_log.accepted("control", row.pv, np.asarray(value, dtype=float).tolist())

        return self._build.waveform_out(row, on_put, accept)

    def start(self, steerers: list[str]) -> None:
        """The records as autosave restored them: the run mode, the reference orbit."""
        self._steerers = steerers
        for signal, records in self._records.items():
            if signal in ("feedback_run_mode", "feedback_switch"):
                self.logic.mode = int(records[0].get())
            elif signal.startswith("orbit_reference_"):
                plane, n = signal.endswith("_y"), len(self.logic.reference) // 2
                self.logic.reference[plane * n:(plane + 1) * n] = np.asarray(records[0].get(), dtype=float) * 1e-3
        self.logic.forget("starting")
        self.show()

    # -- the tick -------------------------------------------------------------------------------

    def asks_response(self) -> bool:
        """Whether the next step should bring the orbit response: the feedback is on and the optics
        changed since the last one, asked at most once a period (while quadrupoles ramp, the last
        response stands in: a period's change of the optics hardly moves it)."""
        now = time.monotonic()
        if not (self.logic.mode and self._stale and now - self._asked >= self.logic.period_s):
            return False
        self._asked = now
        return True

    def take_response(self, response: np.ndarray) -> None:
        """The model's orbit response (m/A, the steerers' order) at the optics of the moment."""
        desk = self._desk
        low = np.array([desk.limits[s][0] for s in self._steerers])
        high = np.array([desk.limits[s][1] for s in self._steerers])
        steps = np.array([self._max_step.get(s, math.inf) for s in self._steerers])
        with self._lock:
            self.logic.corrector = OrbitCorrector(self._steerers, response, low, high, steps, self.logic.settings)
        self._stale = False

    def optics_changed(self) -> None:
        """The response no longer holds exactly: a step within a period brings a new one."""
        self._stale = True

    def tick(self, publication: Publication, now: float) -> None:
        """Take this tick's readings; at the end of a period, put the correction."""
        reading = publication.reading
        with self._lock:
            if not publication.alive or reading is None or not publication.state.stable:
                self.logic.forget("no beam")
            else:
                self.logic.observe(reading.x, reading.y)
            new = None
            if self.logic.due(now):
                setpoints = np.array([self._desk.setpoints[s].get() for s in self._steerers])
                new = self.logic.correct(now, setpoints)
        if new is not None:
            self._put(dict(zip(self._steerers, new.tolist(), strict=True)), setpoints)
        self.show()

    def _put(self, values: dict[str, float], before: np.ndarray) -> None:
        changed = {s: v for (s, v), old in zip(values.items(), before, strict=True) if abs(v - old) >= SETTLED_A}
        if changed:
            self._desk.set_setpoints(changed, lambda: self._put_log.accepted(
                "correct", self._switch_pv, len(changed), detail=self.logic.status.removeprefix("on: "),
                setpoints=changed, source=FEEDBACK))

    def show(self) -> None:
        status = self.logic.mode if self.logic.correcting else 0
        for record in self._records.get("feedback_status", []):
            if record.get() != status:
                record.set(status)
        for record in self._records.get("feedback_state", []):
            if record.get() != self.logic.status:
                record.set(self.logic.status)
