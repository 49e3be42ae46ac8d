"""What makes the twin behave like hardware: converters that ramp, BPMs that are noisy and imperfect,
magnets that are misaligned, a beam that decays and is topped up.

Plain numpy, no pyAT and no EPICS. Every random number comes from generators spawned from the
twin's one seed (``streams``), one stream per purpose, so that the same seed gives the same run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tables import MachineTables

# One stream per purpose, in this order: adding a purpose at the end keeps the others' numbers.
STREAMS = ("magnet_errors", "bpm_errors", "bpm_noise", "converter_noise", "current_noise")


def streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators for each purpose, all from *seed*."""
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(STREAMS, children, strict=True)}


def _normal(rng: np.random.Generator, sigma: float, size, cut: float = 3.0) -> np.ndarray:
    """Gaussian numbers of width *sigma*, cut at ±cut·σ as error tables usually are."""
    return np.clip(rng.normal(0.0, 1.0, size), -cut, cut) * sigma


# -- the settings ---------------------------------------------------------------------------------


@dataclass
class Realism:
    """The imperfections of the machine, in SI units: what ramps, what is noisy, what is misaligned.

    ``startup/defaults.toml`` says what each setting means and its default.
    """

    seed: int
    ramp: bool
    slew: dict[str, float]  # A/s (kV/s, kHz/s) per converter kind
    readback_noise_ppm: float  # of each converter's range
    bpm_noise: float  # m
    bpm_noise_per_bpm: dict[str, float]  # m
    bpm_offset: float  # m
    bpm_gain_error: float
    bpm_roll: float  # rad
    quadrupole_offset: float  # m
    sextupole_offset: float  # m
    magnet_roll: float  # rad
    magnet_offsets: dict[str, tuple[float, float]]  # m, per magnet
    aperture: tuple[float, float] | None  # m; None: no limit

    @classmethod
    def from_settings(cls, data: dict) -> Realism:
        """From a startup file's settings (every key present: the defaults merged in), in its units."""
        converters, bpm, errors, aperture = data["converters"], data["bpm"], data["errors"], data["aperture"]
        x, y = float(aperture["x_mm"]) * 1e-3, float(aperture["y_mm"]) * 1e-3
        return cls(
            seed=int(data["seed"]),
            ramp=bool(converters["ramp"]),
            slew={k: float(v) for k, v in converters["slew_per_s"].items()},
            readback_noise_ppm=float(converters["readback_noise_ppm"]),
            bpm_noise=float(bpm["noise_um"]) * 1e-6,
            bpm_noise_per_bpm={k: float(v) * 1e-6 for k, v in bpm["noise_um_per_bpm"].items()},
            bpm_offset=float(bpm["offset_um"]) * 1e-6,
            bpm_gain_error=float(bpm["gain_error"]),
            bpm_roll=float(bpm["roll_mrad"]) * 1e-3,
            quadrupole_offset=float(errors["quadrupole_offset_um"]) * 1e-6,
            sextupole_offset=float(errors["sextupole_offset_um"]) * 1e-6,
            magnet_roll=float(errors["roll_urad"]) * 1e-6,
            magnet_offsets={k: (float(v[0]) * 1e-6, float(v[1]) * 1e-6) for k, v in errors["offsets_um"].items()},
            aperture=(x, y) if math.isfinite(x) or math.isfinite(y) else None,
        )

    @property
    def slew_rates(self) -> dict[str, float]:
        """Slew per kind, or nothing (every output jumps) when ramping is off."""
        return dict(self.slew) if self.ramp else {}

    def bpm_errors(self, bpm_names: list[str]) -> BpmErrors:
        """The errors of the BPMs *bpm_names* this seed gives: drawn from their own stream, so the
        same each time they are asked for."""
        noise = np.array([self.bpm_noise_per_bpm.get(name, self.bpm_noise) for name in bpm_names])
        return BpmErrors.draw(len(bpm_names), streams(self.seed)["bpm_errors"], self.bpm_offset, self.bpm_gain_error,
                              self.bpm_roll, noise)

    @property
    def magnet_error_settings(self) -> MagnetErrorSettings:
        return MagnetErrorSettings(self.seed, self.quadrupole_offset, self.sextupole_offset, self.magnet_roll,
                                   dict(self.magnet_offsets))


@dataclass(frozen=True)
class MagnetErrorSettings:
    """What the magnets' misalignments are drawn from: the seed, the σ's and the named offsets (m, rad)."""

    seed: int
    quadrupole_offset: float
    sextupole_offset: float
    magnet_roll: float
    magnet_offsets: dict[str, tuple[float, float]]

    def as_dict(self) -> dict:
        return {"seed": self.seed, "quadrupole_offset": self.quadrupole_offset,
                "sextupole_offset": self.sextupole_offset, "magnet_roll": self.magnet_roll,
                "magnet_offsets": {name: list(dxy) for name, dxy in self.magnet_offsets.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> MagnetErrorSettings:
        """From ``as_dict``'s form (a snapshot); raises ``KeyError``, ``TypeError``, ``ValueError``."""
        return cls(int(data["seed"]), float(data["quadrupole_offset"]), float(data["sextupole_offset"]),
                   float(data["magnet_roll"]),
                   {name: (float(dxy[0]), float(dxy[1])) for name, dxy in data["magnet_offsets"].items()})

    def draw(self, tables: MachineTables) -> dict[str, Misalignment]:
        """The misalignments of the machine's magnets these settings give; only the non-zero ones."""
        rng = streams(self.seed)["magnet_errors"]
        errors = {}
        for kind, sigma in (("quadrupole", self.quadrupole_offset), ("sextupole", self.sextupole_offset)):
            errors |= draw_misalignments(tables.magnets_of_kind(kind), rng, sigma, self.magnet_roll)
        for magnet, (dx, dy) in self.magnet_offsets.items():
            errors[magnet] = Misalignment(dx, dy, errors[magnet].roll if magnet in errors else 0.0)
        return {m: e for m, e in errors.items() if e != Misalignment()}


# -- power converters ---------------------------------------------------------------------------


@dataclass
class ConverterOutput:
    """One converter: what was asked (setpoint), what it delivers (output), how fast it gets there."""

    setpoint: float
    output: float
    slew: float  # units per second; math.inf: at once
    on: bool = True
    tripped: bool = False  # a tripped converter drops to zero at once and stays there

    @property
    def target(self) -> float:
        return self.setpoint if self.on and not self.tripped else 0.0


class ConverterBank:
    """The outputs of all settable devices. Magnets ramp at their slew rate; RF and cavities do not."""

    def __init__(self, kinds: dict[str, str], slew: dict[str, float], initial: dict[str, float]):
        """*kinds*: converter -> kind; *slew*: units per second per kind (a kind not in it jumps)."""
        self.kinds = kinds
        self.outputs = {name: ConverterOutput(value, value, slew.get(kinds[name], math.inf))
                        for name, value in initial.items()}

    def set(self, name: str, value: float) -> None:
        self.outputs[name].setpoint = value

    def switch(self, name: str, on: bool) -> None:
        """Switch a converter on or off; off, its output ramps to zero (and back to the setpoint on)."""
        self.outputs[name].on = on

    def trip(self, name: str, tripped: bool = True) -> None:
        """Trip a converter (its output falls to zero at once) or reset it (it ramps back)."""
        self.outputs[name].tripped = tripped

    def set_slew(self, slew: dict[str, float]) -> None:
        for name, out in self.outputs.items():
            out.slew = slew.get(self.kinds[name], math.inf)

    def advance(self, dt: float) -> dict[str, float]:
        """Move every output towards its target for *dt* seconds; return the outputs that moved."""
        moved = {}
        for name, out in self.outputs.items():
            gap = out.target - out.output
            if gap == 0.0:
                continue
            step = math.inf if out.tripped else out.slew * dt
            out.output = out.target if abs(gap) <= step else out.output + math.copysign(step, gap)
            moved[name] = out.output
        return moved

    @property
    def ramping(self) -> bool:
        return any(out.output != out.target for out in self.outputs.values())


# -- BPMs ---------------------------------------------------------------------------------------


@dataclass
class BpmErrors:
    """Per-BPM calibration errors and noise, as seen in a reading.

    A reading is  gain · R(roll) · (x, y) + offset + noise,  with R the rotation by the BPM's roll.
    """

    offset: np.ndarray  # (2, n) m
    gain: np.ndarray  # (2, n) relative, around 1
    roll: np.ndarray  # (n,) rad
    noise: np.ndarray  # (n,) m, the σ of each reading

    @classmethod
    def draw(cls, n: int, rng: np.random.Generator, offset: float = 0.0, gain: float = 0.0, roll: float = 0.0,
             noise: float | np.ndarray = 0.0) -> BpmErrors:
        """Errors of *n* BPMs with the given σ's (m, relative, rad); *noise* per BPM or for all."""
        return cls(_normal(rng, offset, (2, n)), 1.0 + _normal(rng, gain, (2, n)), _normal(rng, roll, n),
                   np.broadcast_to(np.asarray(noise, dtype=float), (n,)).copy())

    def read(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
        """What the BPMs show for a beam at (*x*, *y*): a fresh noise sample from *rng* on every
        call (no noise without one: the mean reading)."""
        c, s = np.cos(self.roll), np.sin(self.roll)
        u, v = c * x + s * y, -s * x + c * y
        noise = rng.normal(0.0, 1.0, (2, len(x))) * self.noise if rng is not None else np.zeros((2, len(x)))
        return (self.gain[0] * u + self.offset[0] + noise[0], self.gain[1] * v + self.offset[1] + noise[1])


# -- magnets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Misalignment:
    dx: float = 0.0  # m
    dy: float = 0.0  # m
    roll: float = 0.0  # rad


def draw_misalignments(magnets: Iterable[str], rng: np.random.Generator, offset: float, roll: float,
                       ) -> dict[str, Misalignment]:
    """Transverse offsets (σ *offset*, m) and rolls (σ *roll*, rad) of the named magnets."""
    names = list(magnets)
    dxy, rolls = _normal(rng, offset, (len(names), 2)), _normal(rng, roll, len(names))
    return {n: Misalignment(float(d[0]), float(d[1]), float(r)) for n, d, r in zip(names, dxy, rolls, strict=True)}


# -- the stored beam ----------------------------------------------------------------------------


@dataclass
class StoredBeam:
    """Beam current that decays with a lifetime and is refilled by injection.

    The beam dies when the machine cannot hold it (no stable orbit, no RF bucket, orbit beyond the
    aperture). It comes back only by injection: a request (``inject``), or top-up, which injects
    whenever the current falls below the band and the machine can hold a beam.
    """

    nominal: float  # mA: what a fill reaches
    lifetime_h: float  # math.inf: no decay
    topup: bool = True
    band: tuple[float, float] = (0.0, 0.0)  # mA: top-up keeps the current in here
    fill_rate: float = math.inf  # mA/s while injecting
    current: float = 0.0
    injecting: bool = False

    def inject(self) -> None:
        self.injecting = True

    def advance(self, dt: float, holdable: bool) -> float:
        """The current after *dt* seconds; *holdable*: the machine can hold a beam right now."""
        if not holdable:
            self.current, self.injecting = 0.0, False
            return self.current
        if math.isfinite(self.lifetime_h) and self.lifetime_h > 0:
            self.current *= math.exp(-dt / (self.lifetime_h * 3600.0))
        low, high = self.band
        if self.topup and self.current < low:
            self.injecting = True
        if self.injecting:
            goal = high if self.topup else self.nominal
            self.current = min(goal, self.current + self.fill_rate * dt)
            self.injecting = self.current < goal
        return self.current

    @property
    def alive(self) -> bool:
        return self.current > 0.0
