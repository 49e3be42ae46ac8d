"""What the dashboard shows of the machine now: CA monitors on the layout's PVs, the latest value of each.

``LiveFeed`` subscribes, on the measurement service's event loop, to every PV the live views need
(by role, from the machine's ``db/`` tables), keeps the newest value and its time, counts orbit
updates, and samples current and lifetime once a second for the last hour. A PV that the target
does not serve (the twin-only ones, on the real machine) simply never arrives: its view says so.
Nothing here puts.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from aioca import DBR_CHAR_STR, FORMAT_TIME, camonitor
from twinioc.studies.machine import MachineLayout

HISTORY_S = 3600  # current and lifetime: the last hour, one sample a second
HISTORY_ROLES = ("beam_current", "lifetime_h")
INVALID = 3  # EPICS alarm severity
IDLE_S = 30.0  # the live monitors end this long after a page last looked

# the machine-wide PVs the live views show, by role; text ones are long strings
SCALARS = ("tune_h_khz", "tune_v_khz", "beam_current", "lifetime_h", "measured_lifetime_100s", "chrom_x", "chrom_y",
           "emittance_x_nm", "emittance_y_nm", "energy_spread", "bunch_length_mm", "version",
           "feedback_switch", "feedback_run_mode", "fault_count", "beam_lost")
TEXTS = ("feedback_state", "fault_list", "lost_reason")
WAVEFORMS = ("true_orbit_x", "true_orbit_y")
# with a shadow (``twinioc shadow``) following the machine: its model stands for the model orbit
SHADOW_PVS = {"true_orbit_x": "ORBIT:X", "true_orbit_y": "ORBIT:Y", "shadow_connected": "SOURCE:CONNECTED",
              "shadow_tune_x": "TUNE:X", "shadow_tune_y": "TUNE:Y", "shadow_tune_residual_x": "TUNE:RESIDUAL:X",
              "shadow_tune_residual_y": "TUNE:RESIDUAL:Y", "shadow_residual_x": "ORBIT:RESIDUAL:X:RMS",
              "shadow_residual_y": "ORBIT:RESIDUAL:Y:RMS"}


@dataclass
class Reading:
    """The newest value of one PV, and whether it is connected."""

    value: object = None
    connected: bool = False
    invalid: bool = False  # INVALID severity: the IOC says the value means nothing now (no beam, ...)


@dataclass
class LiveState:
    """One consistent copy of the feed for a view: values by role, the orbit (mm)."""

    values: dict[str, object]
    invalid: set[str]  # the roles whose value the IOC marks INVALID
    orbit_x_mm: np.ndarray
    orbit_y_mm: np.ndarray
    orbit_stamp: float
    orbit_updates: int
    rf_khz: float

    def get(self, role: str, default=None):
        value = self.values.get(role)
        return default if value is None else value

    def fractional_tunes(self, harmonic: int) -> tuple[float, float]:
        """(Qx, Qy) fractional, from the tune monitor's kHz and the RF: what the machine serves."""
        revolution_khz = self.rf_khz / harmonic if self.rf_khz else math.nan
        h, v = (float(self.get(k, math.nan)) for k in ("tune_h_khz", "tune_v_khz"))
        return h / revolution_khz, v / revolution_khz


class LiveFeed:
    """CA monitors of one machine's live PVs (on the service's event loop) and their newest values.

    The current and the lifetime are monitored from the start, for the hour of history. The rest
    (the orbit, some 250 values 25 times a second on BESSY II) is monitored only while a page
    watches (``watch``, at each of its updates) and let go ``IDLE_S`` after the last: a service
    that nobody looks at spends nothing on it, and its plans share their event loop with nothing.
    """

    def __init__(self, layout: MachineLayout, shadow: str | None = None):
        """*shadow*: the prefix of a shadow following the machine, whose model the views show."""
        self.layout, self.shadow = layout, shadow
        self._lock = threading.Lock()
        self._readings: dict[str, Reading] = {}
        self._roles: dict[str, str] = {}  # PV -> role
        orbit = layout.orbit
        self._x, self._y = np.full(len(orbit.bpms), np.nan), np.full(len(orbit.bpms), np.nan)
        self._orbit_stamp, self._orbit_updates = math.nan, 0
        self._history: deque[tuple[float, float, float]] = deque(maxlen=HISTORY_S)
        self._always: list = []  # the history's monitors
        self._watched: list = []  # the live views' monitors, while a page watches
        self._watched_at = -math.inf
        self._subscribing = threading.Lock()
        self._service = None
        self._sampler: threading.Thread | None = None
        self._running = False

    def _wanted(self, roles) -> dict[str, str]:
        found = {role: self.layout.optional(role) for role in roles}
        return {role: pv for role, pv in found.items() if pv is not None}

    # -- subscribing (on the service's loop) ------------------------------------------------------

    def _monitor(self, role: str, pv: str):
        self._roles[pv] = role
        self._readings[role] = Reading()
        kind = {"datatype": DBR_CHAR_STR} if role in TEXTS else {}
        return camonitor(pv, self._on_value, format=FORMAT_TIME, notify_disconnect=True, **kind)

    async def _subscribe_history(self) -> None:
        self._always = [self._monitor(role, pv) for role, pv in self._wanted(HISTORY_ROLES).items()]

    async def _subscribe_live(self) -> None:
        """Monitor every live PV; on the event loop the CA client lives on."""
        orbit = self.layout.orbit
        wanted = self._wanted(r for r in (*SCALARS, *TEXTS, *WAVEFORMS) if r not in HISTORY_ROLES)
        wanted["rf_khz"] = self.layout.rf.readback
        if self.shadow:
            wanted |= {role: self.shadow + suffix for role, suffix in SHADOW_PVS.items()}
        self._watched = [self._monitor(role, pv) for role, pv in wanted.items()]
        if orbit.waveform:
            self._watched.append(camonitor(orbit.waveform, self._on_orbit_waveform, format=FORMAT_TIME))
        else:
            for plane, names in (("x", orbit.x), ("y", orbit.y)):
                for i, pv in enumerate(names):
                    self._watched.append(camonitor(
                        pv, lambda value, plane=plane, i=i: self._on_bpm(plane, i, value), format=FORMAT_TIME))

    async def _unsubscribe(self, subscriptions: list) -> None:
        for subscription in subscriptions:
            subscription.close()

    def watch(self) -> None:
        """A page looks: monitor the live PVs (from now, if they were let go) for ``IDLE_S`` more."""
        self._watched_at = time.monotonic()
        if self._watched or self._service is None:
            return
        with self._subscribing:
            if not self._watched:
                self._service.call(self._subscribe_live())

    def _let_go(self) -> None:
        """Nobody watched for ``IDLE_S``: end the live monitors, forget their values (stale from now)."""
        with self._subscribing:
            watched, self._watched = self._watched, []
            self._service.call(self._unsubscribe(watched))
        with self._lock:
            for role in self._readings:
                if role not in HISTORY_ROLES:
                    self._readings[role] = Reading()
            self._x[:], self._y[:] = np.nan, np.nan

    def _on_value(self, value) -> None:
        role = self._roles[value.name]
        with self._lock:
            if not value.ok:
                self._readings[role] = Reading()
                return
            plain = value.tolist() if hasattr(value, "tolist") else value
            if isinstance(plain, str):
                plain = str(value)
            self._readings[role] = Reading(plain, True, int(value.severity) == INVALID)

    def _on_orbit_waveform(self, value) -> None:
        interleaved = np.asarray(value, float) * self.layout.orbit.waveform_to_mm
        with self._lock:
            n = len(self._x)
            self._x[:] = interleaved[0:2 * n:2]
            self._y[:] = interleaved[1:2 * n:2]
            self._orbit_stamp = float(value.timestamp)
            self._orbit_updates += 1

    def _on_bpm(self, plane: str, index: int, value) -> None:
        with self._lock:
            (self._x if plane == "x" else self._y)[index] = float(value)
            self._orbit_stamp = float(np.fmax(self._orbit_stamp, float(value.timestamp)))  # the newest BPM's
            self._orbit_updates += 1

    # -- sampling ---------------------------------------------------------------------------------

    def start(self, service) -> LiveFeed:
        """Monitor the history's PVs on *service*'s loop, and sample them once a second on a thread
        of its own (which also lets the live monitors go when nobody watches)."""
        self._service = service
        service.call(self._subscribe_history())
        self._running = True
        self._sampler = threading.Thread(target=self._sample, name="dashboard-history", daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while self._running:
            with self._lock:
                current = self._readings.get("beam_current", Reading()).value
                lifetime = self._readings.get("lifetime_h", Reading()).value
                if current is not None:
                    self._history.append((time.time(), float(current),
                                          float(lifetime) if lifetime is not None else math.nan))
            if self._watched and time.monotonic() - self._watched_at > IDLE_S:
                try:
                    self._let_go()
                except Exception:  # noqa: BLE001 - the service is stopping; the next look subscribes again
                    pass
            time.sleep(1.0)

    def stop(self) -> None:
        """End the sampling and every monitor."""
        self._running = False
        with self._subscribing:
            subscriptions, self._always, self._watched = [*self._always, *self._watched], [], []
        self._service.call(self._unsubscribe(subscriptions))

    # -- reading ----------------------------------------------------------------------------------

    def state(self) -> LiveState:
        with self._lock:
            values = {role: r.value for role, r in self._readings.items() if r.connected}
            invalid = {role for role, r in self._readings.items() if r.connected and r.invalid}
            return LiveState(values, invalid, self._x.copy(), self._y.copy(), self._orbit_stamp, self._orbit_updates,
                             float(values.get("rf_khz") or math.nan))

    def history(self) -> list[tuple[float, float, float]]:
        """The last hour of (time, current mA, lifetime h), a sample a second."""
        with self._lock:
            return list(self._history)

    def missing(self) -> list[str]:
        """The roles whose PV has not answered: what the target does not serve."""
        with self._lock:
            return sorted(role for role, r in self._readings.items() if not r.connected)
