"""Independent linear-optics formulas that the tests hold the engine against.

They use only the Twiss functions of the unperturbed lattice (pyAT's linopt), never the engine's
closed-orbit search.
"""

from __future__ import annotations

import at
import numpy as np


def sliced_optics(ring: at.Lattice, index: int, slices: int = 16):
    """Twiss functions at the centres of *slices* equal pieces of element *index*."""
    pieces = ring[index].divide(np.full(slices, 1.0 / slices))
    sliced = at.Lattice(ring[:index] + pieces + ring[index + 1:], energy=ring.energy,
                        periodicity=ring.periodicity)
    # every element up to the slices' end: the phase advance is unwrapped along the refpts
    _, _, optics = sliced.get_optics(refpts=np.arange(index + slices + 1))
    edges = optics[index:]

    def centres(values):
        return 0.5 * (values[:-1] + values[1:])

    return centres(edges.beta), centres(edges.mu), centres(edges.dispersion[:, 0])


def _at_bpms(ring: at.Lattice, bpms: np.ndarray):
    """Optics at *bpms* in the order given (pyAT itself wants ascending refpts)."""
    ascending = np.sort(bpms)
    _, ringdata, optics = ring.get_optics(refpts=ascending)
    return ringdata, optics[np.searchsorted(ascending, bpms)]


def orbit_response(ring: at.Lattice, bpms: np.ndarray, kicker: int, plane: int, theta: float):
    """Closed-orbit change at *bpms* for a kick *theta* at element *kicker*, at fixed path length.

    Δx_i = θ [√(β_i β_j) cos(|φ_i − φ_j| − πQ) / (2 sin πQ) − η_i η_j / (α_c C)]; the second term
    (horizontal only) is the momentum change that keeps the path length, i.e. the RF, fixed.
    """
    _, bpm = _at_bpms(ring, bpms)
    _, _, end = ring.get_optics(refpts=len(ring))
    q = end.mu[-1, plane] / (2 * np.pi)
    beta_k, mu_k, eta_k = (np.mean(v, axis=0) for v in sliced_optics(ring, kicker))
    dphi = np.abs(bpm.mu[:, plane] - mu_k[plane])
    response = (np.sqrt(bpm.beta[:, plane] * beta_k[plane]) * np.cos(dphi - np.pi * q)
                / (2 * np.sin(np.pi * q)))
    if plane == 0:
        response -= bpm.dispersion[:, 0] * eta_k / (ring.get_mcf() * ring.circumference)
    return theta * response


def tune_shift(ring: at.Lattice, elements: list[int], dk: list[float]) -> np.ndarray:
    """First-order tune shift (ΔQx, ΔQy) = (+, −) Σ ⟨β⟩ ΔK L / 4π."""
    shift = np.zeros(2)
    for index, delta in zip(elements, dk, strict=True):
        beta, _, _ = sliced_optics(ring, index)
        shift += np.array([1.0, -1.0]) * beta.mean(axis=0) * delta * ring[index].Length / (4 * np.pi)
    return shift


def dispersion_orbit(ring: at.Lattice, bpms: np.ndarray, df_over_f: float) -> np.ndarray:
    """Horizontal orbit change η·δ of an RF step, with δ = −(Δf/f)/α_c."""
    _, bpm = _at_bpms(ring, bpms)
    return bpm.dispersion[:, 0] * (-df_over_f / ring.get_mcf())


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
