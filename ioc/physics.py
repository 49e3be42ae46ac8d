"""The engine in a process of its own, and the supervisor that keeps one running.

pyAT holds the GIL for a whole tracking call, so physics run in the IOC's Python would stall every
put callback and every publication. The IOC talks to the worker process through a pipe: it sends a
batch of changes (and, when they changed, the magnet errors) and receives a ``Step``: what was
applied, what was refused, the new beam state with the lattice version the worker produced.

A worker that dies or does not answer a step within the time-out is replaced (``Supervisor``): the
new one is built with the magnet errors as they are now and continues the lattice versions, and the
twin sends it every converter output as one batch.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import NamedTuple

import numpy as np
from twinioc.model.correction import StartRequest
from twinioc.model.devices import SettingError
from twinioc.model.realism import MagnetErrorSettings
from twinioc.model.state import BeamState, Change
from twinioc.model.tables import MachineTables

# Changes to these kinds move the optics, so chromaticity is recomputed after them.
OPTICS_KINDS = {"quadrupole", "sextupole", "octupole", "dipole", "rf"}
START_TIMEOUT_S = 120.0  # loading pyAT and a lattice takes a second or two; a loaded machine, longer


@dataclass
class Step:
    state: BeamState
    applied: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    note: str = ""  # what the worker could not do beyond the changes (magnet errors it kept)
    response: np.ndarray | None = None  # the orbit response of the steerers (``Engine.orbit_response``), if asked


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker is built from: the machine's tables, the aperture, the magnet errors, the
    lattice version it continues from, and (the first worker of a fresh twin in operation) the
    correction to find before it is ready."""

    tables: Path
    aperture: tuple[float, float] | None
    magnet_errors: MagnetErrorSettings
    first_version: int = 0
    start: StartRequest | None = None


class StartSettings(NamedTuple):
    """What a start in operation set (converter -> value; empty: nothing) and how it ended."""

    settings: dict[str, float]
    note: str


class MagnetErrors:
    """The settings the model's magnet errors are drawn from now, and a change the worker has yet to
    be sent (a snapshot's errors); safe to use from any thread."""

    def __init__(self, settings: MagnetErrorSettings):
        self._lock = threading.Lock()
        self.settings = settings
        self._unsent: MagnetErrorSettings | None = None

    def change(self, settings: MagnetErrorSettings) -> None:
        with self._lock:
            if settings != self.settings:
                self.settings = self._unsent = settings

    def take_unsent(self) -> MagnetErrorSettings | None:
        with self._lock:
            unsent, self._unsent = self._unsent, None
            return unsent

    def setup(self, tables: Path, aperture: tuple[float, float] | None,
              start: StartRequest | None = None) -> Callable[[int], WorkerSetup]:
        """How a new worker is set up: with the errors as they are then (nothing left to send it);
        the first one also with the *start* correction to find."""
        def setup(first_version: int) -> WorkerSetup:
            with self._lock:
                self._unsent = None
                return WorkerSetup(tables, aperture, self.settings, first_version,
                                   start if first_version == 0 else None)

        return setup


class WorkerFailure(RuntimeError):
    """The physics worker could not start, died or stopped answering; the message says which."""


def _serve(conn, setup: WorkerSetup) -> None:
    """The worker process: build the engine, say so, then answer batches until told to stop."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pyAT's note that it cannot plot
            from twinioc.model.engine import Engine  # pyAT is loaded here only, never in the IOC process
        tables = MachineTables(setup.tables)
        engine = Engine.from_tables(tables, aperture=setup.aperture)
        working_point = engine.compute(chromaticity=False).tune  # the design's, before the errors
        engine.misalign(setup.magnet_errors.draw(tables))
        start = _start(engine, setup.start, working_point)
        engine.version = max(engine.version, setup.first_version)
    except Exception as err:  # noqa: BLE001 - whatever stops the start, the IOC is told why
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", ({name: (c.kind, c.quantity) for name, c in engine.devices.converters.items()},
                         engine.version, engine.steerers(), start)))
    _answer_steps(conn, engine, tables)


def _start(engine, request: StartRequest | None, working_point) -> StartSettings:
    """The settings of a start in operation (none without a request), and what the correction did."""
    from twinioc.model.correction import start_in_operation

    if request is None:
        return StartSettings({}, "")
    notes: list[str] = []
    try:
        settings = start_in_operation(engine, request, working_point, notes.append)
    except (ArithmeticError, ValueError) as err:
        return StartSettings({}, f"not corrected: {err}")
    return StartSettings(settings, notes[-1] if notes else "")


def _answer_steps(conn, engine, tables: MachineTables) -> None:
    """Answer batches until told to stop."""
    chromaticity = True
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return  # the IOC has gone
        if message is None:
            return
        changes, errors, response = message
        note = ""
        if errors is not None:  # other magnet errors
            try:
                engine.misalign(errors.draw(tables))
                chromaticity = True
            except (SettingError, KeyError) as err:  # e.g. a snapshot naming a magnet this lattice lacks
                note = f"magnet errors kept as they were: {err}"
        applied, refused = engine.apply_valid(changes)
        chromaticity |= any(engine.devices.converters[d].kind in OPTICS_KINDS for d in applied)
        state = engine.compute(chromaticity=chromaticity)
        chromaticity = not state.stable  # retry next time if it could not be computed
        step = Step(state, applied, refused, note)
        if response and state.stable:
            step.response = engine.orbit_response()
        conn.send(step)


class PhysicsWorker:
    """One worker process: started at once, ready when it has built its engine, then one step at a
    time, each within *timeout* seconds."""

    def __init__(self, setup: WorkerSetup, timeout: float):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, setup), name="twinioc-physics", daemon=True)
        self._process.start()
        child.close()
        self.timeout = timeout
        self.started = time.monotonic()
        self.kinds: dict[str, str] = {}  # device -> quadrupole | ... | rf | cavity
        self.quantities: dict[str, str] = {}  # device -> "current" | "frequency" | "voltage"
        self.version = 0  # the engine's lattice version when it was ready
        self.steerers: list[str] = []  # the columns of a step's orbit response
        self.start = StartSettings({}, "")  # what a start in operation set
        self.ready = False

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _answer(self, timeout: float) -> object:
        """The worker's next message, or ``WorkerFailure`` if it dies or is silent for *timeout* s."""
        if not wait([self._conn, self._process.sentinel], timeout):
            raise WorkerFailure(f"the worker did not answer within {timeout:g} s")
        try:
            if self._conn.poll():
                return self._conn.recv()
        except (EOFError, OSError):
            pass
        self._process.join(1.0)
        raise WorkerFailure(f"the worker process ended ({_exit(self._process.exitcode)})")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the engine is built; ``WorkerFailure`` with the reason if it cannot be."""
        kind, detail = self._answer(timeout)
        if kind != "ready":
            raise WorkerFailure(f"the worker could not start: {detail}")
        devices, self.version, self.steerers, self.start = detail
        self.kinds = {name: kind for name, (kind, _) in devices.items()}
        self.quantities = {name: quantity for name, (_, quantity) in devices.items()}
        self.ready = True

    def poll_ready(self) -> bool:
        """Whether the engine is built, without waiting (``WorkerFailure`` if it failed or is too slow)."""
        if not self.ready:
            late = time.monotonic() - self.started > START_TIMEOUT_S
            if self._conn.poll() or not self._process.is_alive() or late:
                self.wait_ready(timeout=0.0)
        return self.ready

    def step(self, changes: list[Change], errors: MagnetErrorSettings | None = None,
             response: bool = False) -> Step:
        """Apply *changes* (possibly none) and return the resulting state. Blocks without the GIL.

        *errors*: first misalign the magnets as these settings (seed, σ's, named offsets) say;
        *response*: also compute the steerers' orbit response of the new lattice.
        """
        try:
            self._conn.send((changes, errors, response))
        except OSError:
            self._answer(0.0)  # says why it cannot take it
        return self._answer(self.timeout)

    def alive(self) -> bool:
        return self._process.is_alive()

    def close(self, ask: bool = True) -> None:
        stop_process(self._process, self._conn, ask)


def stop_process(process, conn, ask: bool = True) -> None:
    """Stop a worker *process*: ask it through *conn* (unless it failed: then at once), and kill it
    if it does not go."""
    if ask:
        with contextlib.suppress(OSError):
            conn.send(None)
        process.join(timeout=2)
    if process.is_alive():
        process.kill()
        process.join(timeout=2)
    conn.close()


def _exit(code: int | None) -> str:
    return "still running" if code is None else f"killed by signal {-code}" if code < 0 else f"exit status {code}"


class Supervisor:
    """Keeps one physics worker: notices when it dies or hangs, starts another from ``setup()``
    (the twin's magnet errors and lattice version as they are then), and gives up after
    *max_restarts* failed starts in a row (``fatal``)."""

    def __init__(self, setup: Callable[[int], WorkerSetup], timeout: float, max_restarts: int,
                 report: Callable[[str], None]):
        self._setup, self._timeout, self._max_restarts, self._report = setup, timeout, max_restarts, report
        self.worker = PhysicsWorker(setup(0), timeout)
        self.restarts = 0
        self.failures = 0  # failed starts in a row
        self.version = 0  # the last lattice version a worker reported
        self.fatal: str | None = None  # why the twin cannot go on
        self.fresh = True  # the worker has had no batch yet: it needs every converter output
        self.status = "starting"

    def wait_ready(self) -> None:
        """At start: wait for the first worker (``WorkerFailure`` if it cannot start: the twin exits)."""
        self.worker.wait_ready()
        self.version = self.worker.version
        self.status = f"running (pid {self.worker.pid})"

    def available(self) -> bool:
        """Whether a worker is ready for a step now; replaces one that has died meanwhile."""
        if self.fatal:
            return False
        try:
            if not self.worker.poll_ready():
                return False
            if not self.worker.alive():
                self.worker.step([])  # raises with the reason it has gone
        except WorkerFailure as err:
            self.replace(str(err))
            return False
        if self.status.startswith("restarting"):
            self.status = f"running (pid {self.worker.pid}), restarted {self.restarts}x"
            self._report(f"physics: a new worker is ready (pid {self.worker.pid}), restart {self.restarts}")
        return True

    def step(self, changes: list[Change], errors: MagnetErrorSettings | None,
             response: bool = False) -> Step | None:
        """The worker's step, or None when it failed (a new one is on its way)."""
        try:
            step = self.worker.step(changes, errors, response)
        except WorkerFailure as err:
            self.replace(str(err))
            return None
        self.version, self.failures, self.fresh = step.state.version, 0, False
        return step

    def replace(self, reason: str) -> None:
        """Put a new worker in place of one that failed (*reason*), or give up."""
        self.worker.close(ask=False)
        self.failures += self.fresh  # it had not yet carried a step: this restart did not take
        if self.failures >= self._max_restarts:
            self.fatal = f"physics: {self.failures} new workers in a row did not come up; the last: {reason}"
            self.status = "failed: " + reason
            return
        self.restarts += 1
        self.status = f"restarting: {reason}"
        self._report(f"physics: {reason} (pid {self.worker.pid}); starting another worker")
        self.worker = PhysicsWorker(self._setup(self.version + 1), self._timeout)
        self.fresh = True

    def close(self) -> None:
        self.worker.close()
