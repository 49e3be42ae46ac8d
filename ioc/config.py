"""Startup configuration: ``startup/defaults.toml`` under one TOML file per machine in ``startup/``.

The defaults file names every key a startup file may set, with its default and its meaning; a
machine's file sets what is its own; ``--set section.key=value`` overrides either, and ``--ideal`` is
a set of such overrides that switches every imperfection off (``IDEAL``). A key the defaults file
does not name is refused, with the keys it could have been.
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from twinioc.model.correction import CorrectionSettings
from twinioc.model.realism import Realism
from twinioc.model.state import EquilibriumSettings

PACKAGE = Path(__file__).resolve().parent
STARTUP = PACKAGE.parent / "startup"
DB = PACKAGE.parent / "db"
DEFAULTS = STARTUP / "defaults.toml"

# An exact machine: no noise, no errors, no ramps, no decay, and a beam that refills at once.
IDEAL = [
    "converters.ramp=false", "converters.readback_noise_ppm=0",
    "bpm.noise_um=0", "bpm.offset_um=0", "bpm.gain_error=0", "bpm.roll_mrad=0",
    "errors.quadrupole_offset_um=0", "errors.sextupole_offset_um=0", "errors.roll_urad=0",
    "beam.lifetime_h=inf", "beam.fill_rate_mA_per_s=inf", "beam.topup=true", "beam.current_noise_uA=0",
    "orbit_feedback.enabled=false", "start.state='commissioning'",  # nothing to correct, nothing corrects
]
START_STATES = ("operation", "commissioning")


class SettingsError(ValueError):
    """A startup setting that does not exist or cannot be used; the message names it."""


def override(data: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (the value in TOML syntax; a bare word is a string) to *data*."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"not a key=value assignment: {assignment!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *sections, last = key.strip().split(".")
    for section in sections:
        data = data.setdefault(section, {})
        if not isinstance(data, dict):
            raise SettingsError(f"{key.strip()}: {section} is a value, not a section")
    data[last] = value


def merged(defaults: dict, given: dict, where: str = "") -> dict:
    """*given* over *defaults*, refusing a key the defaults do not have or a value of another type
    than its default. A table that is empty in the defaults takes any keys."""
    result = copy.deepcopy(defaults)
    for key, value in given.items():
        name = f"{where}{key}"
        if key not in defaults:
            known = ", ".join(f"{where}{k}" for k in defaults)
            raise SettingsError(f"no setting {name!r} (known{' in ' + where[:-1] if where else ''}: {known})")
        default = defaults[key]
        if isinstance(default, dict) and default:
            if not isinstance(value, dict):
                raise SettingsError(f"{name} is a section of settings, not {value!r}")
            result[key] = merged(default, value, f"{name}.")
        else:
            result[key] = _typed(name, default, value)
    return result


KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
         dict: "a table"}


def _typed(name: str, default: object, value: object) -> object:
    """*value* if it has the kind of *default* (an int for a float will do), else ``SettingsError``."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = KINDS.get(type(default), type(default).__name__)
        raise SettingsError(f"{name} = {value!r}: it takes {kind}, like its default {default!r}")
    return float(value) if isinstance(default, float) else value


@dataclass
class Config:
    """A twin's settings: the merged startup file, in the types the twin uses."""

    name: str  # short name: the startup file's stem
    machine: str
    tables: Path
    prefix: str
    rate_hz: float
    beam_current_mA: float
    lifetime_h: float  # NaN: from physics
    gas_lifetime_h: float
    current_noise_mA: float  # sigma of a current monitor's reading
    equilibrium: EquilibriumSettings | None  # None: not computed
    equilibrium_timeout_s: float
    equilibrium_interval_s: float  # at least this long from one computation's start to the next
    topup: bool
    topup_band_mA: tuple[float, float]
    fill_rate_mA_per_s: float
    dose_per_lost_watt: float  # a dose monitor's reading per W of beam power lost; 0: no dose monitor
    bind: str
    autosave_period_s: float
    journal_max_mb: float  # the journals rotate at this size
    journal_keep: int  # rotated files kept of each journal
    step_timeout_s: float  # a physics step that takes longer: the worker is taken as hung
    max_restarts: int  # failed restarts of the physics worker in a row before the twin gives up
    envelope: dict  # what a replay may do: see ``replay.Envelope``
    sentinels: list[str]  # real names that no other server may answer
    sentinel_search_s: float
    realism: Realism
    start_state: str  # "operation": orbit and tunes corrected before serving; "commissioning": as the errors leave them
    tune_families: list[str]  # the two quadrupole families (fnmatch patterns) a start in operation trims the tunes with
    feedback: FeedbackSettings

    @classmethod
    def load(cls, path: Path, overrides: list[str] = ()) -> Config:
        """The settings of the startup file *path* with *overrides*; ``SettingsError`` says what is wrong."""
        path = Path(path)
        given = tomllib.loads(path.read_text())
        for assignment in overrides:
            override(given, assignment)
        data = merged(tomllib.loads(DEFAULTS.read_text()), given)
        for required in ("machine", "tables"):
            if not data[required]:
                raise SettingsError(f"{path}: {required!r} is required")
        return cls.from_settings(path.stem, data)

    @classmethod
    def from_settings(cls, name: str, data: dict) -> Config:
        tables, beam = Path(data["tables"]), data["beam"]
        current = beam["current_mA"]
        band = tuple(beam["topup_band_mA"]) or (current - 1.0, current + 1.0)
        if len(band) != 2:
            raise SettingsError(f"beam.topup_band_mA = {list(band)}: it takes [low, high]")
        if not data["rate_hz"] > 0 or not math.isfinite(data["rate_hz"]):
            raise SettingsError(f"rate_hz = {data['rate_hz']}: it must be a positive number")
        _check_beam(data)
        _check_start(data)
        return cls(
            name=name, machine=data["machine"], tables=tables if tables.is_absolute() else DB / tables,
            prefix=data["prefix"], rate_hz=data["rate_hz"],
            beam_current_mA=current, lifetime_h=beam["lifetime_h"], topup=beam["topup"],
            gas_lifetime_h=beam["gas_lifetime_h"], current_noise_mA=beam["current_noise_uA"] * 1e-3,
            equilibrium=_equilibrium(data) if data["equilibrium"]["enabled"] else None,
            equilibrium_timeout_s=data["equilibrium"]["timeout_s"],
            equilibrium_interval_s=data["equilibrium"]["min_interval_s"],
            topup_band_mA=(float(band[0]), float(band[1])), fill_rate_mA_per_s=beam["fill_rate_mA_per_s"],
            dose_per_lost_watt=beam["dose_per_lost_watt"],
            bind=data["network"]["bind"], autosave_period_s=data["autosave"]["period_s"],
            journal_max_mb=data["journal"]["max_mb"], journal_keep=data["journal"]["keep"],
            step_timeout_s=data["physics"]["step_timeout_s"], max_restarts=data["physics"]["max_restarts"],
            envelope=data["envelope"], sentinels=[str(n) for n in data["safety"]["sentinels"]],
            sentinel_search_s=data["safety"]["search_s"], realism=Realism.from_settings(data),
            start_state=data["start"]["state"], tune_families=[str(p) for p in data["start"]["tune_families"]],
            feedback=_feedback(data["orbit_feedback"]),
        )

    @classmethod
    def for_machine(cls, name: str, overrides: list[str] = ()) -> Config:
        path = STARTUP / f"{name}.toml"
        if name == DEFAULTS.stem or not path.is_file():
            raise SystemExit(f"twinioc: no machine {name!r} (known: {', '.join(machines())})")
        return cls.load(path, overrides)


# Beam and equilibrium settings that must be above zero, or not below it (NaN fails both).
POSITIVE = ("beam.gas_lifetime_h", "equilibrium.momentum_acceptance", "equilibrium.timeout_s")
NOT_NEGATIVE = ("beam.bunches", "beam.current_noise_uA", "beam.dose_per_lost_watt",
                "equilibrium.vertical_emittance_floor_pm", "equilibrium.min_interval_s")


def _check_beam(data: dict) -> None:
    """Refuse beam and equilibrium settings out of their range, naming them."""
    for names, ok, rule in ((POSITIVE, lambda v: v > 0, "> 0"), (NOT_NEGATIVE, lambda v: v >= 0, ">= 0")):
        for name in names:
            section, key = name.split(".")
            if not ok(data[section][key]):
                raise SettingsError(f"{name} = {data[section][key]}: it must be {rule}")
    lifetime = data["beam"]["lifetime_h"]
    if not (math.isnan(lifetime) or lifetime > 0):
        raise SettingsError(f"beam.lifetime_h = {lifetime}: it takes nan (from physics), inf (no decay) or a "
                            "lifetime > 0")


@dataclass(frozen=True)
class FeedbackSettings:
    """The slow orbit feedback: on at a first start, its period, and how it inverts the response."""

    enabled: bool
    period_s: float
    correction: CorrectionSettings


def _feedback(settings: dict) -> FeedbackSettings:
    return FeedbackSettings(settings["enabled"], settings["period_s"],
                            CorrectionSettings(settings["singular_value_cut"], settings["gain"]))


def _check_start(data: dict) -> None:
    """Refuse a start state or feedback setting that cannot be used, naming it."""
    if data["start"]["state"] not in START_STATES:
        raise SettingsError(f"start.state = {data['start']['state']!r}: it takes {' or '.join(START_STATES)}")
    if len(data["start"]["tune_families"]) not in (0, 2):
        raise SettingsError(f"start.tune_families = {data['start']['tune_families']}: it takes two patterns, or none")
    feedback = data["orbit_feedback"]
    for key, ok, rule in (("period_s", feedback["period_s"] > 0, "> 0"),
                          ("gain", 0 < feedback["gain"] <= 1, "in (0, 1]"),
                          ("singular_value_cut", 0 <= feedback["singular_value_cut"] < 1, "in [0, 1)")):
        if not ok or not math.isfinite(feedback[key]):
            raise SettingsError(f"orbit_feedback.{key} = {feedback[key]}: it must be {rule}")


def _equilibrium(data: dict) -> EquilibriumSettings:
    beam, settings = data["beam"], data["equilibrium"]
    return EquilibriumSettings(beam["bunches"], beam["current_mA"], settings["momentum_acceptance"],
                               settings["vertical_emittance_floor_pm"] * 1e-12)


def machines() -> list[str]:
    """The machines of ``startup/``: every startup file but the defaults."""
    return sorted(p.stem for p in STARTUP.glob("*.toml") if p != DEFAULTS)
