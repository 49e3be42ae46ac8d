"""What the model learns of a machine from measurements: BPM offsets, BPM gains, converter scales.

A reading of the calibrated model is ``gain · (model orbit) + offset`` per BPM and plane, and a
converter at *I* acts on the model's lattice as *scale · I* would: a steerer's calibration, or a
quadrupole family's relative gradient error. ``fit_response`` fits gains and scales LOCO-style to a
measured orbit response matrix; ``with_bba`` takes the offsets from beam-based alignment results.
The calibration is a JSON file that the shadow and a twin both load (``--calibration FILE``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from at import AtError

from .devices import SettingError
from .engine import Engine
from .state import Change

FORMAT = 1


class CalibrationError(ValueError):
    """A calibration file or measurement that cannot be used; the message says why."""


@dataclass
class Calibration:
    """Per BPM (by name) gain and offset (mm) per plane, and per converter a scale; absent: 1 or 0."""

    machine: str
    gain_x: dict[str, float] = field(default_factory=dict)
    gain_y: dict[str, float] = field(default_factory=dict)
    offset_x_mm: dict[str, float] = field(default_factory=dict)
    offset_y_mm: dict[str, float] = field(default_factory=dict)
    converter_scale: dict[str, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # which measurements, how well the fit went

    def readings(self, bpms: list[str], x_mm: np.ndarray, y_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the calibrated BPMs *bpms* show for a model orbit (*x_mm*, *y_mm*)."""
        def per_bpm(table: dict[str, float], default: float) -> np.ndarray:
            return np.array([table.get(name, default) for name in bpms])

        return (per_bpm(self.gain_x, 1.0) * x_mm + per_bpm(self.offset_x_mm, 0.0),
                per_bpm(self.gain_y, 1.0) * y_mm + per_bpm(self.offset_y_mm, 0.0))

    def scale(self, converter: str) -> float:
        return self.converter_scale.get(converter, 1.0)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path, machine: str, bpms: list[str], converters: list[str]) -> Calibration:
        """Read *path*, checking that it is of *machine* and names only its BPMs and converters."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise CalibrationError(f"{path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"{path}: not a calibration file of format {FORMAT}")
        if data.get("machine") != machine:
            raise CalibrationError(f"{path}: a calibration of {data.get('machine')!r}, not of {machine!r}")
        tables = {}
        for key, names in (("gain_x", bpms), ("gain_y", bpms), ("offset_x_mm", bpms), ("offset_y_mm", bpms),
                           ("converter_scale", converters)):
            tables[key] = _numbers(path, key, data.get(key, {}), set(names))
        return cls(machine, **tables, provenance=data.get("provenance", {}))


def _numbers(path: Path, key: str, table: object, known: set[str]) -> dict[str, float]:
    if not isinstance(table, dict):
        raise CalibrationError(f"{path}: {key} is not a table of names")
    unknown = sorted(set(table) - known)
    if unknown:
        raise CalibrationError(f"{path}: {key} names what the machine does not have: {', '.join(unknown[:5])}")
    try:
        values = {name: float(value) for name, value in table.items()}
    except (TypeError, ValueError):
        raise CalibrationError(f"{path}: {key} holds a value that is not a number") from None
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise CalibrationError(f"{path}: {key} of {', '.join(bad[:5])} is not finite")
    return values


# -- BPM offsets from beam-based alignment --------------------------------------------------------

def with_bba(calibration: Calibration, records: list[dict]) -> Calibration:
    """*calibration* with the BPM offsets that BBA measurements found: each a record (``params`` and
    ``result``) or its ``result`` alone, whose ``offset_um`` holds one offset per plane measured, in
    the order of its ``planes`` (the result's, else the request's, else x then y)."""
    for record in records:
        result = record.get("result", record) if isinstance(record, dict) else None
        if not isinstance(result, dict) or not result.get("bpm"):
            raise CalibrationError("a BBA result without its BPM")
        params = record.get("params") or {}
        planes = result.get("planes") or params.get("planes") or ["x", "y"]
        offsets = result.get("offset_um")
        if not isinstance(offsets, list) or len(offsets) != len(planes) or not set(planes) <= {"x", "y"}:
            raise CalibrationError(f"the BBA result of {result['bpm']} has offsets {offsets!r} for planes {planes!r}")
        for plane, offset in zip(planes, offsets, strict=True):
            try:
                offset_mm = float(offset) * 1e-3
            except (TypeError, ValueError):
                raise CalibrationError(f"the BBA offset of {result['bpm']} ({plane}) is {offset!r}") from None
            if math.isfinite(offset_mm):
                (calibration.offset_x_mm if plane == "x" else calibration.offset_y_mm)[result["bpm"]] = offset_mm
        calibration.provenance.setdefault("bba", []).append(result["bpm"])
    return calibration


# -- gains and scales from a measured orbit response (LOCO-style) -----------------------------------

def misfit_rms(measured: np.ndarray, g: np.ndarray, model: np.ndarray, s: np.ndarray) -> float:
    """rms of measured − diag(g) · model · diag(s)."""
    return float(np.sqrt(np.mean((measured - g[:, None] * model * s[None, :]) ** 2)))


@dataclass
class ResponseFit:
    """A Gauss-Newton fit of M = diag(g) · R(k) · diag(s) to a measured response M (mm/A): BPM gains g,
    steerer scales s, and the scales k of the quadrupole converters in the model R."""

    engine: Engine
    steerers: list[str]
    quadrupoles: list[str]
    gradient_step: float = 1e-4  # relative: the finite difference of each quadrupole's column
    # singular values below this fraction of the largest are left out: 1e-3 left some 60 % of BESSY II's
    # gradient errors unfitted (54 converters), 1e-5 leaves 3 % with 1 µm/A of noise (bench_calibration)
    cut: float = 1e-5

    def response(self, scales: np.ndarray) -> np.ndarray:
        base = {name: self.engine.settings[name] for name in self.quadrupoles}
        self.engine.apply([Change(n, "current", base[n] * k) for n, k in zip(self.quadrupoles, scales, strict=True)])
        try:
            return self.engine.orbit_response(self.steerers) * 1e3
        finally:
            self.engine.apply([Change(n, "current", v) for n, v in base.items()])

    def jacobian(self, k: np.ndarray, g: np.ndarray, s: np.ndarray, model: np.ndarray) -> np.ndarray:
        columns = []
        for i in range(len(k)):
            step = np.zeros_like(k)
            step[i] = self.gradient_step
            columns.append((g[:, None] * (self.response(k + step) - model) * s[None, :] / self.gradient_step).ravel())
        rows, cols = model.shape
        for i in range(rows):  # gains
            d = np.zeros_like(model)
            d[i] = model[i] * s
            columns.append(d.ravel())
        for j in range(cols):  # steerer scales
            d = np.zeros_like(model)
            d[:, j] = g * model[:, j]
            columns.append(d.ravel())
        return np.array(columns).T

    def direction(self, measured: np.ndarray, k: np.ndarray, g: np.ndarray, s: np.ndarray,
                  model: np.ndarray) -> np.ndarray:
        """The Gauss-Newton step from (k, g, s), whose model response is *model*: (Δk, Δg, Δs) in one array."""
        misfit = measured - g[:, None] * model * s[None, :]
        jac = self.jacobian(k, g, s, model)
        # columns of unit size, so that the cut treats gradients, gains and scales alike
        norms = np.linalg.norm(jac, axis=0)
        norms[norms == 0] = 1.0
        delta, *_ = np.linalg.lstsq(jac / norms, misfit.ravel(), rcond=self.cut)
        return delta / norms

    def solve(self, measured: np.ndarray, iterations: int = 8,
              tolerance: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """(k, g, s, rms of the misfit at the start and after each step taken), in mm/A. Steps until one
        lowers the misfit by less than *tolerance* (relative), or *iterations* steps. A step that would
        raise the misfit, or set a converter beyond its limits, is halved (three times at most); one that
        still does is not taken, and the fit ends."""
        rows, cols = measured.shape
        x = np.concatenate([np.ones(len(self.quadrupoles)), np.ones(rows), np.ones(cols)])
        parts = np.cumsum([len(self.quadrupoles), rows])
        k, g, s = np.split(x, parts)
        model = self.response(k)
        history = [misfit_rms(measured, g, model, s)]
        for _ in range(iterations):
            delta = self.direction(measured, k, g, s, model)
            for length in (1.0, 0.5, 0.25, 0.125):
                trial = x + length * delta
                k1, g1, s1 = np.split(trial, parts)
                try:
                    model1 = self.response(k1)
                except (SettingError, AtError, np.linalg.LinAlgError):  # beyond a range, or unstable: shorter
                    continue
                misfit = misfit_rms(measured, g1, model1, s1)
                if misfit < history[-1]:  # NaN (no closed orbit) is not
                    break
            else:
                break
            x, (k, g, s), model = trial, (k1, g1, s1), model1
            history.append(misfit)
            if misfit > history[-2] * (1 - tolerance):
                break
        return k, g, s, history


def fit_response(engine: Engine, machine: str, result: dict, calibration: Calibration | None = None,
                 iterations: int = 8) -> Calibration:
    """Gains, steerer scales and quadrupole scales fitted to an ORM result (``steerers``, ``bpms``,
    ``mm_per_A``: x of every BPM, then y), the *engine* set to the machine's converter values when
    it was measured."""
    try:
        steerers, bpms = list(result["steerers"]), list(result["bpms"])
        measured = np.asarray(result["mm_per_A"], dtype=float)
    except (KeyError, TypeError, ValueError) as err:
        raise CalibrationError(f"not an orbit response result: {err}") from None
    if measured.shape != (2 * len(bpms), len(steerers)) or not np.all(np.isfinite(measured)):
        raise CalibrationError(f"the response is {measured.shape}, not finite 2·{len(bpms)} × {len(steerers)}")
    quadrupoles = [c.name for c in engine.devices.of_kind("quadrupole")]
    fit = ResponseFit(engine, steerers, quadrupoles)
    k, g, s, history = fit.solve(measured, iterations)
    calibration = calibration or Calibration(machine)
    n = len(bpms)
    calibration.gain_x.update(zip(bpms, g[:n].tolist(), strict=True))
    calibration.gain_y.update(zip(bpms, g[n:].tolist(), strict=True))
    calibration.converter_scale.update(zip(steerers, s.tolist(), strict=True))
    calibration.converter_scale.update(zip(quadrupoles, k.tolist(), strict=True))
    calibration.provenance["orm"] = {"steerers": len(steerers), "bpms": n, "quadrupoles": len(quadrupoles),
                                     "misfit_rms_mm_per_A": history}
    return calibration


@dataclass
class KnownErrors:
    """An orbit response of a lattice with errors drawn at random, and the errors: what a fit must find."""

    quadrupoles: list[str]
    gradient: np.ndarray  # each quadrupole converter's scale
    steerers: list[str]
    gains: np.ndarray  # per BPM row (x of every BPM, then y)
    scales: np.ndarray  # per steerer
    mm_per_A: np.ndarray  # the measured response, with noise


def response_with_errors(engine: Engine, rng: np.random.Generator, gradient_rms: float = 0.005,
                         gain_rms: float = 0.05, scale_rms: float = 0.05, noise_mm_per_A: float = 1e-3) -> KnownErrors:
    """The orbit response of *engine*'s lattice with random quadrupole gradient errors, BPM gains and
    steerer scales, plus noise, and those errors (*engine* is left as it was): to check a fit against."""
    quadrupoles = [c.name for c in engine.devices.of_kind("quadrupole")]
    gradient = 1 + rng.normal(0, gradient_rms, len(quadrupoles))
    steerers = engine.steerers()
    response = ResponseFit(engine, steerers, quadrupoles).response(gradient)
    gains = 1 + rng.normal(0, gain_rms, response.shape[0])
    scales = 1 + rng.normal(0, scale_rms, response.shape[1])
    measured = gains[:, None] * response * scales[None, :] + rng.normal(0, noise_mm_per_A, response.shape)
    return KnownErrors(quadrupoles, gradient, steerers, gains, scales, measured)
