"""ophyd-async devices of a storage ring, built from its ``db/`` tables (``MachineLayout``), in its own units.

- ``PowerConverter``: setpoint and readback (A, kHz, kV); ``set`` puts and waits for the readback.
- ``Orbit``: the BPM readings in mm; ``trigger`` averages fresh readings.
- ``Tunes``: the tune monitor in kHz and as fractional tunes; ``trigger`` averages fresh readings.
- ``BeamCurrent``, ``OrbitFeedbackSwitch``, ``TwinInfo`` (seed and lattice version, a twin only).

A device wires its signals; what it does lives in a small collaborator: ``ConverterMove`` (put, then
wait for the readback), ``FreshSampler`` (wait for new readings, average them).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from bluesky.protocols import Movable, Triggerable
from ophyd_async.core import (
    Array1D,
    AsyncStatus,
    Device,
    SignalR,
    StandardReadable,
    StandardReadableFormat,
    soft_signal_r_and_setter,
    wait_for_value,
)
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

from .machine import Converter, MachineLayout

INVALID = 3  # EPICS alarm severity: the value means nothing (no beam)
Floats = Array1D[np.float64]


class BeamLost(RuntimeError):
    """The readings are INVALID: there is no beam to measure."""


class MoveFailed(RuntimeError):
    """A converter refused a setting or did not reach it."""


@dataclass
class WaitLedger:
    """Where a plan's time went while it waited: for readbacks to arrive, for fresh readings."""

    readback_s: float = 0.0
    readings_s: float = 0.0
    moves: int = 0
    readings: int = 0

    def reset(self) -> None:
        self.readback_s = self.readings_s = 0.0
        self.moves = self.readings = 0

    def as_dict(self) -> dict:
        return {"readback_s": round(self.readback_s, 3), "readings_s": round(self.readings_s, 3),
                "moves": self.moves, "readings": self.readings}


MONITOR_CHECK_S = 2.0  # a readback not seen to arrive on its monitor for this long is read afresh


class ConverterMove:
    """Put a setpoint (waiting for the put to complete), then wait until the readback is within
    *tolerance* of it; the time allowed grows with the step (converters ramp)."""

    def __init__(self, name: str, tolerance: float, ledger: WaitLedger, base_timeout: float = 20.0,
                 slowest_rate: float = 1.0):
        self.name, self.tolerance, self.ledger = name, tolerance, ledger
        self.base_timeout, self.slowest_rate = base_timeout, slowest_rate

    def timeout(self, step: float) -> float:
        return min(600.0, self.base_timeout + abs(step) / self.slowest_rate)

    async def __call__(self, setpoint, readback: SignalR, value: float) -> None:
        started = time.monotonic()
        try:
            await self._move(setpoint, readback, value)
        finally:
            self.ledger.readback_s += time.monotonic() - started
            self.ledger.moves += 1

    async def _move(self, setpoint, readback: SignalR, value: float) -> None:
        before = await readback.get_value(cached=False)
        try:
            await setpoint.set(value, timeout=10.0)
        except Exception as err:  # a refused put: the IOC says why in its alarm; the message here
            raise MoveFailed(f"{self.name}: put of {value:g} failed: {err}") from err
        allowed = self.timeout(value - before)
        deadline = time.monotonic() + allowed
        while True:  # on the readback's monitor: each update is looked at, none waited for longer than it takes
            try:
                await wait_for_value(readback, lambda now: abs(now - value) <= self.tolerance,
                                     timeout=min(MONITOR_CHECK_S, max(deadline - time.monotonic(), 0.01)))
                return
            except TimeoutError:  # a monitor that fell silent must not hide an arrival: read afresh
                now = await readback.get_value(cached=False)
                if abs(now - value) <= self.tolerance:
                    return
                if time.monotonic() >= deadline:
                    raise MoveFailed(f"{self.name}: readback {now:g} did not reach {value:g} in {allowed:.0f} s") \
                        from None


class PowerConverter(StandardReadable, Movable):
    """A converter's setpoint and readback in its unit; ``set`` returns when the readback arrived."""

    def __init__(self, converter: Converter, ledger: WaitLedger, name: str = ""):
        self.info = converter
        with self.add_children_as_readables():
            self.readback = epics_signal_r(float, f"ca://{converter.readback}")
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.setpoint = epics_signal_rw(float, f"ca://{converter.setpoint}")
        self.drive_low = epics_signal_r(float, f"ca://{converter.setpoint}.DRVL")
        self.drive_high = epics_signal_r(float, f"ca://{converter.setpoint}.DRVH")
        span = converter.high - converter.low
        self._move = ConverterMove(converter.name, max(2e-4 * span, 1e-6), ledger)
        super().__init__(name=name or converter.name)

    async def limits(self) -> tuple[float, float]:
        """The stricter of the table's limits and the IOC's DRVL/DRVH (when these are set)."""
        low, high = await asyncio.gather(self.drive_low.get_value(), self.drive_high.get_value())
        if high > low:
            return max(low, self.info.low), min(high, self.info.high)
        return self.info.low, self.info.high

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        low, high = await self.limits()
        if not (math.isfinite(value) and low <= value <= high):
            raise MoveFailed(f"{self.name}: {value:g} {self.info.unit} is outside [{low:g}, {high:g}]")
        await self._move(self.setpoint, self.readback, value)


class FreshSampler:
    """Readings of several signals taken after a moment, averaged.

    The first reading must be stamped (by the IOC) after the trigger: the readback of what the plan
    changed had arrived by then, and the machine's readings of the same moment or later show the
    change. Channel Access orders the updates of one channel, not those of several: under load a
    server may send a counter before the readings posted just before it. So the time stamps decide,
    not the order of arrival. A value that does not change is not posted again: on a twin, whose
    publication counter (``<prefix>UPDATES``) moves on every publication, a reading that has not
    moved for *settled_beats* publications after the trigger is taken as it stands; on the machine,
    one that has been quiet for *quiet_s*. The later readings are the next publications (on a twin)
    or the next updates of every signal (on the machine); they average the noise.
    """

    def __init__(self, sources: Sequence[SignalR], heartbeat: SignalR | None, ledger: WaitLedger,
                 quiet_s: float = 2.0, timeout_s: float = 30.0, settled_beats: int = 5):
        self.sources, self.heartbeat, self.ledger = list(sources), heartbeat, ledger
        self.quiet_s, self.timeout_s, self.settled_beats = quiet_s, timeout_s, settled_beats
        self._latest: list = [None] * len(self.sources)
        self._stamps = np.full(len(self.sources), -math.inf)
        self._severity = [0] * len(self.sources)
        self._counts = np.zeros(len(self.sources), dtype=int)
        self._beats = 0
        self._changed = asyncio.Event()
        self._subscribed = False

    def _subscribe(self) -> None:
        for i, signal in enumerate(self.sources):
            signal.subscribe_reading(lambda reading, i=i: self._update(i, reading))
        if self.heartbeat is not None:
            self.heartbeat.subscribe_reading(lambda reading: self._beat())
        self._subscribed = True

    def _update(self, i: int, reading: dict) -> None:
        (value,) = reading.values()
        self._latest[i] = np.asarray(value["value"], dtype=float)
        self._stamps[i] = float(value.get("timestamp", time.time()))
        self._severity[i] = int(value.get("alarm_severity", 0))
        self._counts[i] += 1
        self._changed.set()

    def _beat(self) -> None:
        self._beats += 1
        self._changed.set()

    async def _until(self, ready, deadline: float) -> None:
        while not ready():
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no fresh readings")
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.2))
            except TimeoutError:
                pass

    def _settled(self, beats: int, since: float, beats_needed: int) -> bool:
        """Whether a signal that has not moved may be taken as it stands."""
        if self.heartbeat is not None:
            return self._beats - beats >= beats_needed
        return time.monotonic() - since > self.quiet_s

    async def _first(self, after: float, deadline: float) -> None:
        """Until every signal is stamped *after*, or the rest have not moved meanwhile."""
        beats, since = self._beats, time.monotonic()
        await self._until(lambda: bool(np.all(self._stamps >= after))
                          or self._settled(beats, since, self.settled_beats), deadline)

    async def _next(self, deadline: float) -> None:
        """Until the next publication (a twin), or every signal's next update (the machine)."""
        beats, counts, since = self._beats, self._counts.copy(), time.monotonic()
        if self.heartbeat is not None:
            await self._until(lambda: self._beats > beats, deadline)
        else:
            await self._until(lambda: bool(np.all(self._counts > counts)) or self._settled(beats, since, 1), deadline)

    def _taken(self) -> list[np.ndarray]:
        if max(self._severity) >= INVALID:
            raise BeamLost("the readings are INVALID (no beam)")
        return [value.copy() for value in self._latest]

    async def sample(self, samples: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Mean and standard deviation of the mean of *samples* fresh readings of each source."""
        started = time.monotonic()
        try:
            return await self._sample(samples)
        finally:
            self.ledger.readings_s += time.monotonic() - started
            self.ledger.readings += 1

    async def _sample(self, samples: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if not self._subscribed:
            self._subscribe()
        after, deadline = time.time(), time.monotonic() + self.timeout_s
        await self._until(lambda: all(v is not None for v in self._latest), deadline)
        await self._first(after, deadline)
        taken = [self._taken()]
        for _ in range(max(1, samples) - 1):
            await self._next(deadline)
            taken.append(self._taken())
        stacked = [np.array([t[i] for t in taken]) for i in range(len(self.sources))]
        n = len(taken)
        return ([s.mean(axis=0) for s in stacked],
                [s.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(s[0]) for s in stacked])


class Orbit(StandardReadable, Triggerable):
    """The orbit at the BPMs in mm (x and y, in the machine's BPM order), averaged over fresh readings."""

    def __init__(self, layout: MachineLayout, heartbeat: SignalR | None, ledger: WaitLedger, samples: int = 4,
                 name: str = "orbit"):
        source = layout.orbit
        self.bpm_names = list(source.bpms)
        self._to_mm = source.waveform_to_mm
        if source.waveform:
            self.waveform = epics_signal_r(Floats, f"ca://{source.waveform}")
            signals = [self.waveform]
        else:
            from ophyd_async.core import DeviceVector
            self.bpm_x = DeviceVector({i: epics_signal_r(float, f"ca://{pv}") for i, pv in enumerate(source.x)})
            self.bpm_y = DeviceVector({i: epics_signal_r(float, f"ca://{pv}") for i, pv in enumerate(source.y)})
            signals = [*self.bpm_x.values(), *self.bpm_y.values()]
        self.samples = samples
        with self.add_children_as_readables():
            self.x, self._set_x = soft_signal_r_and_setter(Floats, units="mm")
            self.y, self._set_y = soft_signal_r_and_setter(Floats, units="mm")
            self.x_error, self._set_x_error = soft_signal_r_and_setter(Floats, units="mm")
            self.y_error, self._set_y_error = soft_signal_r_and_setter(Floats, units="mm")
        self._sampler = FreshSampler(signals, heartbeat, ledger)
        super().__init__(name=name)

    def _planes(self, values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if len(values) == 1:
            interleaved = values[0] * self._to_mm
            return interleaved[0::2].copy(), interleaved[1::2].copy()
        n = len(self.bpm_names)
        return np.array(values[:n], dtype=float), np.array(values[n:], dtype=float)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        mean, error = await self._sampler.sample(self.samples)
        (x, y), (ex, ey) = self._planes(mean), self._planes(error)
        for setter, value in ((self._set_x, x), (self._set_y, y), (self._set_x_error, ex), (self._set_y_error, ey)):
            setter(value)


class Tunes(StandardReadable, Triggerable):
    """The tune monitor (kHz) and the fractional tunes it means: kHz / f_rev, f_rev = f_RF / h."""

    def __init__(self, layout: MachineLayout, harmonic: int, heartbeat: SignalR | None, ledger: WaitLedger,
                 samples: int = 4, name: str = "tunes"):
        self.harmonic = harmonic
        self.h_khz = epics_signal_r(float, f"ca://{layout.role('tune_h_khz')}")
        self.v_khz = epics_signal_r(float, f"ca://{layout.role('tune_v_khz')}")
        self.rf_khz = epics_signal_r(float, f"ca://{layout.rf.readback}")
        self.samples = samples
        with self.add_children_as_readables():
            self.tune_x, self._set_x = soft_signal_r_and_setter(float)
            self.tune_y, self._set_y = soft_signal_r_and_setter(float)
            self.tune_x_error, self._set_x_error = soft_signal_r_and_setter(float)
            self.tune_y_error, self._set_y_error = soft_signal_r_and_setter(float)
        self._sampler = FreshSampler([self.h_khz, self.v_khz], heartbeat, ledger)
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        (h, v), (eh, ev) = await self._sampler.sample(self.samples)
        revolution_khz = await self.rf_khz.get_value(cached=False) / self.harmonic
        self._set_x(float(h) / revolution_khz)
        self._set_y(float(v) / revolution_khz)
        self._set_x_error(float(eh) / revolution_khz)
        self._set_y_error(float(ev) / revolution_khz)


class BeamCurrent(StandardReadable):
    def __init__(self, layout: MachineLayout, name: str = "current"):
        with self.add_children_as_readables():
            self.current = epics_signal_r(float, f"ca://{layout.role('beam_current')}")
        super().__init__(name=name)


class OrbitFeedbackSwitch(Device):
    """The ring's slow orbit feedback: a run mode (0 off; the MLS) or an on/off switch, and its status
    (0 while it is not correcting)."""

    def __init__(self, layout: MachineLayout, name: str = "orbit_feedback"):
        run_mode, switch = layout.optional("feedback_run_mode"), layout.optional("feedback_switch")
        self.mode = epics_signal_rw(int, f"ca://{run_mode}") if run_mode else epics_signal_rw(bool, f"ca://{switch}")
        self.status = epics_signal_r(float, f"ca://{layout.role('feedback_status')}")
        super().__init__(name=name)


class TwinInfo(Device):
    """What a twin serves about itself under its prefix: its seed, lattice version and publication counter."""

    def __init__(self, layout: MachineLayout, name: str = "twin"):
        self.seed = epics_signal_r(int, f"ca://{layout.seed_pv}")
        self.version = epics_signal_r(int, f"ca://{layout.role('version')}")
        self.updates = epics_signal_r(int, f"ca://{layout.role('updates')}")
        super().__init__(name=name)
