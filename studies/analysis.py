"""The analyses: from a measurement's raw data to its result, with uncertainties. Pure numpy, no EPICS.

Every measurement ends as an ``Analysis``: its kind, the parameters it ran with, the raw data (what
was set and read, step by step), the result in hardware units (each key named with its unit), and
its provenance (machine, times, on a twin its seed and lattice versions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Analysis:
    """One measurement as data: parameters, raw data, result and provenance."""

    kind: str
    params: dict
    raw: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return plain(asdict(self))


def plain(value):
    """*value* with numpy arrays and scalars made into lists and floats (NaN as None), for JSON."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Slope, intercept and their covariance of the least-squares line through (x, y)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    design = np.column_stack([x, np.ones_like(x)])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = max(1, len(x) - 2)
    residual = y - design @ coef
    covariance = np.linalg.inv(design.T @ design) * float(residual @ residual) / dof
    return float(coef[0]), float(coef[1]), covariance


def bba_zero_crossing(positions_mm: np.ndarray, responses_mm: np.ndarray) -> dict:
    """The BPM reading (mm) at which the orbit stops answering the quadrupole, and its sigma.

    *responses_mm*: the orbit change that the quadrupole's step made, one row per beam position.
    All rows share one shape (the orbit of a kick at the quadrupole); its signed size is the
    projection on their first singular vector, which is linear in the beam's offset there.
    """
    responses = np.asarray(responses_mm, float)
    _, _, vt = np.linalg.svd(responses, full_matrices=False)
    size = responses @ vt[0]
    slope, intercept, cov = line_fit(positions_mm, size)
    centre = -intercept / slope
    # sigma of -b/a: gradient (b/a², -1/a) through the covariance of (a, b)
    gradient = np.array([intercept / slope**2, -1.0 / slope])
    sigma = math.sqrt(max(0.0, float(gradient @ cov @ gradient)))
    return {"centre_mm": centre, "sigma_mm": sigma, "size_mm": size, "slope": slope, "intercept_mm": intercept}


def odd_point(offsets, *readings, floor_mm: float = 0.01, factor: float = 8.0) -> int | None:
    """The index of the one point whose reading lies off the straight line through the others (by more
    than *factor* times their scatter and *floor_mm*), in any of *readings* against *offsets*; None."""
    offsets = np.asarray(offsets, float)
    worst, index = 0.0, None
    for values in readings:
        values = np.asarray(values, float)
        for k in range(len(offsets)):
            others = np.arange(len(offsets)) != k
            slope, intercept, _ = line_fit(offsets[others], values[others])
            scatter = np.std(values[others] - (slope * offsets[others] + intercept))
            miss = abs(values[k] - (slope * offsets[k] + intercept))
            if miss > max(floor_mm, factor * scatter) and miss > worst:
                worst, index = miss, k
    return index


def response_columns(deltas_mm: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Response (mm per unit) from orbit changes *deltas_mm* (one row per step) of *steps* (units)."""
    return (np.asarray(deltas_mm, float) / np.asarray(steps, float)[:, None]).T


def momentum_offset(rf_change_khz: np.ndarray, rf_khz: float, compaction: float) -> np.ndarray:
    """δ of a change of the RF frequency at a fixed orbit length: −Δf / (f α_c) (ultra-relativistic)."""
    return -np.asarray(rf_change_khz, float) / (rf_khz * compaction)


def chromaticity_fit(deltas: np.ndarray, tunes: np.ndarray) -> tuple[float, float]:
    """ξ = dQ/dδ at δ = 0 and its sigma: a line through three points, a parabola through more
    (the second-order chromaticity otherwise biases a wide scan)."""
    deltas, tunes = np.asarray(deltas, float), np.asarray(tunes, float)
    degree = 2 if len(deltas) >= 5 else 1
    coef, cov = np.polyfit(deltas, tunes, degree, cov=len(deltas) > degree + 2)
    sigma = math.sqrt(cov[-2, -2]) if np.ndim(cov) == 2 else math.nan
    return float(coef[-2]), sigma


def truncated_inverse(response: np.ndarray, singular_values: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-inverse keeping the *singular_values* largest (all when None), and the singular values."""
    u, s, vt = np.linalg.svd(response, full_matrices=False)
    keep = len(s) if singular_values is None else max(1, min(int(singular_values), len(s)))
    return (vt[:keep].T / s[:keep]) @ u[:, :keep].T, s


def rms(values) -> float:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values**2))) if values.size else math.nan
