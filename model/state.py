"""What goes into the engine and what comes out of it: plain data, importable without pyAT."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class EquilibriumSettings:
    """What the equilibrium depends on beyond the lattice: the bunch fill, the acceptance, the floor
    of the vertical emittance (``startup/defaults.toml`` says what each means)."""

    bunches: int  # filled bunches; 0: every bucket
    nominal_current_mA: float  # the fill's current: the Touschek lifetime is computed for its bunches
    momentum_acceptance: float  # the lattice's (dynamic and physical), relative
    vertical_emittance_floor: float = 0.0  # m rad

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Equilibrium:
    """The equilibrium beam of one lattice version (SI units). Without one (no stable 6D orbit, no
    RF bucket), the numbers are NaN and ``reason`` says why."""

    version: int
    emittance: tuple[float, float] = (math.nan, math.nan)  # mode emittances I, II, m rad (II with the floor)
    energy_spread: float = math.nan
    bunch_length: float = math.nan  # m, rms
    damping_times: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # s
    energy_loss: float = math.nan  # eV per turn
    beam_sizes: dict[str, tuple[float, float]] = field(default_factory=dict)  # point -> (σx, σy), m
    bucket_height: float = math.nan  # relative
    momentum_acceptance: float = math.nan  # the one the Touschek lifetime used
    touschek_lifetime: float = math.nan  # s, for bunches of ``bunch_current``
    bunch_current: float = math.nan  # A
    bunches: int = 0
    closed_orbit: tuple[float, ...] = ()  # the 6D closed orbit at the ring's start
    compute_seconds: float = 0.0
    reason: str = ""

    def touschek_at(self, current_mA: float) -> float:
        """The Touschek lifetime (s) with *current_mA* in the same bunches: the loss rate per
        electron is proportional to the electron density, so to the bunch current."""
        per_bunch = current_mA * 1e-3 / self.bunches if self.bunches else 0.0
        return self.touschek_lifetime * self.bunch_current / per_bunch if per_bunch > 0 else math.inf
