"""The equilibrium of the radiating beam, computed in a process of its own, off the orbit loop.

An envelope takes a tenth of a second to a few tenths (BESSY II), far longer than a tick; the orbit
worker must never wait for it. ``EquilibriumWorker`` hands its process the newest lattice (every
converter output, the magnet errors, the lattice version) whenever one is waiting and the process is
free, and takes the answer without waiting: lattices that came meanwhile are skipped, the newest
is computed next. The process runs only when a processor is idle (SCHED_IDLE). One that
dies, or does not answer within the time-out, is replaced and given the newest lattice again.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twinioc.model.realism import MagnetErrorSettings
from twinioc.model.state import Change, Equilibrium, EquilibriumSettings
from twinioc.model.tables import MachineTables

from .physics import stop_process

NICENESS = 10  # the equilibrium yields to the IOC and to the orbit worker
AUTOGROUP_NICE = 19  # the weight of its own scheduling group: the lowest
MAX_FAILED_STARTS = 3  # processes in a row that die before they are ready: the equilibrium is given up


@dataclass(frozen=True)
class EquilibriumSetup:
    """What the equilibrium process is built from: the tables, the source points (element names)
    and the settings."""

    tables: Path
    points: tuple[str, ...]
    settings: EquilibriumSettings


@dataclass(frozen=True)
class Lattice:
    """One lattice to compute: its version, every converter output, the magnet errors."""

    version: int
    outputs: dict[str, float]
    errors: MagnetErrorSettings


def _yield_the_processor() -> None:
    """Run only on a processor nobody else wants (Linux's SCHED_IDLE), or else at a low priority:
    the IOC's threads and the orbit worker then never wait for the equilibrium. Every thread of
    the process: numpy's BLAS threads were started before this runs, and Linux schedules threads.

    SCHED_IDLE yields only within the process's scheduling group. With autogroups on (Linux
    gives each session one), the IOC and this process would share the session's group: the
    computation would spend the group's share of the processors, and the IOC would wait for other
    sessions' processes. So the process takes a session, hence a group, of its own, of the lowest
    weight. It still ends when the IOC goes: its pipe closes."""
    with contextlib.suppress(OSError):
        os.setsid()
        Path("/proc/self/autogroup").write_text(f"{AUTOGROUP_NICE}\n")
    try:
        for thread in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(thread), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(NICENESS)


def _serve(conn, setup: EquilibriumSetup) -> None:
    """The process: build an engine, then compute the newest lattice it was sent, again and again."""
    _yield_the_processor()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from twinioc.model import equilibrium
            from twinioc.model.engine import Engine
        tables = MachineTables(setup.tables)
        engine = Engine.from_tables(tables)
        names = [element.FamName for element in engine.ring]
        unknown = [p for p in setup.points if p not in names]
        if unknown:
            raise ValueError(f"no element {', '.join(unknown)} in the lattice (source points of pvs.csv)")
        points = {p: names.index(p) for p in setup.points}
        quantities = {name: c.quantity for name, c in engine.devices.converters.items()}
    except Exception as err:  # noqa: BLE001 - whatever stops the start, the IOC is told why
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", ""))
    errors, guess = None, ()
    while True:
        try:
            lattice = conn.recv()
            while lattice is not None and conn.poll():  # only the newest counts
                lattice = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if lattice is None:
            return
        if lattice.errors != errors:
            engine.misalign(lattice.errors.draw(tables))
            errors = lattice.errors
        engine.apply_valid([Change(d, quantities[d], v) for d, v in lattice.outputs.items() if d in quantities])
        result = equilibrium.compute(engine.ring, engine.rf_frequency, points, setup.settings, lattice.version,
                                     guess)
        guess = result.closed_orbit or guess
        try:
            conn.send(("equilibrium", result))
        except OSError:  # the IOC has gone meanwhile
            return


class EquilibriumWorker:
    """Owns the equilibrium process: the newest lattice waiting for it, the one it computes, and
    its replacement when it dies or hangs (*report* says so)."""

    def __init__(self, setup: EquilibriumSetup, timeout: float, report: Callable[[str], None],
                 min_interval: float = 0.0):
        self.setup, self.timeout, self._report, self.min_interval = setup, timeout, report, min_interval
        self.restarts = 0
        self._failures = 0  # replacements in a row that never became ready
        self.status = "starting"
        self._waiting: Lattice | None = None  # the newest lattice not yet sent
        self._sent: Lattice | None = None  # the lattice being computed
        self._sent_at = 0.0
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.setup), name="twinioc-equilibrium",
                                        daemon=True)
        self._process.start()
        child.close()
        self._ready = False
        self._started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def request(self, lattice: Lattice) -> None:
        """Compute *lattice* next (it replaces any lattice still waiting)."""
        self._waiting = lattice

    def poll(self) -> Equilibrium | None:
        """A new equilibrium if one has come (without waiting); sends the waiting lattice when the
        process is free; replaces a process that died or hangs."""
        fresh = None
        try:
            while self._conn.poll():
                kind, detail = self._conn.recv()
                if kind == "failed":
                    self._fail(f"could not start: {detail}")
                    return None
                if kind == "ready":
                    self._ready, self.status = True, f"running (pid {self.pid})"
                else:
                    fresh = detail
                    self._sent = None
        except (EOFError, OSError):
            pass
        if not self._process.is_alive():
            self._replace(f"the process ended (exit status {self._process.exitcode})")
        elif self._busy_for() > self.timeout:
            self._replace(f"no answer within {self.timeout:g} s")
        elif self._ready and self._sent is None and self._waiting is not None and self._rested():
            self._send()
        return fresh

    def _busy_for(self) -> float:
        if self._sent is not None:
            return time.monotonic() - self._sent_at
        return 0.0 if self._ready else time.monotonic() - self._started

    def _rested(self) -> bool:
        """Whether *min_interval* has passed since the last computation started."""
        return time.monotonic() - self._sent_at >= self.min_interval

    def _send(self) -> None:
        self._sent, self._waiting = self._waiting, None
        self._sent_at = time.monotonic()
        try:
            self._conn.send(self._sent)
        except OSError:
            self._replace("its pipe is closed")

    def _fail(self, reason: str) -> None:
        self.status = f"failed: {reason}"
        self._report(f"equilibrium: {reason}")
        self.close()
        self._ready = False

    def _replace(self, reason: str) -> None:
        """A new process in place of one that failed; it gets the lattice the old one had."""
        if self.status.startswith("failed"):
            return
        self._failures = self._failures + 1 if not self._ready else 1
        if self._failures > MAX_FAILED_STARTS:
            self._fail(f"{MAX_FAILED_STARTS} new processes in a row did not come up; the last: {reason}")
            return
        self._report(f"equilibrium: {reason} (pid {self.pid}); starting another process")
        self.close()
        self.restarts += 1
        self.status = f"restarting: {reason}"
        if self._sent is not None and self._waiting is None:
            self._waiting = self._sent
        self._sent = None
        self._start()

    def close(self, ask: bool = False) -> None:
        """Stop the process; at once unless *ask*: it holds nothing that a kill would lose, and
        asking would wait for the computation under way."""
        stop_process(self._process, self._conn, ask)
