"""The shadow's model: the design lattice set to a machine's converter values, seen through a calibration.

``ShadowModel`` turns converter values (by converter name, in the machine's units) into what the
machine's instruments should show: the BPM readings (mm, calibrated), the fractional tunes, the
chromaticity and, less often, the emittance. No EPICS here: the live shadow and the replay both
feed it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from twinioc.model import equilibrium
from twinioc.model.calibration import Calibration
from twinioc.model.engine import Engine
from twinioc.model.state import Change, EquilibriumSettings
from twinioc.model.tables import MachineTables


@dataclass
class Prediction:
    """What the model expects the machine's instruments to show, at one lattice version."""

    version: int
    stable: bool
    x_mm: np.ndarray  # the calibrated BPM readings, in the machine's BPM order
    y_mm: np.ndarray
    tune: np.ndarray  # fractional (Qx, Qy)
    chromaticity: np.ndarray
    revolution_khz: float
    compute_s: float
    reason: str = ""


class ShadowModel:
    """One machine's model: its engine (set to the converter values it was given) and its calibration."""

    def __init__(self, tables: MachineTables, calibration: Calibration | None = None,
                 equilibrium_settings: EquilibriumSettings | None = None):
        self.tables = tables
        self.engine = Engine.from_tables(tables)
        self.calibration = calibration or Calibration(tables.folder.name)
        self.equilibrium_settings = equilibrium_settings
        self.bpms = list(tables.bpm_names)
        self.quantities = {name: c.quantity for name, c in self.engine.devices.converters.items()}
        self.harmonic = int(self.engine.ring.harmonic_number)

    def set(self, values: dict[str, float]) -> dict[str, str]:
        """Give the model these converter values (machine units); returns the refused ones and why."""
        unknown = {name: "not a converter of this machine" for name in values if name not in self.quantities}
        changes = [Change(name, self.quantities[name], self._model_value(name, value))
                   for name, value in values.items() if name not in unknown]
        _, refused = self.engine.apply_valid(changes)
        return unknown | refused

    def _model_value(self, name: str, value: float) -> float:
        return value if self.quantities[name] != "current" else value * self.calibration.scale(name)

    def predict(self, chromaticity: bool = True) -> Prediction:
        start = time.perf_counter()
        state = self.engine.compute(chromaticity=chromaticity)
        x, y = self.calibration.readings(self.bpms, np.asarray(state.x) * 1e3, np.asarray(state.y) * 1e3)
        return Prediction(state.version, state.stable, x, y, np.asarray(state.fractional_tune, float),
                          np.asarray(state.chromaticity, float), state.revolution_frequency * 1e-3,
                          time.perf_counter() - start, state.reason)

    def emittance_nm(self) -> tuple[float, float]:
        """The model's equilibrium emittances (nm), from pyAT's radiation envelope; NaN if not computed."""
        if self.equilibrium_settings is None:
            return math.nan, math.nan
        found = equilibrium.compute(self.engine.ring, self.engine.rf_frequency, {}, self.equilibrium_settings,
                                    self.engine.version)
        return float(found.emittance[0]) * 1e9, float(found.emittance[1]) * 1e9
