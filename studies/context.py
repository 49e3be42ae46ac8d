"""What a plan works with: the machine's devices, a model for predictions, and the setpoints to put back.

- ``Instruments`` makes a machine's devices from its layout on first use, and keeps a model of the
  machine (``model.Engine``, set to the machine's present setpoints when a plan asks) for predictions.
- ``Restorer`` remembers each setpoint a plan changes, before its first change, and puts them all
  back at the end: when the plan ends, fails or is cancelled. It reports what it remembers (the
  service keeps it on disk, so that a crashed service can still put it back).
- ``Envelope`` is the safety envelope of a target that is not a twin: limits and the largest step per
  converter. A larger move is walked in steps no larger than that.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import bluesky.plan_stubs as bps
from aioca import caget
from ophyd_async.plan_stubs import ensure_connected
from twinioc.model.engine import Engine
from twinioc.model.state import Change

from .devices import BeamCurrent, Orbit, OrbitFeedbackSwitch, PowerConverter, Tunes, TwinInfo, WaitLedger
from .machine import MachineLayout


def serves_seed(layout: MachineLayout, loop) -> bool:
    """Whether the target answers ``<prefix>SEED``, i.e. is a twin; asked on the RunEngine's *loop*."""
    try:
        value = asyncio.run_coroutine_threadsafe(caget(layout.seed_pv, timeout=2.0, throw=False), loop).result(5.0)
    except Exception:  # noqa: BLE001 - no answer, whatever the reason: not a twin
        return False
    return value is not None and bool(getattr(value, "ok", False))


class Instruments:
    """The devices of one machine, made on first use, and the model beside them."""

    def __init__(self, layout: MachineLayout, is_twin: bool, samples: int = 4):
        self.layout, self.is_twin = layout, is_twin
        self.ledger = WaitLedger()
        self.twin = TwinInfo(layout) if is_twin else None
        heartbeat = self.twin.updates if self.twin else None
        self.orbit = Orbit(layout, heartbeat, self.ledger, samples)
        self.tunes = Tunes(layout, self.engine.ring.harmonic_number, heartbeat, self.ledger, samples)
        self.current = BeamCurrent(layout)
        has_feedback = layout.optional("feedback_run_mode") or layout.optional("feedback_switch")
        self.feedback = OrbitFeedbackSwitch(layout) if has_feedback else None
        self._converters: dict[str, PowerConverter] = {}

    def converter(self, name: str) -> PowerConverter:
        if name not in self._converters:
            self._converters[name] = PowerConverter(self.layout.converter(name), self.ledger)
        return self._converters[name]

    @cached_property
    def engine(self) -> Engine:
        """The machine's model (its design lattice and device map): predictions, never readings."""
        return Engine.from_tables(self.layout.tables)

    def connect(self, *devices):
        """Plan: connect the devices (once; later calls return at once)."""
        yield from ensure_connected(*[d for d in devices if d is not None])

    def sync_model(self):
        """Plan: set the model to the machine's present setpoints (one CA read of them all)."""
        converters = list(self.layout.converters.values())

        async def read():
            values = await caget([c.setpoint for c in converters], timeout=10.0)
            quantities = {name: c.quantity for name, c in self.engine.devices.converters.items()}
            self.engine.apply_valid([Change(c.name, quantities[c.name], float(v))
                                     for c, v in zip(converters, values, strict=True)])

        yield from bps.wait_for([read])

    def limits(self, devices: list[PowerConverter]):
        """Plan: each converter's (low, high), the stricter of its table and the IOC's DRVL/DRVH."""
        found: list[tuple[float, float]] = []

        async def read():
            found.extend([await d.limits() for d in devices])

        yield from bps.wait_for([read])
        return found

    def compaction(self) -> float:
        """α_c of the model as set: what turns an RF step into a momentum offset."""
        return float(self.engine.compute(chromaticity=False).momentum_compaction)


@dataclass
class Envelope:
    """Limits and the largest step per converter (a real machine's safety envelope)."""

    limits: dict[str, tuple[float, float]]
    max_step: dict[str, float]

    @classmethod
    def of(cls, layout: MachineLayout) -> Envelope:
        converters = layout.converters.values()
        return cls({c.name: (c.low, c.high) for c in converters}, {c.name: c.max_step for c in converters})

    def refusal(self, device: str, value: float) -> str | None:
        if device not in self.limits:
            return f"{device} is not a converter of this machine"
        low, high = self.limits[device]
        if not (math.isfinite(value) and low <= value <= high):
            return f"{device}: {value:g} is outside the envelope [{low:g}, {high:g}]"
        return None

    def steps(self, moves: dict[str, tuple[float, float]]) -> int:
        """How many equal steps a move of several devices (from, to) takes within the largest steps."""
        return max([math.ceil(abs(to - start) / self.max_step[d] - 1e-9) if math.isfinite(self.max_step[d]) else 1
                    for d, (start, to) in moves.items()] + [1])


class MoveRefused(ValueError):
    """A move outside the safety envelope; nothing was sent."""


@dataclass
class Restorer:
    """The setpoints a plan changed, with their values before the first change; ``restore`` puts them back.
    It also remembers the orbit feedback's mode before the plan switched it off (the plan switches it
    back itself), so that what it tells *on_record* is everything a crashed plan leaves to undo."""

    envelope: Envelope | None = None
    on_record: Callable[[dict], None] | None = None  # told {"setpoints": ..., "feedback": ...} on each change
    original: dict[str, float] = field(default_factory=dict)
    devices: dict[str, PowerConverter] = field(default_factory=dict)
    feedback: int | bool | None = None

    def saved(self) -> dict:
        return {"setpoints": dict(self.original), "feedback": self.feedback}

    def remember_feedback(self, mode: int | bool) -> None:
        self.feedback = mode
        if self.on_record:
            self.on_record(self.saved())

    def move(self, targets: dict[PowerConverter, float]):
        """Plan: move converters together (each waits for its readback), remembering where they were."""
        present = {}
        for device in targets:
            value = yield from bps.rd(device.setpoint)
            present[device.name] = float(value)
            if device.name not in self.original:
                self.original[device.name], self.devices[device.name] = float(value), device
                if self.on_record:
                    self.on_record(self.saved())
        moves = {d: (present[d.name], float(v)) for d, v in targets.items() if float(v) != present[d.name]}
        if moves:  # a converter already there gets no put
            yield from self._walk(moves)

    def _walk(self, moves: dict[PowerConverter, tuple[float, float]]):
        steps = 1
        if self.envelope is not None:
            for device, (_, to) in moves.items():
                refusal = self.envelope.refusal(device.name, to)
                if refusal:
                    raise MoveRefused(refusal)
            steps = self.envelope.steps({d.name: m for d, m in moves.items()})
        for k in range(1, steps + 1):
            args = []
            for device, (start, to) in moves.items():
                args += [device, to if k == steps else start + (to - start) * k / steps]
            yield from bps.mv(*args)

    def restore(self):
        """Plan: every remembered setpoint back to its value before."""
        if self.original:
            yield from self.move({self.devices[name]: value for name, value in self.original.items()})


@dataclass
class PlanContext:
    """One plan's instruments, restorer and progress report."""

    instruments: Instruments
    restorer: Restorer
    progress: Callable[[float], None] = lambda fraction: None

    @property
    def layout(self) -> MachineLayout:
        return self.instruments.layout

    def converter(self, name: str) -> PowerConverter:
        return self.instruments.converter(name)
