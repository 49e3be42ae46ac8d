"""Beam-based alignment, the physics: which BPM, which steerers, and how the orbit answers a quadrupole.

A quadrupole whose strength changes by ΔK kicks the beam by ΔK·L·(x̄ − x₀), x̄ the beam's mean
position in it and x₀ its magnetic centre. BBA moves the beam through the quadrupole and finds the
reading of a nearby BPM at which that kick vanishes. The reading tracks x̄ only if the steering
moves the beam in parallel at the quadrupole: a steering that also tilts it there moves the BPM by
the tilt times their distance, which shifts the zero crossing. ``alignment_bump`` therefore chooses
two steerers whose combination moves the BPM reading and x̄ by the same amount (the tilt between
them zero), from the linear optics of the lattice.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import at
import numpy as np

from .engine import Engine

KICK_FIELDS = {"x": "HKICK", "y": "VKICK"}


@dataclass(frozen=True)
class Bump:
    """Steerer currents (A per mm of beam displacement in the quadrupole) and the BPM read."""

    quadrupole: str
    plane: str
    bpm: str
    bpm_distance_m: float  # from the quadrupole's centre to the BPM, along the beam (negative: upstream)
    steerers: tuple[str, ...]
    amps_per_mm: tuple[float, ...]
    slope_bias_um_per_mm: float  # BPM reading minus x̄, per mm of bump: what a remaining tilt costs


def _element_of_magnet(engine: Engine, magnet: str) -> int:
    for converter in engine.devices.converters.values():
        for winding in converter.windings:
            if winding.magnet == magnet:
                return winding.element
    raise KeyError(f"{magnet!r} is not a magnet of this machine")


def nearest_bpm(engine: Engine, magnet: str) -> tuple[str, float]:
    """The BPM closest to the magnet's centre along the ring, and its signed distance (m)."""
    ring, element = engine.ring, _element_of_magnet(engine, magnet)
    s = ring.get_s_pos(range(len(ring) + 1))
    centre, circumference = s[element] + ring[element].Length / 2, s[-1]
    distances = [((s[b.element] - centre + circumference / 2) % circumference - circumference / 2, b.name)
                 for b in engine.devices.bpms]
    distance, name = min(distances, key=lambda d: abs(d[0]))
    return name, float(distance)


def kick_responses(engine: Engine, plane: str, kickers: list[int], points: list[int]) -> np.ndarray:
    """Closed-orbit position (m) at the entrances of *points* per radian of kick at each of *kickers*
    (the mean of a kicker's entrance and exit), linear optics of the lattice as set: (points, kickers)."""
    p = 0 if plane == "x" else 1
    refs = np.unique(np.array(points + kickers + [k + 1 for k in kickers] + [len(engine.ring)]))
    _, ringdata, optics = engine.ring.get_optics(refpts=refs, keep_lattice=True)
    at = {int(r): i for i, r in enumerate(refs)}
    q = float(ringdata.tune[p])
    beta_k = np.array([math.sqrt(optics.beta[at[k], p] * optics.beta[at[k + 1], p]) for k in kickers])
    phase_k = np.array([0.5 * (optics.mu[at[k], p] + optics.mu[at[k + 1], p]) for k in kickers])
    rows = [at[i] for i in points]
    beta_i, phase_i = optics.beta[rows, p][:, None], optics.mu[rows, p][:, None]
    response = np.sqrt(beta_i * beta_k) * np.cos(np.abs(phase_i - phase_k) - math.pi * q) / (2 * math.sin(math.pi * q))
    if plane == "x":  # at a fixed RF frequency the kick's path lengthening shifts the momentum
        eta_k = np.array([0.5 * (optics.dispersion[at[k], 0] + optics.dispersion[at[k + 1], 0]) for k in kickers])
        response -= optics.dispersion[rows, 0][:, None] * eta_k / (engine.ring.get_mcf() * engine.circumference)
    return response


def alignment_bump(engine: Engine, quadrupole: str, plane: str, candidates: int = 8,
                   steerers: list[str] | None = None) -> Bump:
    """The BPM beside *quadrupole* and the pair of the plane's *candidates* nearest steerers (or the
    given *steerers*: one or two) that moves the beam in parallel through it, with the largest
    displacement per ampere."""
    element = _element_of_magnet(engine, quadrupole)
    bpm, distance = nearest_bpm(engine, quadrupole)
    bpm_element = next(b.element for b in engine.devices.bpms if b.name == bpm)
    field = KICK_FIELDS[plane]
    windings = {c.name: w for c in engine.devices.converters.values() for w in c.windings if w.field == field}
    names = steerers or _nearest(engine, windings, element, candidates)
    unknown = [n for n in names if n not in windings]
    if unknown:
        raise KeyError(f"not steerers of plane {plane}: {unknown}")
    per_rad = kick_responses(engine, plane, [windings[n].element for n in names], [element, element + 1, bpm_element])
    per_amp = per_rad * np.array([windings[n].strength(1.0, engine.rigidity) for n in names])
    mean_q, at_bpm = 0.5 * (per_amp[0] + per_amp[1]), per_amp[2]  # m per A
    if len(names) == 1:
        weights, pair = np.array([1.0]), (0,)
    else:
        weights, pair = _best_pair(mean_q, at_bpm)
    shift = float(weights @ mean_q[list(pair)])
    amps = tuple(float(w) / (shift * 1e3) for w in weights)  # A per mm
    bias = float(weights @ (at_bpm - mean_q)[list(pair)]) / shift * 1e3  # um per mm
    return Bump(quadrupole, plane, bpm, distance, tuple(names[i] for i in pair), amps, bias)


def _nearest(engine: Engine, windings: dict, element: int, count: int) -> list[str]:
    n = len(engine.ring)
    return sorted(windings, key=lambda name: min(abs(windings[name].element - element),
                                                 n - abs(windings[name].element - element)))[:count]


def _best_pair(mean_q: np.ndarray, at_bpm: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Weights (unit norm) of the pair whose BPM reading moves exactly as x̄, largest x̄ per ampere."""
    tilt = at_bpm - mean_q
    best = (0.0, None, None)
    for a, b in itertools.combinations(range(len(mean_q)), 2):
        if abs(tilt[b]) < 1e-12 and abs(tilt[a]) < 1e-12:
            continue
        w = np.array([tilt[b], -tilt[a]])
        w /= np.linalg.norm(w)
        shift = abs(w @ mean_q[[a, b]])
        if shift > best[0]:
            best = (shift, w, (a, b))
    if best[1] is None:
        raise ArithmeticError("no pair of steerers moves the beam through the quadrupole")
    return best[1], best[2]


def _ring_index(engine: Engine, name: str) -> int:
    return next(b.element for b in engine.devices.bpms if b.name == name)


def bpm_across(engine: Engine, magnet: str, bpm: str) -> str:
    """The BPM nearest to *magnet* on the other side of it from *bpm*."""
    element, n = _element_of_magnet(engine, magnet), len(engine.ring)
    upstream = (element - _ring_index(engine, bpm)) % n < n / 2  # is *bpm* before the magnet?

    def gap(b) -> int:  # elements from the magnet to b, on the far side
        return (b.element - element) % n if upstream else (element - b.element) % n

    return min((b for b in engine.devices.bpms if b.name != bpm), key=gap).name


def centre_from_readings(engine: Engine, magnet: str, plane: str, readings: dict[str, float]) -> float:
    """Where the quadrupole's centre lies (m, in the BPMs' coordinates), from the readings of the BPMs
    on either side of it while the beam passes that centre (the quadrupole then gives no kick).

    The trajectory from the upstream BPM to the downstream one goes through the lattice between them,
    the quadrupole displaced by x₀; x₀ and the slope at the first BPM are the two numbers for which it
    meets the second reading and passes the quadrupole at x̄ = x₀. This takes out what the slope of
    the beam at the quadrupole does to the reading of a BPM beside it, which the zero crossing alone
    keeps (the BPM's distance times that slope)."""
    element, n = _element_of_magnet(engine, magnet), len(engine.ring)
    (first, x_first), (second, x_second) = sorted(readings.items(), key=lambda item: (
        _ring_index(engine, item[0]) - element - n / 2) % n)  # upstream first
    start, stop = _ring_index(engine, first), _ring_index(engine, second)
    span = [(start + k) % n for k in range((stop - start) % n + 1)]
    pieces = [engine.ring[i].deepcopy() for i in span]
    quad = span.index(element)
    line = at.Lattice(pieces, energy=engine.ring.energy)
    coordinate = 0 if plane == "x" else 2

    def miss(x0: float, slope: float) -> np.ndarray:
        at.shift_elem(line[quad], **({"dx": x0} if plane == "x" else {"dy": x0}))
        particle = np.zeros((6, 1))
        particle[coordinate], particle[coordinate + 1] = x_first, slope
        out = line.track(particle, refpts=[quad, quad + 1, len(line) - 1])[0][coordinate, 0, :, 0]
        return np.array([out[2] - x_second, 0.5 * (out[0] + out[1]) - x0])

    base = miss(0.0, 0.0)
    jacobian = np.column_stack([(miss(1e-4, 0.0) - base) / 1e-4, (miss(0.0, 1e-5) - base) / 1e-5])
    x0, _ = np.linalg.solve(jacobian, -base)
    return float(x0)


def quadrupole_step(engine: Engine, magnet: str, plane: str, span: float, orbit: float = 2e-4,
                    max_tune_shift: float = 0.01) -> float:
    """The change of the magnet's converter current (A) that makes the orbit answer a beam *span* (m) off
    its centre by *orbit* (m) at the BPM that answers most, within *max_tune_shift* in either plane."""
    element = _element_of_magnet(engine, magnet)
    winding = next(w for c in engine.devices.converters.values() for w in c.windings if w.magnet == magnet)
    k_per_amp = abs(winding.strength(1.0, engine.rigidity)) * engine.ring[element].Length  # ∫K per A
    bpms = [b.element for b in engine.devices.bpms]
    per_rad = np.max(np.abs(kick_responses(engine, plane, [element], bpms)))
    _, _, optics = engine.ring.get_optics(refpts=[element, element + 1])
    beta = optics.beta.mean(axis=0).max()
    wanted = orbit / (per_rad * span * k_per_amp)
    return float(min(wanted, max_tune_shift * 4 * math.pi / (beta * k_per_amp)))
