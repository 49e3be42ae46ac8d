"""What goes into the engine and what comes out of it: plain data, importable without pyAT."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class Change(NamedTuple):
    device: str
    quantity: str  # "current" (A) for converters, "frequency" (kHz) for the RF, "voltage" (kV) for cavities
    value: float


@dataclass
class BeamState:
    """What the beam does at one lattice version. Positions in m at the BPMs, in table order."""

    version: int
    stable: bool
    x: np.ndarray
    y: np.ndarray
    tune: np.ndarray  # (Qx, Qy) including the integer part
    chromaticity: np.ndarray  # (ξx, ξy) of the last computation that included them; NaN before
    momentum_offset: float  # δ of the closed orbit
    rf_frequency: float  # Hz
    revolution_frequency: float  # Hz
    synchrotron_tune: float = math.nan  # Qs of the main RF system
    momentum_compaction: float = math.nan  # α_c of the closed orbit
    energy: float = math.nan  # eV: the energy the dipole field is set for
    computed_at: float = field(default_factory=time.time)
    compute_seconds: float = 0.0
    reason: str = ""  # why the beam is lost, when it is

    @property
    def fractional_tune(self) -> np.ndarray:
        return self.tune - np.floor(self.tune)
