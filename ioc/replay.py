"""Replay a journal's setpoints onto a twin, or, behind a safety envelope, onto any CA target.

What is replayed: every setpoint an accepted journal entry left (puts, optics modes, snapshot
restores), in journal order; twin-only commands (faults, noise, snapshots) are not. Onto a twin by
default: the target must serve ``<prefix>SEED`` from the same server as every setpoint. Onto anything
else only with ``--any-target``, after a dry-run whose confirmation code is passed back, and always
inside the envelope: each value within its limits, no step larger than the maximum step of its
converter, at most ``max_rate_hz`` commands a second. A command outside the envelope is refused before
it is sent, and nothing after it is sent either.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from twinioc.model.tables import MachineTables

from .config import Config
from .journal import setpoint_changes


@dataclass(frozen=True)
class Command:
    seq: int
    time: datetime
    device: str
    pv: str
    value: float


def commands(entries: Iterable[dict], setpoint_pvs: dict[str, str]) -> list[Command]:
    """The setpoint commands of journal *entries*; *setpoint_pvs*: device -> its setpoint PV."""
    found = []
    for entry, device, value in setpoint_changes(entries):
        pv = entry["pv"] if entry.get("command") == "set" else setpoint_pvs[device]
        found.append(Command(int(entry["seq"]), datetime.fromisoformat(entry["time"]), device, pv, value))
    return found


@dataclass
class Envelope:
    """What a replay may do: limits and maximum step per converter, a maximum command rate."""

    limits: dict[str, tuple[float, float]]
    max_step: dict[str, float]
    max_rate_hz: float = math.inf
    units: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_machine(cls, config: Config, extra: dict | None = None) -> Envelope:
        """From the converter table and the startup file's ``[envelope]``; *extra* (an envelope file)
        narrows it: ``[limits] "PATTERN" = [low, high]``, ``[max_step] "PATTERN or kind" = step``,
        ``max_rate_hz``."""
        converters = MachineTables(config.tables).converters.values()
        tables = [config.envelope, extra or {}]  # where both say something, the stricter holds
        limits = {c.name: (c.low, c.high) for c in converters}
        steps = {}
        for c in converters:
            candidates = [c.max_step] if c.max_step is not None else []
            candidates += [float(step) for table in tables for key, step in table.get("max_step", {}).items()
                           if key == c.kind or fnmatch.fnmatchcase(c.name, key)]
            steps[c.name] = min(candidates, default=math.inf)
        for pattern, (low, high) in (extra or {}).get("limits", {}).items():
            for name in fnmatch.filter(limits, pattern):
                limits[name] = (max(limits[name][0], float(low)), min(limits[name][1], float(high)))
        rate = min(float(table.get("max_rate_hz", math.inf)) for table in tables)
        return cls(limits, steps, rate, {c.name: c.unit for c in converters})

    def refusal(self, command: Command, current: float | None) -> str | None:
        """Why *command* is outside the envelope, with the device at *current*; None if it is not."""
        if command.device not in self.limits:
            return f"{command.device} is not a converter of this machine"
        unit = self.units.get(command.device, "")
        low, high = self.limits[command.device]
        if not low <= command.value <= high:
            return f"{command.value:g} {unit} is outside [{low:g}, {high:g}]"
        step = abs(command.value - current) if current is not None else math.inf
        if step > self.max_step[command.device]:
            what = f"step {step:.6g} {unit}" if current is not None else "the present value is unknown; a step"
            return f"{what} > the maximum step {self.max_step[command.device]:.6g} {unit}"
        return None

    def describe(self) -> str:
        return f"limits of {len(self.limits)} converters, max steps, at most {self.max_rate_hz:g} commands/s"


@dataclass
class Verdict:
    command: Command
    before: float | None  # the device's value just before, as the replay expects it
    refusal: str | None = None


def plan(journal: list[Command], envelope: Envelope | None, present: dict[str, float]) -> list[Verdict]:
    """Each command with the value it steps from and, under an *envelope*, why it would be refused.

    *present*: each device's value on the target now. The values step on as the commands would
    leave them; a refused command leaves its device where it was.
    """
    values = dict(present)
    verdicts = []
    for command in journal:
        before = values.get(command.device)
        refusal = envelope.refusal(command, before) if envelope else None
        if refusal is None:
            values[command.device] = command.value
        verdicts.append(Verdict(command, before, refusal))
    return verdicts


def confirmation(verdicts: list[Verdict], target: str) -> str:
    """A short code that names this exact plan onto this target: a dry-run prints it, and a replay
    onto a target that is not a twin must be given it back."""
    digest = hashlib.sha256(target.encode())
    for v in verdicts:
        digest.update(f"{v.command.seq} {v.command.pv} {v.command.value!r} {v.refusal}\n".encode())
    return digest.hexdigest()[:10]


def schedule(journal: list[Command], speed: float, max_rate_hz: float) -> list[float]:
    """When each command goes, in seconds from the start: the journal's own spacing divided by
    *speed* (0: no waiting), never faster than *max_rate_hz*."""
    gap = 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0
    times, last = [], -math.inf
    start = journal[0].time if journal else None
    for command in journal:
        wanted = (command.time - start).total_seconds() / speed if speed > 0 else 0.0
        last = max(wanted, last + gap)
        times.append(last)
    return times


def load_envelope(path: Path | None) -> dict | None:
    return tomllib.loads(Path(path).read_text()) if path else None


def send(verdicts: list[Verdict], times: list[float], put) -> tuple[int, Verdict | None]:
    """Send the commands at their times through *put* (pv, value) -> bool, up to the first refused
    one; return how many were sent and the one that stopped the replay."""
    start = time.monotonic()
    sent = 0
    for verdict, when in zip(verdicts, times, strict=True):
        if verdict.refusal is not None:
            return sent, verdict
        time.sleep(max(0.0, start + when - time.monotonic()))
        if not put(verdict.command.pv, verdict.command.value):
            return sent, Verdict(verdict.command, verdict.before, "the put failed (no connection or no answer)")
        sent += 1
    return sent, None
