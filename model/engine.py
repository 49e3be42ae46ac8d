"""The physics engine: settings in, beam state out.

Two calls make the whole interface (the seed paper's "update the lattice" and "propagate"):

* ``apply(changes)`` takes a batch of ``Change(device, quantity, value)`` in engineering units,
  checks all of them, writes them into the lattice and returns the new lattice version;
* ``compute()`` returns the ``BeamState`` of the current version.

The ring is tracked in 4D (no radiation, no cavities). The RF frequency enters through the path
length: a closed orbit at frequency f must be h*c/f long, so the engine asks pyAT for the 4D orbit
of path lengthening dct = -C*df/f, which yields the momentum offset and the dispersive orbit together.
Horizontal kicks therefore also shift the momentum, as on a real ring with a fixed RF frequency.

The longitudinal plane is linear and analytic: with the momentum compaction α_c of the 4D ring, the
main cavities' voltage V and the energy loss per turn U0 (radiation integral of the design ring),
the synchrotron tune is Qs = sqrt(h |α_c| sqrt(V² − U0²) / (2π E)). Below V = U0 there is no RF bucket
and the beam is lost.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import at
import numpy as np

from .devices import ELEMENT_FIELDS, SPEED_OF_LIGHT, DeviceMap, SettingError
from .lattice_io import load_lattice
from .realism import Misalignment
from .state import BeamState, Change

__all__ = ["BeamState", "Change", "Engine", "SettingError"]


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
        self._bpm_refs = np.array([b.element for b in devices.bpms])  # in the machine's BPM order
        # pyAT wants ascending refpts; the orbit comes back in lattice order and is put in BPM order
        self._bpm_sorted = np.sort(self._bpm_refs)
        self._bpm_order = np.searchsorted(self._bpm_sorted, self._bpm_refs)
        # Optics are taken at the BPMs, every magnet and the ring's end. The phase advance is
        # unwrapped along these points, so they must lie well under pi apart; the last one gives
        # the whole tune.
        magnets = [w.element for c in devices.converters.values() for w in c.windings]
        self._optics_refs = np.unique(np.concatenate([self._bpm_refs, magnets, [len(self.ring)]]))
        self._last_chromaticity = np.full(2, np.nan)
        self._last_compaction = math.nan
        self._write({name: c.default for name, c in devices.converters.items()})

    @classmethod
    def from_folder(cls, folder: Path, aperture: tuple[float, float] | None = None) -> Engine:
        """An engine for the machine whose tables and ``lattice.json`` are in *folder*."""
        ring = load_lattice(Path(folder) / "lattice.json")
        return cls(ring, DeviceMap.from_tables(ring, folder), aperture)

    def misalign(self, errors: dict[str, Misalignment]) -> None:
        """Shift and roll magnets (by magnet name) against the design; replaces earlier errors."""
        elements = {w.magnet: w.element for c in self.devices.converters.values() for w in c.windings}
        unknown = set(errors) - set(elements)
        if unknown:
            raise SettingError(f"no magnets {sorted(unknown)}")
        for name, e in errors.items():
            at.transform_elem(self.ring[elements[name]], dx=e.dx, dy=e.dy, tilt=e.roll)
        self.version += 1

    # -- update the lattice ---------------------------------------------------------------------

    def check(self, changes: Iterable[Change]) -> dict[str, float]:
        """Validate a batch; return the new settings it makes, or raise ``SettingError``."""
        accepted, problems = {}, []
        for device, quantity, value in changes:
            try:
                accepted[device] = self.devices.check(device, quantity, value)
            except SettingError as err:
                problems.append(str(err))
        if problems:
            raise SettingError("; ".join(problems))
        return accepted

    def apply(self, changes: Iterable[Change]) -> int:
        """Apply a batch of changes atomically and return the new lattice version.

        Nothing is applied if any change is refused; an empty batch keeps the version.
        """
        accepted = self.check(list(changes))
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

    def _momentum_compaction(self, orbit0: np.ndarray, dispersion: np.ndarray) -> float:
        """α_c = (path lengthening per turn) / (C δ) of a particle on the dispersion orbit.

        From the one-turn matrix M around *orbit0*: α_c C = M[5,:4]·η + M[5,4], with η the 4D
        dispersion vector at the start (one find_m66, ~5x cheaper than pyAT's get_mcf).
        """
        m66, _ = at.find_m66(self.ring, orbit=orbit0)
        return float((m66[5, :4] @ dispersion + m66[5, 4]) / self.circumference)

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
        """Closed orbit at the BPMs, tunes and (optionally) chromaticities of the current version.

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
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # pyAT warns when the orbit search does not converge
                dct = -self.circumference * (f_rf - self.design_rf) / f_rf
                orbit0, orbits = at.find_orbit4(self.ring, refpts=self._bpm_sorted, dct=dct)
                orbits = orbits[self._bpm_order]
                origin, ringdata, optics = self.ring.get_optics(
                    refpts=self._optics_refs, orbit=orbit0, get_chrom=chromaticity)
            tune = optics.mu[-1] / (2 * math.pi)
            if not (np.all(np.isfinite(orbits)) and np.all(np.isfinite(tune))):
                raise ArithmeticError("no finite closed orbit")
            self._check_aperture(orbits)
            state.x, state.y = orbits[:, 0].copy(), orbits[:, 2].copy()
            state.tune = tune
            state.momentum_offset = float(orbit0[4])
            if chromaticity:
                self._last_chromaticity = np.asarray(ringdata.chromaticity, dtype=float)
                self._last_compaction = self._momentum_compaction(orbit0, origin.dispersion)
            state.chromaticity = self._last_chromaticity.copy()
            state.momentum_compaction = self._last_compaction
            if self._main_cavities:
                state.synchrotron_tune = self.synchrotron_tune(self._last_compaction)
            state.stable = True
        except Exception as err:  # noqa: BLE001 - any failure of the physics means: no beam
            state.reason = f"{type(err).__name__}: {err}"
        state.compute_seconds = time.perf_counter() - start
        return state
