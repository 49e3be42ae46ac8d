"""The device map: which lattice elements each power converter drives, and how strongly.

Engineering units (A, kHz) live on this side of the map, SI strengths on the other; the conversion
happens here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .tables import ConverterRow

if TYPE_CHECKING:
    import at

    from .tables import MachineTables

SPEED_OF_LIGHT = 299_792_458.0

# What a winding sets on its element (a pyAT attribute, an index or None for a scalar) and how its
# calibration reads:
#   K1     PolynomB[1] (1/m^2)          calibration in 1/m^2 per A
#   K2     PolynomB[2] (pyAT's H, 1/m^3) calibration in 1/m^3 per A
#   K3     PolynomB[3] (1/m^4)          calibration in 1/m^4 per A
#   HKICK, VKICK  KickAngle[0|1] (rad)  an integrated field in T.m per A: kick = c*I/(B*rho)
#   BEND   a dipole's field relative to its design, B/B0 = c*I; the engine turns the excess into
#          PolynomB[0] = (B/B0 - 1) * angle / length
#   VOLTAGE  a cavity's Voltage (V)      calibration in V per kV
ELEMENT_FIELDS = {"K1": ("PolynomB", 1), "K2": ("PolynomB", 2), "K3": ("PolynomB", 3),
                  "HKICK": ("KickAngle", 0), "VKICK": ("KickAngle", 1),
                  "BEND": ("PolynomB", 0), "VOLTAGE": ("Voltage", None)}

# The property a client sets on each kind of device (anything not listed: "current" in A).
QUANTITIES = {"rf": "frequency", "cavity": "voltage"}


class SettingError(ValueError):
    """A change the twin refuses: unknown device or property, not a finite number, out of limits."""


@dataclass(frozen=True)
class Winding:
    """One magnet on a converter: the element it sets and its strength per ampere."""

    magnet: str
    element: int
    field: str  # a key of ELEMENT_FIELDS
    calibration: float
    cal_unit: str

    def strength(self, current: float, rigidity: float) -> float:
        """SI strength of the element for a converter current in A."""
        value = self.calibration * current
        return value / rigidity if self.cal_unit == "T.m/A" else value

    def current(self, strength: float, rigidity: float) -> float:
        """The converter current that gives *strength* (inverse of ``strength``)."""
        value = strength * rigidity if self.cal_unit == "T.m/A" else strength
        return value / self.calibration


@dataclass(frozen=True)
class PowerConverter(ConverterRow):
    """A settable device of the converter table, with the magnets it drives."""

    windings: tuple[Winding, ...] = field(default=())

    @property
    def quantity(self) -> str:
        return QUANTITIES.get(self.kind, "current")

    def check(self, quantity: str, value: object) -> float:
        """Return *value* as a float, or raise ``SettingError`` saying why it is refused."""
        if quantity != self.quantity:
            raise SettingError(f"{self.name}: no property {quantity!r} (it has {self.quantity!r})")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise SettingError(f"{self.name}: {value!r} is not a number")
        value = float(value)
        if not math.isfinite(value):
            raise SettingError(f"{self.name}: {value} is not a finite number")
        if not self.low <= value <= self.high:
            raise SettingError(f"{self.name}: {value} {self.unit} is outside [{self.low}, {self.high}]")
        return value


@dataclass(frozen=True)
class Bpm:
    index: int  # position in the machine's orbit arrays
    name: str
    element: int


@dataclass
class DeviceMap:
    converters: dict[str, PowerConverter]
    bpms: list[Bpm]

    @classmethod
    def from_tables(cls, ring: at.Lattice, tables: MachineTables) -> DeviceMap:
        """Build the map from a machine's converters, magnets and BPMs."""
        index = {e.FamName: i for i, e in enumerate(ring)}
        windings: dict[str, list[Winding]] = {}
        for row in tables.magnets:
            if row.property not in ELEMENT_FIELDS:
                raise ValueError(f"magnets.csv: {row.magnet}: unknown property {row.property}")
            windings.setdefault(row.converter, []).append(Winding(
                row.magnet, index[row.element], row.property, row.calibration, row.cal_unit))
        converters = {c.name: PowerConverter(c.name, c.kind, c.unit, c.default, c.low, c.high, c.max_step,
                                             tuple(windings.pop(c.name, ())))
                      for c in tables.converters.values()}
        if windings:
            raise ValueError(f"magnets.csv names converters not in converters.csv: {sorted(windings)}")
        return cls(converters, [Bpm(b.index, b.name, index[b.element]) for b in tables.bpms])

    def of_kind(self, kind: str) -> list[PowerConverter]:
        return [c for c in self.converters.values() if c.kind == kind]

    @property
    def rf(self) -> PowerConverter:
        (rf,) = self.of_kind("rf")
        return rf

    def check(self, device: str, quantity: str, value: object) -> float:
        try:
            converter = self.converters[device]
        except KeyError:
            raise SettingError(f"unknown device {device!r}") from None
        return converter.check(quantity, value)
