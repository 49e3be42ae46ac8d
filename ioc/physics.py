"""The engine in its own process.

pyAT holds the GIL for a whole tracking call, so physics run in the IOC's Python would stall every
put callback and every publication. The IOC talks to this process through a pipe: it sends a batch
of changes and receives a ``Step`` (what was applied, what was refused, the new beam state).
"""

from __future__ import annotations

import multiprocessing
import sys
from dataclasses import dataclass, field
from pathlib import Path

from twinioc.model.devices import SettingError
from twinioc.model.state import BeamState, Change

from .config import Realism

# Changes to these kinds move the optics, so chromaticity is recomputed after them.
OPTICS_KINDS = {"quadrupole", "sextupole", "octupole", "dipole", "rf"}


@dataclass
class Step:
    state: BeamState
    applied: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def _apply_each(engine, changes: list[Change]) -> tuple[dict, dict]:
    """Apply the changes the model accepts as one batch; report the others with the reason."""
    good, refused = [], {}
    for change in changes:
        try:
            engine.check([change])
            good.append(change)
        except SettingError as err:
            refused[change.device] = str(err)
    engine.apply(good)
    return {c.device: engine.settings[c.device] for c in good}, refused


def misalignments(engine, realism: Realism) -> dict:
    """The magnets' misalignments that *realism* (its seed, σ's and named offsets) gives; only the
    non-zero ones."""
    from twinioc.model.realism import Misalignment, draw_misalignments, streams

    rng = streams(realism.seed)["magnet_errors"]
    errors = {}
    for kind, sigma in (("quadrupole", realism.quadrupole_offset), ("sextupole", realism.sextupole_offset)):
        magnets = [w.magnet for c in engine.devices.of_kind(kind) for w in c.windings]
        errors |= draw_misalignments(magnets, rng, sigma, realism.magnet_roll)
    for magnet, (dx, dy) in realism.magnet_offsets.items():
        errors[magnet] = Misalignment(dx, dy, errors[magnet].roll if magnet in errors else 0.0)
    return {m: e for m, e in errors.items() if e != Misalignment()}


def build_engine(tables: Path, realism: Realism):
    """The engine of a machine with the misalignments and aperture of *realism*."""
    from twinioc.model.engine import Engine  # pyAT is loaded here only, never in the IOC process

    engine = Engine.from_folder(Path(tables), aperture=realism.aperture)
    engine.misalign(misalignments(engine, realism))
    return engine


def _serve(conn, tables: str, realism: Realism) -> None:
    from twinioc.model.realism import Misalignment

    engine = build_engine(Path(tables), realism)
    kinds = {name: c.kind for name, c in engine.devices.converters.items()}
    conn.send(({name: (c.kind, c.quantity) for name, c in engine.devices.converters.items()}, engine.version))
    chromaticity = True
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return  # the IOC has gone
        if message is None:
            return
        changes, new_realism = message
        if new_realism is not None:  # other magnet errors: the new ones, and zero where there are none now
            try:
                old, new = misalignments(engine, realism), misalignments(engine, new_realism)
                engine.misalign(new | {m: Misalignment() for m in old.keys() - new.keys()})
                realism, chromaticity = new_realism, True
            except (SettingError, KeyError) as err:  # e.g. a snapshot naming a magnet this lattice lacks
                print(f"twinioc physics: magnet errors kept as they were: {err}", file=sys.stderr, flush=True)
        applied, refused = _apply_each(engine, changes)
        chromaticity |= any(kinds[d] in OPTICS_KINDS for d in applied)
        state = engine.compute(chromaticity=chromaticity)
        chromaticity = not state.stable  # retry next time if it could not be computed
        conn.send(Step(state, applied, refused))


class PhysicsProcess:
    """Runs an ``Engine`` for the machine tables in *tables* in a child process."""

    def __init__(self, tables: Path, realism: Realism):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, str(tables), realism),
                                        name="twinioc-physics", daemon=True)
        self._process.start()
        child.close()
        self.kinds: dict[str, str] = {}  # device -> quadrupole | ... | rf | cavity
        self.quantities: dict[str, str] = {}  # device -> "current" | "frequency" | "voltage"
        self.version = 0  # the engine's lattice version when it was ready

    def wait_ready(self) -> None:
        """Wait until the engine has loaded its lattice (raises ``EOFError`` if it could not)."""
        devices, self.version = self._conn.recv()
        self.kinds = {name: kind for name, (kind, _) in devices.items()}
        self.quantities = {name: quantity for name, (_, quantity) in devices.items()}

    def step(self, changes: list[Change], errors: Realism | None = None) -> Step:
        """Apply *changes* (possibly none) and return the resulting state. Blocks without the GIL.

        *errors*: first misalign the magnets as these settings (seed, σ's, named offsets) say.
        """
        self._conn.send((changes, errors))
        return self._conn.recv()

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(timeout=2)
        if self._process.is_alive():
            self._process.kill()
