"""Startup configuration: one TOML file per machine in ``startup/``.

Any value can be overridden on the command line (``--set beam.lifetime_h=2``); ``--ideal`` is a set
of such overrides that switches every imperfection off (``IDEAL``).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
STARTUP = PACKAGE.parent / "startup"
DB = PACKAGE.parent / "db"

# An exact machine: no noise, no errors, no ramps, no decay, and a beam that refills at once.
IDEAL = [
    "converters.ramp=false", "converters.readback_noise_ppm=0",
    "bpm.noise_um=0", "bpm.offset_um=0", "bpm.gain_error=0", "bpm.roll_mrad=0",
    "errors.quadrupole_offset_um=0", "errors.sextupole_offset_um=0", "errors.roll_urad=0",
    "beam.lifetime_h=inf", "beam.fill_rate_mA_per_s=inf", "beam.topup=true",
]


def override(data: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (the value in TOML syntax; a bare word is a string) to *data*."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"not a key=value assignment: {assignment!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *sections, last = key.strip().split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[last] = value


@dataclass
class Realism:
    """The imperfections of the machine; see the startup files for what each means and its default."""

    seed: int = 1
    ramp: bool = True
    slew: dict[str, float] = field(default_factory=dict)  # A/s (kV/s, kHz/s) per converter kind
    readback_noise_ppm: float = 0.0  # of each converter's range
    bpm_noise: float = 0.0  # m
    bpm_noise_per_bpm: dict[str, float] = field(default_factory=dict)  # m
    bpm_offset: float = 0.0  # m
    bpm_gain_error: float = 0.0
    bpm_roll: float = 0.0  # rad
    quadrupole_offset: float = 0.0  # m
    sextupole_offset: float = 0.0  # m
    magnet_roll: float = 0.0  # rad
    magnet_offsets: dict[str, tuple[float, float]] = field(default_factory=dict)  # m, per magnet
    aperture: tuple[float, float] | None = None  # m

    @classmethod
    def from_toml(cls, data: dict) -> Realism:
        converters, bpm, errors = data.get("converters", {}), data.get("bpm", {}), data.get("errors", {})
        aperture = data.get("aperture")
        return cls(
            seed=int(data.get("seed", 1)),
            ramp=bool(converters.get("ramp", True)),
            slew={k: float(v) for k, v in converters.get("slew_per_s", {}).items()},
            readback_noise_ppm=float(converters.get("readback_noise_ppm", 0.0)),
            bpm_noise=float(bpm.get("noise_um", 0.0)) * 1e-6,
            bpm_noise_per_bpm={k: float(v) * 1e-6 for k, v in bpm.get("noise_um_per_bpm", {}).items()},
            bpm_offset=float(bpm.get("offset_um", 0.0)) * 1e-6,
            bpm_gain_error=float(bpm.get("gain_error", 0.0)),
            bpm_roll=float(bpm.get("roll_mrad", 0.0)) * 1e-3,
            quadrupole_offset=float(errors.get("quadrupole_offset_um", 0.0)) * 1e-6,
            sextupole_offset=float(errors.get("sextupole_offset_um", 0.0)) * 1e-6,
            magnet_roll=float(errors.get("roll_urad", 0.0)) * 1e-6,
            magnet_offsets={k: (float(v[0]) * 1e-6, float(v[1]) * 1e-6)
                            for k, v in errors.get("offsets_um", {}).items()},
            aperture=(float(aperture["x_mm"]) * 1e-3, float(aperture["y_mm"]) * 1e-3) if aperture else None,
        )

    @property
    def slew_rates(self) -> dict[str, float]:
        """Slew per kind, or nothing (every output jumps) when ramping is off."""
        return dict(self.slew) if self.ramp else {}


@dataclass
class Config:
    name: str  # short name: the startup file's stem
    machine: str
    tables: Path
    prefix: str = "TWIN:"
    rate_hz: float = 10.0
    beam_current_mA: float = 300.0
    lifetime_h: float = 8.0
    topup: bool = True
    topup_band_mA: tuple[float, float] = (299.0, 301.0)
    fill_rate_mA_per_s: float = math.inf
    bind: str = "127.0.0.1"
    autosave_period_s: float = 2.0
    journal_max_mb: float = 20.0  # the journals rotate at this size
    journal_keep: int = 5  # rotated files kept of each journal
    envelope: dict = field(default_factory=dict)  # what a replay may do: see ``replay.Envelope``
    sentinels: list[str] = field(default_factory=list)  # real names that no other server may answer
    sentinel_search_s: float = 0.5
    realism: Realism = field(default_factory=Realism)

    @classmethod
    def load(cls, path: Path, overrides: list[str] = ()) -> Config:
        path = Path(path)
        data = tomllib.loads(path.read_text())
        for assignment in overrides:
            override(data, assignment)
        tables = Path(data["tables"])
        beam = data.get("beam", {})
        current = float(beam.get("current_mA", 300.0))
        return cls(
            name=path.stem,
            machine=data.get("machine", path.stem),
            tables=tables if tables.is_absolute() else DB / tables,
            prefix=data.get("prefix", "TWIN:"),
            rate_hz=float(data.get("rate_hz", 10.0)),
            beam_current_mA=current,
            lifetime_h=float(beam.get("lifetime_h", 8.0)),
            topup=bool(beam.get("topup", True)),
            topup_band_mA=tuple(float(v) for v in beam.get("topup_band_mA", (current - 1.0, current + 1.0))),
            fill_rate_mA_per_s=float(beam.get("fill_rate_mA_per_s", math.inf)),
            bind=data.get("network", {}).get("bind", "127.0.0.1"),
            autosave_period_s=float(data.get("autosave", {}).get("period_s", 2.0)),
            journal_max_mb=float(data.get("journal", {}).get("max_mb", 20.0)),
            journal_keep=int(data.get("journal", {}).get("keep", 5)),
            envelope=data.get("envelope", {}),
            sentinels=[str(name) for name in data.get("safety", {}).get("sentinels", [])],
            sentinel_search_s=float(data.get("safety", {}).get("search_s", 0.5)),
            realism=Realism.from_toml(data),
        )

    @classmethod
    def for_machine(cls, name: str, overrides: list[str] = ()) -> Config:
        path = STARTUP / f"{name}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in STARTUP.glob("*.toml")))
            raise SystemExit(f"twinioc: no machine {name!r} (known: {known})")
        return cls.load(path, overrides)
