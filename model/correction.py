"""Orbit and tune correction as a control room does it: steerer currents from the SVD inverse of an
orbit response, tune-knob strengths from the tune response of two quadrupole families.

``OrbitCorrector`` is the arithmetic of one correction step (numpy only): the readings' distance from
a reference, the inverse of the response with the small singular values cut, a gain, and the
steerers' limits and largest step. ``start_in_operation`` uses it, with the engine, to find the
settings a ring in operation runs with: its orbit corrected and its tunes on the working point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import numpy as np

from .state import Change

if TYPE_CHECKING:
    from .engine import Engine
    from .realism import BpmErrors

TUNE_STEP = 1e-3  # relative step of a tune knob's currents for its tune response
START_ITERATIONS = 8
SETTLED_A, SETTLED_TUNE = 1e-6, 1e-6  # smaller corrections than these end the start's iterations


@dataclass(frozen=True)
class CorrectionSettings:
    """How a correction inverts the response: singular values below ``cut`` × the largest are
    dropped; each step applies ``gain`` × the computed correction."""

    cut: float = 1e-3
    gain: float = 1.0


@dataclass
class OrbitCorrector:
    """One correction step for *steerers* with the orbit *response* (readings x then y per ampere):
    their new currents within [low, high], no step above *max_step*. BPMs whose readings are not
    finite are left out of the step (the inverse is formed again for the BPMs that remain)."""

    steerers: list[str]
    response: np.ndarray  # (2 n_bpm, n_steerers)
    low: np.ndarray
    high: np.ndarray
    max_step: np.ndarray
    settings: CorrectionSettings = field(default_factory=CorrectionSettings)
    _inverses: dict = field(default_factory=dict, repr=False)

    def _inverse(self, usable: np.ndarray) -> np.ndarray:
        key = usable.tobytes()
        if key not in self._inverses:
            self._inverses = {key: np.linalg.pinv(self.response[usable], rcond=self.settings.cut)}
        return self._inverses[key]

    def step(self, currents: np.ndarray, error: np.ndarray) -> np.ndarray:
        """The steerers' new currents for readings *error* away from the reference (same units as
        the response's rows); unchanged if no BPM reads."""
        usable = np.isfinite(error)
        if not usable.any():
            return currents.copy()
        change = -self.settings.gain * self._inverse(usable) @ error[usable]
        change = np.clip(change, -self.max_step, self.max_step)
        return np.clip(currents + change, self.low, self.high)


def tune_knobs(engine: Engine, families: list[str]) -> list[list[str]]:
    """The quadrupole converters of each family pattern (fnmatch), e.g. ``["Q3P*", "Q4P*"]``."""
    quadrupoles = [c.name for c in engine.devices.of_kind("quadrupole")]
    knobs = [[name for name in quadrupoles if fnmatchcase(name, pattern)] for pattern in families]
    empty = [p for p, knob in zip(families, knobs, strict=True) if not knob]
    if empty or len(knobs) != 2:
        raise ValueError(f"tune knobs need two quadrupole families; {empty or families} name none or not two")
    return knobs


def _scale(engine: Engine, knob: list[str], factor: float) -> list[Change]:
    return [Change(name, "current", engine.settings[name] * factor) for name in knob]


def tune_response(engine: Engine, knobs: list[list[str]]) -> np.ndarray:
    """∂(Qx, Qy)/∂(relative change of each knob's currents), by central differences."""
    columns = []
    for knob in knobs:
        tunes = []
        for sign in (1.0, -1.0):
            saved = {name: engine.settings[name] for name in knob}
            engine.apply(_scale(engine, knob, 1.0 + sign * TUNE_STEP))
            tunes.append(engine.compute(chromaticity=False).tune)
            engine.apply([Change(name, "current", value) for name, value in saved.items()])
        columns.append((tunes[0] - tunes[1]) / (2 * TUNE_STEP))
    return np.array(columns).T


@dataclass(frozen=True)
class StartRequest:
    """What a ring in operation is corrected to: the reference orbit (readings, m, x then y), with
    the tune knobs' family patterns (none: the tunes stay), through BPMs with these errors."""

    reference: np.ndarray
    tune_families: list[str]
    bpm_errors: BpmErrors
    settings: CorrectionSettings = field(default_factory=CorrectionSettings)


def start_in_operation(engine: Engine, request: StartRequest, working_point: np.ndarray,
                       report: Callable[[str], None] = lambda text: None) -> dict[str, float]:
    """Correct the engine's ring in place as a control room would before user operation, and return
    the converter settings that changed: the steerers, by the model's orbit response, until the BPM
    readings (their offsets, gains and rolls included, without noise) sit on the reference; the tune
    knobs, each family scaled as one, until the tunes sit on *working_point*. Alternates the two,
    since each moves the other a little."""
    engine.compute(chromaticity=False)  # the response is taken about the closed orbit of these errors
    steerers = engine.steerers()
    knobs = tune_knobs(engine, request.tune_families) if request.tune_families else []
    before = dict(engine.settings)
    converters = [engine.devices.converters[name] for name in steerers]
    corrector = OrbitCorrector(steerers, engine.orbit_response(steerers),
                               np.array([c.low for c in converters]), np.array([c.high for c in converters]),
                               np.full(len(steerers), np.inf), request.settings)
    tunes_per_knob = tune_response(engine, knobs) if knobs else None
    for iteration in range(START_ITERATIONS + 1):
        state = engine.compute(chromaticity=False)
        if not state.stable:
            raise ArithmeticError(f"no closed orbit while correcting: {state.reason}")
        error = np.concatenate(request.bpm_errors.read(state.x, state.y)) - request.reference
        miss = working_point - state.tune if knobs else np.zeros(2)
        report(f"after {iteration} iterations: readings {np.sqrt(np.mean(error**2)) * 1e3:.4f} mm rms from the "
               f"reference, tunes {-miss[0]:+.6f} {-miss[1]:+.6f} from the working point")
        if iteration == START_ITERATIONS:
            break
        currents = np.array([engine.settings[name] for name in steerers])
        corrected = corrector.step(currents, error)
        if np.max(np.abs(corrected - currents), initial=0.0) < SETTLED_A and np.max(np.abs(miss)) < SETTLED_TUNE:
            break  # as good as these steerers and knobs make it
        engine.apply([Change(n, "current", float(v)) for n, v in zip(steerers, corrected, strict=True)])
        if knobs:
            factors = 1.0 + np.linalg.solve(tunes_per_knob, miss)
            engine.apply([c for knob, f in zip(knobs, factors, strict=True) for c in _scale(engine, knob, f)])
    return {name: value for name, value in engine.settings.items() if value != before[name]}
