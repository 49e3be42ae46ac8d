"""The physics engine: settings in, beam state out.

Two calls make the whole interface (the seed paper's "update the lattice" and "propagate"):

* ``apply(changes)`` takes a batch of ``Change(device, quantity, value)`` in engineering units,
  checks all of them, writes them into the lattice and returns the new lattice version;
* ``compute()`` returns the ``BeamState`` of the current version.

The ring is tracked in 4D (no radiation, no cavities). The RF frequency enters through the path
length: a closed orbit at frequency f must be h*c/f long, so the engine solves for the 4D orbit of
path lengthening dct = -C*df/f, which yields the momentum offset and the dispersive orbit together.
Horizontal kicks therefore also shift the momentum, as on a real ring with a fixed RF frequency.
Only what the published PVs need is computed: the orbit at the BPMs, the one-turn matrix (tunes,
dispersion, α_c) and, when magnets changed, the one-turn matrices at δ ± h (chromaticity); see
``_closed_orbit``. Nothing is computed at every element.

The longitudinal plane is linear and analytic: with the momentum compaction α_c of the 4D ring, the
main cavities' voltage V and the energy loss per turn U0 (radiation integral of the design ring),
the synchrotron tune is Qs = sqrt(h |α_c| sqrt(V² − U0²) / (2π E)). Below V = U0 there is no RF bucket
and the beam is lost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path

import at
import numpy as np
from at.physics.amat import a_matrix
from at.tracking.atpass import atpass

from .devices import ELEMENT_FIELDS, SPEED_OF_LIGHT, DeviceMap, SettingError
from .lattice_io import load_lattice
from .realism import Misalignment, Realism
from .state import BeamState, Change
from .tables import MachineTables

__all__ = ["BeamState", "Change", "Engine", "SettingError", "build_engine"]

ORBIT_STEP = 3e-8  # m, rad and δ: the finite-difference step of the Jacobian (pyAT's XYStep)
ORBIT_TOLERANCE = 1e-10  # the Newton step below which the orbit is converged
MAX_ORBIT_ITERATIONS = 20
CHROMATICITY_STEP = 3e-6  # δ step of the chromaticity (pyAT's DPStep)
MAX_TUNE_CONTINUATION = 0.1  # a larger jump of a fractional tune recounts the integer part


def _displaced(centre: np.ndarray, n: int, step: float) -> np.ndarray:
    """Particles (6, 2n) at *centre* (its leading coordinates, the rest 0), moved by +*step* along
    each of the first *n* coordinates, then by -*step*; n = 0 gives the centre alone, (6, 1)."""
    bundle = np.zeros((6, max(2 * n, 1)))
    bundle[:len(centre)] = centre[:, None]
    bundle[:n, :n] += step * np.eye(n)
    bundle[:n, n:2 * n] -= step * np.eye(n)
    return bundle


def _central_difference(out: np.ndarray, n: int, step: float) -> np.ndarray:
    """∂(coordinates)/∂(displacement j) from tracked particles laid out as ``_displaced(..., n, step)``."""
    return (out[:, :n] - out[:, n:2 * n]) / (2 * step)


class Engine:
    """A ring, its device map and the current settings."""

    def __init__(self, ring: at.Lattice, devices: DeviceMap, aperture: tuple[float, float] | None = None):
        """*aperture*: the half-widths (x, y) in m that the orbit must stay within at the BPMs."""
        self.ring = ring.disable_6d(copy=True)
        self.devices = devices
        self.aperture = aperture
        self.rigidity = ring.energy / SPEED_OF_LIGHT  # T.m, relativistic electrons
        self.circumference = ring.circumference
        self.design_rf = devices.rf.default * 1e3
        self.energy_loss = float(ring.energy_loss)  # eV per turn, from the design dipoles
        self._main_cavities = [i for i, e in enumerate(self.ring) if isinstance(e, at.RFCavity)
                               and e.HarmNumber == ring.harmonic_number]
        self._bends = [(w.element, self.ring[w.element].BendingAngle / self.ring[w.element].Length)
                       for c in devices.converters.values() for w in c.windings if w.field == "BEND"]
        self.version = 0
        self.settings: dict[str, float] = {}
        self.misalignments: dict[str, Misalignment] = {}  # magnet -> its error against the design
        self._bpm_refs = np.array([b.element for b in devices.bpms])  # in the machine's BPM order
        # pyAT wants ascending refpts; the orbit comes back in lattice order and is put in BPM order
        self._bpm_sorted = np.sort(self._bpm_refs)
        self._bpm_order = np.searchsorted(self._bpm_sorted, self._bpm_refs)
        # Optics are taken at the BPMs, every magnet and the ring's end. The phase advance is
        # unwrapped along these points, so they must lie well under pi apart; the last one gives
        # the whole tune.
        magnets = [w.element for c in devices.converters.values() for w in c.windings]
        self._optics_refs = np.unique(np.concatenate([self._bpm_refs, magnets, [len(self.ring)]]))
        self._track_refs = np.append(self._bpm_sorted, len(self.ring)).astype(np.uint32)
        self._end_ref = np.array([len(self.ring)], dtype=np.uint32)
        self._parsed = False  # whether pyAT's cached copy of the ring is current
        self._orbit_guess = np.zeros(5)  # the last closed orbit (x, x', y, y', δ): where the next search starts
        self._tune = np.full(2, np.nan)
        self._last_chromaticity = np.full(2, np.nan)
        self._write({name: c.default for name, c in devices.converters.items()})

    @classmethod
    def from_folder(cls, folder: Path, aperture: tuple[float, float] | None = None) -> Engine:
        """An engine for the machine whose tables and ``lattice.json`` are in *folder*."""
        return cls.from_tables(MachineTables(folder), aperture)

    @classmethod
    def from_tables(cls, tables: MachineTables, aperture: tuple[float, float] | None = None) -> Engine:
        ring = load_lattice(tables.folder / "lattice.json")
        return cls(ring, DeviceMap.from_tables(ring, tables), aperture)

    def misalign(self, errors: dict[str, Misalignment]) -> None:
        """Shift and roll magnets (by magnet name) against the design. These errors replace the
        earlier ones: a magnet they do not name goes back to the design. A new lattice version."""
        elements = {w.magnet: w.element for c in self.devices.converters.values() for w in c.windings}
        unknown = set(errors) - set(elements)
        if unknown:
            raise SettingError(f"no magnets {sorted(unknown)}")
        for name in self.misalignments.keys() - errors.keys():
            at.transform_elem(self.ring[elements[name]], dx=0.0, dy=0.0, tilt=0.0)
        for name, e in errors.items():
            at.transform_elem(self.ring[elements[name]], dx=e.dx, dy=e.dy, tilt=e.roll)
        self.misalignments = dict(errors)
        self._parsed = False  # new T1/T2/R1/R2 arrays
        self.version += 1

    # -- update the lattice ---------------------------------------------------------------------

    def _sort(self, changes: Iterable[Change]) -> tuple[dict[str, float], dict[str, str]]:
        """Check each change once: the new settings of the good ones, the reason for each bad one."""
        accepted, refused = {}, {}
        for device, quantity, value in changes:
            try:
                accepted[device] = self.devices.check(device, quantity, value)
            except SettingError as err:
                refused[device] = str(err)
        return accepted, refused

    def check(self, changes: Iterable[Change]) -> dict[str, float]:
        """Validate a batch; return the new settings it makes, or raise ``SettingError``."""
        accepted, refused = self._sort(changes)
        if refused:
            raise SettingError("; ".join(refused.values()))
        return accepted

    def apply(self, changes: Iterable[Change]) -> int:
        """Apply a batch of changes atomically and return the new lattice version.

        Nothing is applied if any change is refused; an empty batch keeps the version.
        """
        return self._commit(self.check(changes))

    def apply_valid(self, changes: Iterable[Change]) -> tuple[dict[str, float], dict[str, str]]:
        """Apply the good changes of a batch as one new lattice version (none if there are none);
        return the settings applied and, for each refused change, why."""
        accepted, refused = self._sort(changes)
        self._commit(accepted)
        return accepted, refused

    def _commit(self, accepted: dict[str, float]) -> int:
        if accepted:
            self._write(accepted)
            self.version += 1
        return self.version

    def _write(self, settings: dict[str, float]) -> None:
        for name, value in settings.items():
            self.settings[name] = value
            for w in self.devices.converters[name].windings:
                attribute, index = ELEMENT_FIELDS[w.field]
                element, strength = self.ring[w.element], w.strength(value, self.rigidity)
                if w.field == "BEND":  # the field beyond the design bend, as a dipole error
                    strength = (strength - 1.0) * element.BendingAngle / element.Length
                if index is None:
                    setattr(element, attribute, strength)
                else:
                    getattr(element, attribute)[index] = strength

    @property
    def rf_frequency(self) -> float:
        return self.settings[self.devices.rf.name] * 1e3

    @property
    def rf_voltage(self) -> float:
        """Total voltage of the cavities at the ring's harmonic number, V."""
        return float(sum(self.ring[i].Voltage for i in self._main_cavities))

    @property
    def energy(self) -> float:
        """The beam energy the dipoles are set for (the design energy scaled by their field), eV."""
        if not self._bends:
            return float(self.ring.energy)
        ratios = [1.0 + self.ring[i].PolynomB[0] / curvature for i, curvature in self._bends]
        return float(self.ring.energy * np.mean(ratios))

    def _check_aperture(self, orbits: np.ndarray) -> None:
        if self.aperture is None:
            return
        for plane, column, half_width in (("x", 0, self.aperture[0]), ("y", 2, self.aperture[1])):
            worst = int(np.argmax(np.abs(orbits[:, column])))
            if abs(orbits[worst, column]) > half_width:
                raise ArithmeticError(f"orbit beyond the aperture: {plane} = {orbits[worst, column] * 1e3:.2f} mm "
                                      f"at {self.devices.bpms[worst].name} (limit {half_width * 1e3:g} mm)")

    def synchrotron_tune(self, compaction: float) -> float:
        """Small-amplitude synchrotron tune; raises ``ArithmeticError`` when there is no RF bucket."""
        voltage = self.rf_voltage
        if voltage <= self.energy_loss:
            raise ArithmeticError(f"RF voltage {voltage / 1e3:.1f} kV does not cover the energy loss "
                                  f"of {self.energy_loss / 1e3:.1f} kV per turn")
        return math.sqrt(self.ring.harmonic_number * abs(compaction) * math.sqrt(voltage**2 - self.energy_loss**2)
                         / (2 * math.pi * self.ring.energy))

    # -- propagate ------------------------------------------------------------------------------

    def compute(self, chromaticity: bool = True) -> BeamState:
        """Closed orbit at the BPMs, tunes, α_c and (optionally) chromaticities of the current version.

        Never raises for a bad setting: a ring with no stable closed orbit gives ``stable=False``.
        """
        start = time.perf_counter()
        f_rf = self.rf_frequency
        state = BeamState(
            version=self.version, stable=False,
            x=np.full(len(self._bpm_refs), np.nan), y=np.full(len(self._bpm_refs), np.nan),
            tune=np.full(2, np.nan), chromaticity=np.full(2, np.nan), momentum_offset=math.nan,
            rf_frequency=f_rf, revolution_frequency=f_rf / self.ring.harmonic_number, energy=self.energy)
        try:
            with np.errstate(all="ignore"):
                orbit, at_bpms, jacobian = self._closed_orbit(dct=-self.circumference * (f_rf - self.design_rf) / f_rf)
                at_bpms = at_bpms[:, self._bpm_order]
                self._check_aperture(at_bpms.T)
                one_turn = jacobian[:4, :4] + np.eye(4)
                fractional = self._fractional_tunes(one_turn)
                dispersion = np.linalg.solve(np.eye(4) - one_turn, jacobian[:4, 4])
                state.x, state.y = at_bpms[0].copy(), at_bpms[2].copy()
                state.tune = self._whole_tunes(fractional, orbit)
                state.momentum_offset = float(orbit[4])
                # path lengthening per turn of the dispersive orbit: α_c C = ∂ct/∂x·η + ∂ct/∂δ
                state.momentum_compaction = float((jacobian[4, :4] @ dispersion + jacobian[4, 4]) / self.circumference)
                if chromaticity:
                    self._last_chromaticity = self._chromaticity(orbit, dispersion)
            state.chromaticity = self._last_chromaticity.copy()
            if self._main_cavities:
                state.synchrotron_tune = self.synchrotron_tune(state.momentum_compaction)
            state.stable = True
        except Exception as err:  # noqa: BLE001 - any failure of the physics means: no beam
            state.reason = f"{type(err).__name__}: {err}"
        state.compute_seconds = time.perf_counter() - start
        return state

    # The orbit, the one-turn matrix and the dispersion all come from tracking small bundles of
    # particles with pyAT's C tracker, reusing its parsed copy of the ring between calls: the
    # converters write into the elements' arrays in place, which the parsed copy sees. Misalignments
    # replace arrays, so they make the next pass parse the ring again; so does pyAT itself when
    # another lattice was tracked in between.

    def _track(self, bundle: np.ndarray, refpts: np.ndarray) -> np.ndarray:
        """Track the particles in *bundle* (6, n) one turn; coordinates (6, n, len(refpts)).

        Calls pyAT's C tracker directly: ``lattice_pass`` would first walk every element in Python
        (variable elements, beam monitors, cavities), which costs as much as the tracking itself on
        a ring of a thousand elements. This ring has none of those.
        """
        out = atpass(self.ring, np.asfortranarray(bundle), 1, refpts=refpts, reuse=self._parsed)
        self._parsed = True
        return out[..., 0]

    def _closed_orbit(self, dct: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Newton's method on z = (x, x', y, y', δ): one turn brings z back with path lengthening *dct*.

        Each iteration tracks z and z ± h e_j for the five unknowns through the BPMs to the end of
        the ring: the central differences give the Jacobian J of the residual (whose top-left 4x4
        block is the one-turn matrix minus one) and, at the BPMs, the transfer matrices that carry
        the last Newton step to the BPM readings. Starting from the previous orbit it needs two
        passes for a small change. Returns (z, the 6D coordinates at the BPMs in lattice order, J).
        """
        z = self._orbit_guess.copy()
        for _ in range(MAX_ORBIT_ITERATIONS):
            out = self._track(np.hstack([_displaced(z, 5, ORBIT_STEP), _displaced(z, 0, 0.0)]), self._track_refs)
            derivative = _central_difference(out, 5, ORBIT_STEP)  # (6, 5, refpts): ∂(coordinates)/∂z
            centre, end = out[:, 10, :-1], out[:, 10, -1]
            residual = np.append(end[:4] - z[:4], end[5] - dct)
            jacobian = np.vstack([derivative[:4, :, -1] - np.eye(4, 5), derivative[5, :, -1]])
            step = -np.linalg.solve(jacobian, residual)
            if not np.all(np.isfinite(step)):
                raise ArithmeticError("no finite closed orbit")
            if np.max(np.abs(step)) < ORBIT_TOLERANCE:
                at_bpms = centre + np.einsum("ijk,j->ik", derivative[:, :, :-1], step)
                self._orbit_guess = z + step
                return z + step, at_bpms, jacobian
            z += step
        self._orbit_guess = np.zeros(5)
        raise ArithmeticError(f"the closed-orbit search did not converge in {MAX_ORBIT_ITERATIONS} iterations")

    @staticmethod
    def _fractional_tunes(one_turn: np.ndarray) -> np.ndarray:
        """The two (coupled) betatron tunes in [0, 1) of a 4x4 one-turn matrix."""
        if np.any(np.abs(np.abs(np.linalg.eigvals(one_turn)) - 1.0) > 1e-6):
            raise ArithmeticError("no stable betatron motion: the tunes sit in a stop band")
        _, eigenvalues = a_matrix(one_turn)
        return np.mod(np.angle(eigenvalues) / (2 * math.pi), 1.0)

    def _whole_tunes(self, fractional: np.ndarray, orbit: np.ndarray) -> np.ndarray:
        """Add the integer parts: continue from the last tunes when the fractional parts moved a
        little, otherwise count the phase advance around the ring (pyAT's linear optics)."""
        last = self._tune
        if np.all(np.isfinite(last)):
            moved = np.mod(fractional - last + 0.5, 1.0) - 0.5
            if np.all(np.abs(moved) < MAX_TUNE_CONTINUATION):
                self._tune = last + moved
                return self._tune.copy()
        _, _, optics = self.ring.get_optics(refpts=self._optics_refs, orbit=np.append(orbit, 0.0), keep_lattice=True)
        self._tune = optics.mu[-1] / (2 * math.pi)
        return self._tune.copy()

    def _chromaticity(self, orbit: np.ndarray, dispersion: np.ndarray) -> np.ndarray:
        """dQ/dδ by central differences: the one-turn matrices on the dispersion orbits at δ ± h.

        The first-order orbits z ± h(η, 1) suffice: their second-order error is the same on both
        sides and cancels from the difference of the tunes.
        """
        h = CHROMATICITY_STEP
        centres = [orbit + sign * h * np.append(dispersion, 1.0) for sign in (1.0, -1.0)]
        end = self._track(np.hstack([_displaced(c, 4, ORBIT_STEP) for c in centres]), self._end_ref)[:, :, 0]
        tunes = [self._fractional_tunes(_central_difference(end[:, 8 * s:8 * s + 8], 4, ORBIT_STEP)[:4])
                 for s in (0, 1)]
        return (np.mod(tunes[0] - tunes[1] + 0.5, 1.0) - 0.5) / (2 * h)


    # -- linear response ----------------------------------------------------------------------

    def steerers(self) -> list[str]:
        """The steering converters (horizontal, then vertical), in the converter table's order."""
        return [c.name for kind in ("hsteerer", "vsteerer") for c in self.devices.of_kind(kind)]

    def bpm_optics(self) -> dict[str, np.ndarray]:
        """The linear optics of the current lattice at the BPMs, in the machine's BPM order: s (m),
        β and η (m) per plane, from pyAT's ``get_optics`` on the current closed orbit."""
        orbit = np.append(self._orbit_guess, 0.0)
        _, _, optics = self.ring.get_optics(refpts=self._bpm_sorted, orbit=orbit, keep_lattice=True)
        order = self._bpm_order
        return {"s_m": optics.s_pos[order], "beta_x_m": optics.beta[order, 0], "beta_y_m": optics.beta[order, 1],
                "eta_x_m": optics.dispersion[order, 0], "eta_y_m": optics.dispersion[order, 2]}

    def orbit_response(self, steerers: list[str] | None = None) -> np.ndarray:
        """∂(BPM readings x then y, m)/∂(steerer current, A) of the current lattice at a fixed RF
        frequency, from its linear optics (uncoupled):

            R_ij = √(β_i β_j) cos(|φ_i − φ_j| − πQ) / (2 sin πQ)  −  η_i η_j / (α_c C)   (x)

        the second term being the momentum shift a kick's path lengthening η_j θ_j makes at a fixed
        RF frequency. A steerer's optics are the mean of its element's entrance and exit.
        """
        names = steerers or self.steerers()
        windings = [(j, w) for j, name in enumerate(names) for w in self.devices.converters[name].windings
                    if w.field in ("HKICK", "VKICK")]
        kick_refs = np.array([w.element for _, w in windings], dtype=int)
        refs = np.unique(np.concatenate([self._bpm_refs, kick_refs, kick_refs + 1, [len(self.ring)]]))
        orbit = np.append(self._orbit_guess, 0.0)
        _, ringdata, optics = self.ring.get_optics(refpts=refs, orbit=orbit, keep_lattice=True)
        at_ref = {int(r): i for i, r in enumerate(refs)}
        tune = ringdata.tune if np.all(np.isfinite(ringdata.tune)) else self._tune % 1.0
        compaction = self._compaction(orbit)
        bpm = np.array([at_ref[int(r)] for r in self._bpm_refs])
        response = np.zeros((2 * len(self._bpm_refs), len(names)))
        for j, w in windings:
            plane = 0 if w.field == "HKICK" else 1
            entrance, exit_ = at_ref[w.element], at_ref[w.element + 1]
            beta_j = np.sqrt(optics.beta[entrance, plane] * optics.beta[exit_, plane])
            phase_j = 0.5 * (optics.mu[entrance, plane] + optics.mu[exit_, plane])
            q = tune[plane] + 0.0
            column = (np.sqrt(optics.beta[bpm, plane] * beta_j) / (2 * math.sin(math.pi * q))
                      * np.cos(np.abs(optics.mu[bpm, plane] - phase_j) - math.pi * q))
            if plane == 0:
                eta_j = 0.5 * (optics.dispersion[entrance, 0] + optics.dispersion[exit_, 0])
                column -= optics.dispersion[bpm, 0] * eta_j / (compaction * self.circumference)
            response[plane * len(bpm):(plane + 1) * len(bpm), j] += column * w.strength(1.0, self.rigidity)
        return response

    def _compaction(self, orbit: np.ndarray) -> float:
        """α_c of the current lattice, from the one-turn map of the closed orbit *orbit*."""
        out = self._track(_displaced(orbit[:5], 5, ORBIT_STEP), self._end_ref)[:, :, 0]
        jacobian = _central_difference(out, 5, ORBIT_STEP)
        dispersion = np.linalg.solve(np.eye(4) - jacobian[:4, :4], jacobian[:4, 4])
        return float((jacobian[5, :4] @ dispersion + jacobian[5, 4]) / self.circumference)


def build_engine(folder: Path, realism: Realism) -> Engine:
    """The engine of a machine as a twin with *realism* runs it: its aperture, its magnets misaligned."""
    tables = MachineTables(folder)
    engine = Engine.from_tables(tables, aperture=realism.aperture)
    engine.misalign(realism.magnet_error_settings.draw(tables))
    return engine
