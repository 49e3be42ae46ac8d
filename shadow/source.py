"""The only code that talks to the followed machine: CA monitors and reads, and nothing that can put.

``SourceWatch`` subscribes (aioca ``camonitor``, on an asyncio loop) to every converter's setpoint
and readback of the machine's ``db/`` tables, its BPM readings, its tunes and its RF, and keeps the
newest value of each with the server's time stamp. This module imports no put function, and tests
check that it never will (``tests/test_shadow.py``): a shadow cannot write to the machine it follows.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from aioca import FORMAT_TIME, camonitor
from twinioc.studies.machine import MachineLayout


@dataclass
class SourceValue:
    value: float = math.nan
    stamp: float = math.nan  # the server's time stamp, s since the epoch
    connected: bool = False


class SourceWatch:
    """Monitors of one machine's converters, orbit and tunes; the newest values, changed ones flagged.

    ``changed`` is set whenever something arrives; ``converter_values`` hands the model the values
    that changed since it last asked (a readback where the machine serves one, else the setpoint).
    """

    def __init__(self, layout: MachineLayout):
        self.layout = layout
        self.changed = threading.Event()
        self._lock = threading.Lock()
        self._values: dict[str, SourceValue] = {}  # PV -> newest
        self._fresh_converters: set[str] = set()
        self._converter_of: dict[str, str] = {}  # PV -> converter
        for c in layout.converters.values():
            self._converter_of[c.setpoint] = self._converter_of[c.readback] = c.name
        orbit = layout.orbit
        self._x, self._y = np.full(len(orbit.bpms), np.nan), np.full(len(orbit.bpms), np.nan)
        self.orbit_stamp, self.orbit_updates = math.nan, 0
        self._tune_pvs = (layout.optional("tune_h_khz"), layout.optional("tune_v_khz"))
        converter_pvs = [pv for c in layout.converters.values() for pv in dict.fromkeys((c.setpoint, c.readback))]
        self._scalars = converter_pvs + [pv for pv in self._tune_pvs if pv]
        self._subscriptions: list = []

    # -- subscribing, on the loop --------------------------------------------------------------

    def pvs(self) -> list[str]:
        """Every scalar PV watched: the converters' setpoints and readbacks, the tunes."""
        return list(self._scalars)

    async def subscribe(self) -> None:
        self._subscriptions = [camonitor(pv, self._on_value, format=FORMAT_TIME, notify_disconnect=True)
                               for pv in self.pvs()]
        orbit = self.layout.orbit
        if orbit.waveform:
            self._subscriptions.append(camonitor(orbit.waveform, self._on_waveform, format=FORMAT_TIME,
                                                 notify_disconnect=True))
        else:
            for plane, names in (("x", orbit.x), ("y", orbit.y)):
                for i, pv in enumerate(names):
                    self._subscriptions.append(camonitor(
                        pv, lambda value, plane=plane, i=i: self._on_bpm(plane, i, value), format=FORMAT_TIME,
                        notify_disconnect=True))

    async def unsubscribe(self) -> None:
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions = []

    # -- what arrives ------------------------------------------------------------------------------

    def _on_value(self, value) -> None:
        with self._lock:
            if not value.ok:
                old = self._values.get(value.name, SourceValue())
                self._values[value.name] = SourceValue(old.value, old.stamp, False)
            else:
                self._values[value.name] = SourceValue(float(value), float(value.timestamp), True)
                if value.name in self._converter_of:
                    self._fresh_converters.add(self._converter_of[value.name])
        self.changed.set()

    def _on_waveform(self, value) -> None:
        with self._lock:
            if not value.ok:
                self._x[:], self._y[:] = np.nan, np.nan
            else:
                interleaved = np.asarray(value, float) * self.layout.orbit.waveform_to_mm
                n = len(self._x)
                self._x[:], self._y[:] = interleaved[0:2 * n:2], interleaved[1:2 * n:2]
                self.orbit_stamp, self.orbit_updates = float(value.timestamp), self.orbit_updates + 1
        self.changed.set()

    def _on_bpm(self, plane: str, index: int, value) -> None:
        with self._lock:
            (self._x if plane == "x" else self._y)[index] = float(value) if value.ok else math.nan
            if value.ok:
                self.orbit_stamp = float(np.fmax(self.orbit_stamp, float(value.timestamp)))
                self.orbit_updates += 1
        self.changed.set()

    # -- what the shadow asks -----------------------------------------------------------------------

    def converter_values(self) -> dict[str, float]:
        """The converters whose value changed since the last call, and their values (machine units)."""
        with self._lock:
            fresh, self._fresh_converters = self._fresh_converters, set()
            found = {}
            for name in fresh:
                c = self.layout.converters[name]
                readback, setpoint = self._values.get(c.readback), self._values.get(c.setpoint)
                chosen = readback if readback and readback.connected else setpoint
                if chosen and chosen.connected:
                    found[name] = chosen.value
            return found

    def orbit_mm(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._x.copy(), self._y.copy()

    def tunes_khz(self) -> tuple[float, float]:
        with self._lock:
            return tuple(self._values.get(pv, SourceValue()).value if pv else math.nan
                         for pv in self._tune_pvs)

    def unanswered(self) -> list[str]:
        """The setpoints the machine does not answer (not connected now)."""
        with self._lock:
            return [c.setpoint for c in self.layout.converters.values()
                    if not self._values.get(c.setpoint, SourceValue()).connected]

    def connected_share(self) -> float:
        with self._lock:
            values = [self._values.get(pv, SourceValue()).connected for pv in self._scalars]
        return sum(values) / max(len(values), 1)

    def newest_stamp(self) -> float:
        """The server time stamp of the newest value of any kind."""
        with self._lock:
            stamps = [v.stamp for v in self._values.values() if v.connected] + [self.orbit_stamp]
        return float(np.nanmax(stamps)) if np.any(np.isfinite(stamps)) else math.nan


async def read_converters(layout: MachineLayout, timeout: float = 5.0) -> dict[str, float]:
    """One read of every converter's setpoint: the machine as it is set now (unanswered ones left out)."""
    from aioca import caget

    converters = list(layout.converters.values())
    values = await caget([c.setpoint for c in converters], timeout=timeout, throw=False)
    return {c.name: float(v) for c, v in zip(converters, values, strict=True) if getattr(v, "ok", False)}
