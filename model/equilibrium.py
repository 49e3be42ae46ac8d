"""The equilibrium of the radiating beam: emittances, energy spread, bunch length, damping times,
energy loss, beam sizes at source points, and the Touschek lifetime.

The ring of the engine (4D, with its magnet errors and settings) is copied with radiation and the
cavities on (``radiating``), and pyAT's Ohmi envelope gives the equilibrium beam matrix: mode
emittances with the coupling that rolled magnets and vertical dispersion make, the energy spread,
the bunch length and, at the source points, the full beam matrix, whose √Σ₁₁ and √Σ₃₃ are the beam
sizes (dispersion and coupling included).

One thing pyAT's tracking leaves out: the radiation of the wedges at a rectangular bend's edges. A
particle at x passes a bend whose pole face is turned by the edge angle e through a field that is
x·tan(e) shorter, so it loses less energy; the edge kick pyAT applies models the focusing of that
wedge, not its radiation. The radiation integrals have it (the edge term −η h² tan e of I4), which
is why pyAT's two methods disagree on the MLS (45° bends, 22.5° edges: J_x 0.86 by the envelope,
1.05 by the integrals, so εx 121 against 98.6 nm rad) and barely on BESSY II (11.25° bends). The
twin adds each wedge's radiation as a thin linear element, Δδ = C_γ E³ h² tan(e) x / 2π, so that
the envelope, which alone carries the coupling, agrees with the integrals (``add_wedge_radiation``).
Every bend is cut at its centre, where the beam sizes of a bend's source point are taken; pyAT's
diffusion matrix of a whole bend with edges is off in a way that only mirrored pairs cancel.

The Touschek lifetime follows Piwinski's formula as pyAT's ``get_lifetime`` states it, evaluated at
every element with a length (``touschek_rate``): a fixed Gauss–Legendre rule over all of them
at once instead of an adaptive integral per element, 50 to 100 times faster; the tests hold it to
pyAT's own implementation. The momentum acceptance is the smaller of the RF bucket's height and
the lattice's acceptance (a setting).
"""

from __future__ import annotations

import math
import time

import at
import numpy as np
from scipy.constants import c as SPEED_OF_LIGHT
from scipy.constants import physical_constants
from scipy.special import i0e

from .state import Equilibrium, EquilibriumSettings

C_GAMMA = 8.846e-5  # m/GeV³: the radiation constant of electrons, U0 = C_γ E⁴ I2 / 2π
ELECTRON_RADIUS = physical_constants["classical electron radius"][0]
ELEMENTARY_CHARGE = physical_constants["elementary charge"][0]
C_QUANTUM = 55 / (32 * math.sqrt(3)) * physical_constants["reduced Compton wavelength"][0]  # m, C_q
# Gauss–Legendre nodes and weights on [0, 1] for the Touschek integral
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(96)
_NODES, _WEIGHTS = 0.5 * (_NODES + 1.0), 0.5 * _WEIGHTS
TOUSCHEK_SPAN = 60.0  # the integral is cut where exp(-(B1 - B2) t) has fallen to e^-60


# -- the radiating ring ---------------------------------------------------------------------------


def _wedge(name: str, curvature: float, edge_angle: float, energy_gev: float) -> at.Element:
    """The energy change of a wedge's radiation, linear in x: a thin 6x6 matrix."""
    matrix = np.eye(6)
    matrix[4, 0] = C_GAMMA * energy_gev**3 * curvature**2 * math.tan(edge_angle) / (2 * math.pi)
    return at.M66(name, m66=matrix)


def add_wedge_radiation(ring: at.Lattice) -> at.Lattice:
    """*ring* with the radiation of every bend's edge wedges as a thin element beside the edge."""
    energy_gev = ring.energy / 1e9
    elements = []
    for element in ring:
        if not (isinstance(element, at.Dipole) and element.BendingAngle and element.Length):
            elements.append(element)
            continue
        curvature = element.BendingAngle / element.Length + element.PolynomB[0]
        entrance, exit_ = getattr(element, "EntranceAngle", 0.0), getattr(element, "ExitAngle", 0.0)
        if entrance:
            elements.append(_wedge(f"{element.FamName}_WEDGE_IN", curvature, entrance, energy_gev))
        elements.append(element)
        if exit_:
            elements.append(_wedge(f"{element.FamName}_WEDGE_OUT", curvature, exit_, energy_gev))
    return at.Lattice(elements, **ring.attrs)


def radiating(ring: at.Lattice, rf_frequency: float, points: dict[str, int]) -> tuple[at.Lattice, dict[str, int]]:
    """A 6D copy of the 4D *ring*, with wedge radiation and its cavities at *rf_frequency* (Hz);
    every bend, and every source point with a length (*points*: name -> index in *ring*), is cut
    at its centre. Returns the ring and the index of each point in it (its centre)."""
    ring6 = ring.enable_6d(copy=True)
    for cavity in ring6.get_elements(at.RFCavity):
        cavity.Frequency = rf_frequency * cavity.HarmNumber / ring.harmonic_number
    # Every bend is cut at its centre, not only those that are source points: pyAT's diffusion
    # matrix of a whole bend with edge angles is off (its B_xx can come out negative), an error
    # that cancels between the mirrored bends of a cell but not when one of them alone is cut.
    split = {index for index, e in enumerate(ring6) if isinstance(e, at.Dipole) and e.Length > 0}
    split |= {index for index in points.values() if ring6[index].Length > 0}
    elements = []
    for index, element in enumerate(ring6):
        elements.extend(_halves(element) if index in split else [element])
    ring6 = add_wedge_radiation(at.Lattice(elements, **ring6.attrs))
    # a point is where its element's second half starts (or the element itself, if thin)
    return ring6, {name: _locate(ring6, ring, index, index in split) for name, index in points.items()}


def _halves(element: at.Element) -> list[at.Element]:
    """*element* cut at its centre (pyAT keeps a bend's edges and fringes on its outer faces)."""
    return element.divide([0.5, 0.5])


def _locate(ring6: at.Lattice, ring: at.Lattice, index: int, halved: bool) -> int:
    """The index in *ring6* of element *index* of *ring* (its second half when *halved*)."""
    s = ring.get_s_pos(index)[0] + (ring[index].Length / 2 if halved else 0.0)
    name = ring[index].FamName
    positions = ring6.get_s_pos(range(len(ring6)))
    candidates = [i for i, e in enumerate(ring6) if e.FamName == name and abs(positions[i] - s) < 1e-9]
    if not candidates:
        raise ValueError(f"source point {name} not found in the radiating ring")
    return candidates[0]


# -- longitudinal ---------------------------------------------------------------------------------


def bucket_height(voltage: float, energy_loss: float, compaction: float, harmonic: int, energy: float) -> float:
    """Half height of the RF bucket, δ_max = √(2U0/(π|α_c| h E) · (√(q²−1) − arccos(1/q))), q = V/U0."""
    q = voltage / energy_loss
    if q <= 1.0:
        return 0.0
    shape = 2.0 * (math.sqrt(q * q - 1.0) - math.acos(1.0 / q))
    return math.sqrt(energy_loss / (math.pi * abs(compaction) * harmonic * energy) * shape)


# -- Touschek -------------------------------------------------------------------------------------


def _piwinski(tm: np.ndarray, t: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Piwinski's integrand in t = tan²κ (the factor dκ/dt included), per point (rows) and node."""
    tm, b1, b2 = tm[:, None], b1[:, None], b2[:, None]
    ratio = t / tm / (1 + t)
    shape = ((2 * t + 1) ** 2 * (ratio - 1) / t + t - np.sqrt(t * tm * (1 + t))
             - (2 + 1 / (2 * t)) * np.log(ratio))
    bessel = i0e(b2 * t) * np.exp((b2 - b1) * t)  # exp(-B1 t) I0(B2 t), without overflow
    return shape * bessel * np.sqrt(1 + t) / (2 * np.sqrt(t) * (1 + t))


def touschek_rate(optics, lengths: np.ndarray, emittance: tuple[float, float], energy_spread: float,
                  bunch_length: float, bunch_current: float, acceptance: float, gamma: float,
                  revolution_frequency: float) -> float:
    """The Touschek loss rate per electron (1/s): Piwinski's formula at each point of *optics* (pyAT's
    linear optics data), averaged over the ring with the points' *lengths* as weights."""
    beta2, gamma2 = 1.0 - 1.0 / gamma**2, gamma**2
    bxy, axy = optics.beta, optics.alpha
    dxy, dpxy = optics.dispersion[:, [0, 2]], optics.dispersion[:, [1, 3]]
    sigb2 = bxy * np.asarray(emittance)
    sigp2 = energy_spread**2
    sig2 = sigb2 + sigp2 * dxy**2
    dt2 = (dxy * axy + dpxy * bxy) ** 2
    sigh2 = 1.0 / (1.0 / sigp2 + np.sum((dxy**2 + dt2) / sigb2, axis=1))
    bs = bxy**2 / sigb2 * (1.0 - sigh2[:, None] * dt2 / sigb2)
    scale = 1.0 / (2 * beta2 * gamma2)
    b1 = scale * np.sum(bs, axis=1)
    b2 = np.sqrt(scale**2 * ((bs[:, 1] - bs[:, 0]) ** 2
                             + 4 * sigh2**2 * np.prod(bxy**2 * dt2, axis=1) / np.prod(sigb2**2, axis=1)))
    tm = np.full(len(b1), beta2 * acceptance**2)
    # integrate over u in [0, 1]: t = tm·exp(u·L), L reaching where exp(-(B1-B2)t) is negligible
    span = np.log1p(TOUSCHEK_SPAN / ((b1 - b2) * tm))
    t = tm[:, None] * np.exp(_NODES[None, :] * span[:, None])
    integral = np.sum(_piwinski(tm, t, b1, b2) * t * span[:, None] * _WEIGHTS, axis=1)
    electrons = bunch_current / revolution_frequency / ELEMENTARY_CHARGE
    volume = np.sqrt(np.prod(sig2, axis=1) - sigp2**2 * np.prod(dxy**2, axis=1))
    rate = (ELECTRON_RADIUS**2 * SPEED_OF_LIGHT * electrons / (8 * math.pi * gamma2 * bunch_length * volume)
            * 2 * np.sqrt(math.pi * (b1**2 - b2**2)) * integral)
    return float(np.sum(rate * lengths) / np.sum(lengths))


# -- the whole equilibrium ------------------------------------------------------------------------


def compute(ring: at.Lattice, rf_frequency: float, points: dict[str, int], settings: EquilibriumSettings,
            version: int = 0, guess: tuple[float, ...] = ()) -> Equilibrium:
    """The equilibrium of the 4D *ring* as the engine holds it (errors and settings in place), its
    cavities at *rf_frequency* (Hz); beam sizes at the source *points* (name -> element index).
    *guess*: where the search for the 6D closed orbit starts (the last equilibrium's orbit).

    Never raises for a bad lattice: an equilibrium that cannot be computed says why (``reason``).
    """
    start = time.perf_counter()
    result = Equilibrium(version)
    try:
        with np.errstate(all="ignore"):
            _fill(result, ring, rf_frequency, points, settings, guess)
    except Exception as err:  # noqa: BLE001 - no equilibrium is a state of the beam, not a crash
        result = Equilibrium(version, reason=f"{type(err).__name__}: {err}")
    result.compute_seconds = time.perf_counter() - start
    return result


def _fill(result: Equilibrium, ring: at.Lattice, rf_frequency: float, points: dict[str, int],
          settings: EquilibriumSettings, guess: tuple[float, ...]) -> None:
    ring6, located = radiating(ring, rf_frequency, points)
    refs = sorted(set(located.values()))
    # from the last orbit, the search skips pyAT's tracked first guess of the synchronous phase
    orbit, _ = at.find_orbit6(ring6, guess=np.array(guess) if len(guess) == 6 else None)
    if not np.all(np.isfinite(orbit)):
        raise ArithmeticError("no 6D closed orbit")
    emit0, beamdata, at_points = at.ohmi_envelope(ring6, refpts=np.array(refs, dtype=np.uint32), orbit=orbit)
    result.closed_orbit = tuple(float(v) for v in orbit)
    envelope = dict(zip(refs, at_points.r66, strict=True))
    if not np.all(np.isfinite(beamdata.mode_emittances[:2])) or beamdata.mode_emittances[0] <= 0:
        raise ArithmeticError("no equilibrium emittance (unstable motion)")
    # uncoupled lattice functions at every element's entrance (Piwinski's formula takes those)
    _, _, optics = ring.get_optics(refpts=range(len(ring) + 1), get_chrom=False, method=at.linopt2)
    revolution = rf_frequency / ring.harmonic_number
    result.damping_times = tuple(float(t) for t in 1.0 / revolution / beamdata.damping_rates / ring.periodicity)
    # the vertical emittance: the coupling's and the vertical dispersion's (the envelope), the
    # photons' opening angle (which pyAT leaves out), and the floor of the startup file
    opening = opening_angle_emittance(ring, optics.beta[:, 1], result.damping_times)
    floor = opening + settings.vertical_emittance_floor
    result.emittance = (float(beamdata.mode_emittances[0]), max(float(beamdata.mode_emittances[1]), 0.0) + floor)
    result.energy_spread = math.sqrt(emit0.r66[4, 4])
    result.bunch_length = math.sqrt(emit0.r66[5, 5])
    result.energy_loss = energy_loss(ring)
    for name, index in located.items():
        sigma = envelope[index]  # the floor adds a vertical beam of that emittance at the point
        beta_y = _centre_beta_y(ring, points[name], optics[points[name]])
        result.beam_sizes[name] = (math.sqrt(max(sigma[0, 0], 0.0)), math.sqrt(max(sigma[2, 2], 0.0) + floor * beta_y))
    _touschek(result, ring, ring6, optics, settings)


def _centre_beta_y(ring: at.Lattice, index: int, entrance) -> float:
    """β_y at the centre of element *index*, carried from its entrance (*entrance*: pyAT's optics)."""
    if not ring[index].Length:
        return float(entrance.beta[1])
    half = at.find_elem_m66(ring[index].divide([0.5, 0.5])[0], energy=ring.energy)
    beta, alpha = entrance.beta[1], entrance.alpha[1]
    m33, m34 = half[2, 2], half[2, 3]
    return float(m33**2 * beta - 2 * m33 * m34 * alpha + m34**2 * (1 + alpha**2) / beta)


def energy_loss(ring: at.Lattice) -> float:
    """Energy radiated per turn (eV) in the bends as they are set, U0 = C_γ E⁴ ∮h² ds / 2π."""
    square = sum((e.BendingAngle / e.Length + e.PolynomB[0]) ** 2 * e.Length
                 for e in ring if isinstance(e, at.Dipole) and e.Length > 0)
    return C_GAMMA * (ring.energy / 1e9) ** 4 * square / (2 * math.pi) * 1e9


def opening_angle_emittance(ring: at.Lattice, beta_y: np.ndarray, damping_times: tuple[float, ...]) -> float:
    """The vertical emittance that the photons' opening angle excites in a flat ring,
    (13/55) C_q / J_y · ∮β_y|h|³ds / ∮h²ds (Raubenheimer), with β_y at each element's entrance
    (*beta_y*, one more than elements) averaged over the bends' ends."""
    cubic = square = 0.0
    for index, element in enumerate(ring):
        if isinstance(element, at.Dipole) and element.Length > 0 and element.BendingAngle:
            h = abs(element.BendingAngle / element.Length)
            cubic += 0.5 * (beta_y[index] + beta_y[index + 1]) * h**3 * element.Length
            square += h**2 * element.Length
    rates = 1.0 / np.asarray(damping_times)
    partition_y = 4.0 * rates[1] / np.sum(rates)
    return 13 / 55 * C_QUANTUM / partition_y * cubic / square if square else 0.0


def _touschek(result: Equilibrium, ring: at.Lattice, ring6: at.Lattice, optics, settings: EquilibriumSettings) -> None:
    """The momentum acceptance and the Touschek lifetime of the equilibrium in *result*; *optics* at
    every element's entrance."""
    voltage = sum(c.Voltage for c in ring6.get_elements(at.RFCavity) if c.HarmNumber == ring.harmonic_number)
    result.bucket_height = bucket_height(voltage, result.energy_loss, ring.get_mcf(), ring.harmonic_number,
                                         ring.energy)
    result.momentum_acceptance = min(result.bucket_height, settings.momentum_acceptance)
    refs = np.array([i for i, e in enumerate(ring) if e.Length > 0])
    lengths = np.array([ring[i].Length for i in refs])
    result.bunches = settings.bunches or ring.harmonic_number
    result.bunch_current = settings.nominal_current_mA * 1e-3 / result.bunches
    rate = touschek_rate(optics[refs], lengths, result.emittance, result.energy_spread, result.bunch_length,
                         result.bunch_current, result.momentum_acceptance, ring.gamma, ring.revolution_frequency)
    result.touschek_lifetime = 1.0 / rate if rate > 0 else math.inf
