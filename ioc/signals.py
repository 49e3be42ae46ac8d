"""The signal registry: every signal a row of ``pvs.csv`` may name, and what it shows or what a put does.

A PV row names a record kind and a signal. The signal says what the record is for, and which part of
the twin serves it (its *role*):

=================  =========================================================================
role               served by
=================  =========================================================================
reading            the publisher, every tick: ``read`` takes the tick's ``Publication``
setpoint           the setpoint desk: a put goes through the faults to the converter
readback           a converter's output: an element of ``$(P)READBACKS`` (a CP link, in C)
bpm_reading        one BPM's reading: an element of ``$(P)ORBIT:X`` / ``:Y`` (a CP link)
array              ``$(P)READBACKS``: every readback, published once per tick
names              a fixed list of names (BPMs, readbacks, table columns)
table              the PVA NTTable of the orbit (a QSRV group of other records)
converter_status   the fault desk: a converter on or off, tripped or not
power_switch       the setpoint desk: a converter switched on or off
control            the setpoint desk: a run-time setting (``CONTROLS``)
command            the fault desk or the snapshots: a command given as a string
report             the desk that owns it: what the commands did, the lists they keep
optics_mode        the setpoint desk: every converter of an optics mode, as one batch
inert_setting      the inert desk: a setting the twin keeps (autosaved, journaled) that drives nothing
inert_readback     the inert desk: the readback of an inert setting (a CP link to it, in C)
=================  =========================================================================

A reading *by point* (the beam sizes) shows the value at the lattice element its row names as device.
The twin refuses to start on a row whose signal is not here, or whose record kind the signal does not
take, or whose device the machine lacks (``check``). The twin-only rows, the same on every machine,
are listed here too (``twin_rows``): the derive tools write them into each machine's table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from twinioc.model.state import BeamState, Equilibrium
from twinioc.model.tables import PV_COLUMNS, MachineTables, PvRow, TableError

READING_RECORDS = ("ai", "longin", "stringin", "longstring", "bi", "waveform", "long_waveform")
SHORT_WINDOW_S, LONG_WINDOW_S = 10.0, 100.0  # the current monitor's lifetime windows
# The MLS BPM buffer (BPMZ1X003GP:rdBufBpm): 256 DBF_LONG elements (cainfo inventory); a BPM's x at its
# slot (bpms.csv), its y 32 elements on (assumed), in counts of betagui's 0.3051758e-3 mm (20/65536 mm
# to 7 digits: +-10 mm in 16 bits).
BPM_BUFFER_LENGTH, BPM_BUFFER_Y_OFFSET, BPM_BUFFER_MM_PER_COUNT = 256, 32, 0.3051758e-3


@dataclass
class Publication:
    """What one tick publishes: the model's state, the BPMs' reading of it, the stored beam and the
    twin's own counters."""

    state: BeamState | None  # the model's (None before the first, while no worker answers)
    reading: BeamState | None  # the same, with the orbit as the BPMs read it (their errors, noise and faults)
    current: float  # mA
    lifetime_h: float
    alive: bool  # a beam is stored
    lost_reason: str  # why there is no beam ("" while there is)
    journal_seq: int
    restarts: int  # of the physics worker
    physics_status: str
    updates: int = 0  # publications of a beam state, this one included: the publisher counts them
    equilibrium: Equilibrium | None = None  # the newest (None before the first)
    equilibrium_status: str = ""
    lifetime_source: str = ""  # where ``lifetime_h`` comes from
    touschek_h: float = math.nan  # at the current of the moment
    gas_h: float = math.nan
    measured_lifetime_h: dict = field(default_factory=dict)  # window (s) -> the current monitor's fit
    dose_per_lost_watt: float = 0.0  # a dose monitor's reading per W of beam power lost ([beam] dose_per_lost_watt)
    bpm_buffer_slots: tuple[int | None, ...] | None = None  # each BPM's slot in the BPM buffer (``MachineTables``)


@dataclass(frozen=True)
class Signal:
    name: str
    role: str
    doc: str  # what it shows, or what a put on it does
    read: Callable[[Publication], object] | None = None  # readings; None: not known (INVALID)
    needs: str = ""  # readings: "beam" (INVALID without one), "stored" (0 without one), "model", "" (always valid)
    by_point: bool = False  # readings: ``read`` gives {source point: value}; a row's device names its point

    @property
    def records(self) -> tuple[str, ...]:
        """The record kinds a row of this signal may build."""
        if self.role == "reading":
            return READING_RECORDS
        return ROLE_RECORDS[self.role] if self.role != "control" else (CONTROLS[self.name].record,)


ROLE_RECORDS = {"setpoint": ("ao",), "readback": ("ai",), "bpm_reading": ("ai",), "array": ("waveform",),
                "names": ("names",), "table": ("table",), "converter_status": ("mbbi",), "power_switch": ("bo",),
                "command": ("command",), "report": ("longstring", "longin"), "optics_mode": ("mbbo",),
                "inert_setting": ("ao", "bo"), "inert_readback": ("ai",),
                "orbit_feedback": ("longout", "bo", "ai", "longstring", "waveform_out"), "replay_marker": ("bo",)}
DEVICE_ROLES = {"setpoint": "converter", "readback": "converter", "converter_status": "converter",
                "power_switch": "converter", "bpm_reading": "BPM"}


def _khz(tune: float, state: BeamState) -> float:
    return (tune - math.floor(tune)) * state.revolution_frequency / 1e3


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _reading(name: str, doc: str, read: Callable[[Publication], object], needs: str = "beam") -> Signal:
    return Signal(name, "reading", doc, read, needs)


def _equilibrium(name: str, doc: str, read: Callable[[Equilibrium], object], needs: str = "model",
                 by_point: bool = False) -> Signal:
    """A reading of the equilibrium: not known (None) before the first or when it failed."""
    def of_equilibrium(p: Publication) -> object:
        e = p.equilibrium
        return None if e is None or e.reason else read(e)

    return Signal(name, "reading", doc, of_equilibrium, needs, by_point)


def _known(value: float) -> float | None:
    return value if math.isfinite(value) or value == math.inf else None


def _sizes(e: Equilibrium, plane: int) -> dict[str, float]:
    return {point: sizes[plane] * 1e6 for point, sizes in e.beam_sizes.items()}


def _dose(p: Publication) -> float | None:
    """k × the beam power lost, P = I / τ × E (A, s, V: W), with the lifetime the current decays with
    now; not known while the lifetime is not."""
    if not p.lifetime_h > 0:
        return None
    return p.dose_per_lost_watt * p.current * 1e-3 / (p.lifetime_h * 3600.0) * p.state.energy


def _counts(orbit_m: np.ndarray) -> np.ndarray:
    """BPM readings (m) in buffer counts; a reading that is no number (a BPM fault) counts 0."""
    counts = np.rint(np.nan_to_num(orbit_m * 1e3 / BPM_BUFFER_MM_PER_COUNT))
    limits = np.iinfo(np.int32)
    return np.clip(counts, limits.min, limits.max).astype(np.int32)


def _bpm_buffer(p: Publication) -> np.ndarray | None:
    """The BPM buffer: each BPM's reading in counts, x at its slot and y ``BPM_BUFFER_Y_OFFSET`` on;
    0 in every other element. Not known on a machine whose BPMs have no slots."""
    if p.bpm_buffer_slots is None:
        return None
    bpms = [i for i, slot in enumerate(p.bpm_buffer_slots) if slot is not None]
    slots = np.array([p.bpm_buffer_slots[i] for i in bpms], dtype=int)
    buffer = np.zeros(BPM_BUFFER_LENGTH, dtype=np.int32)
    buffer[slots] = _counts(p.reading.x[bpms])
    buffer[slots + BPM_BUFFER_Y_OFFSET] = _counts(p.reading.y[bpms])
    return buffer


READINGS = [
    _reading("tune_h_khz", "frac(Qx) · f_rev, kHz", lambda p: _khz(p.reading.tune[0], p.reading)),
    _reading("tune_v_khz", "frac(Qy) · f_rev, kHz", lambda p: _khz(p.reading.tune[1], p.reading)),
    _reading("tune_s_khz", "Qs · f_rev, kHz", lambda p: p.reading.synchrotron_tune * p.reading.revolution_frequency
             / 1e3),
    _reading("tune_s_hz", "Qs · f_rev, Hz", lambda p: p.reading.synchrotron_tune * p.reading.revolution_frequency),
    _reading("tune_x", "fractional horizontal tune", lambda p: p.reading.fractional_tune[0]),
    _reading("tune_y", "fractional vertical tune", lambda p: p.reading.fractional_tune[1]),
    _reading("tune_s", "synchrotron tune", lambda p: p.reading.synchrotron_tune),
    _reading("chrom_x", "horizontal chromaticity", lambda p: p.reading.chromaticity[0]),
    _reading("chrom_y", "vertical chromaticity", lambda p: p.reading.chromaticity[1]),
    _reading("momentum_offset", "δ of the closed orbit", lambda p: p.reading.momentum_offset),
    _reading("momentum_compaction", "α_c of the closed orbit", lambda p: p.reading.momentum_compaction),
    _reading("orbit", "the orbit as the BPMs read it, x0 y0 x1 y1 ..., nm",
             lambda p: np.column_stack([p.reading.x, p.reading.y]).ravel() * 1e9),
    _reading("orbit_x", "horizontal orbit as the BPMs read it, mm", lambda p: p.reading.x * 1e3),
    _reading("orbit_y", "vertical orbit as the BPMs read it, mm", lambda p: p.reading.y * 1e3),
    _reading("beam_current", "stored beam current, mA (0 without beam)", lambda p: p.current, "stored"),
    _reading("lifetime_h", "the lifetime the current decays with now, h (0 without beam)",
             lambda p: p.lifetime_h, "stored"),
    _reading("measured_lifetime_10s", "lifetime fitted to the current monitor's readings of the last 10 s, h",
             lambda p: _known(p.measured_lifetime_h.get(SHORT_WINDOW_S, math.nan)), "stored"),
    _reading("measured_lifetime_100s", "lifetime fitted to the current monitor's readings of the last 100 s, h",
             lambda p: _known(p.measured_lifetime_h.get(LONG_WINDOW_S, math.nan)), "stored"),
    _reading("current_lifetime_product", "current × 100 s lifetime, mA h",
             lambda p: _known(p.current * p.measured_lifetime_h.get(LONG_WINDOW_S, math.nan)), "stored"),
    _reading("lifetime_source", "where the lifetime comes from: physics or an override",
             lambda p: p.lifetime_source[:255], ""),
    _reading("lifetime_touschek_h", "Touschek lifetime at the current of the moment, h",
             lambda p: _known(p.touschek_h), "model"),
    _reading("lifetime_gas_h", "gas-scattering lifetime, h", lambda p: p.gas_h, "model"),
    _equilibrium("emittance_x_nm", "horizontal emittance (mode I), nm rad", lambda e: e.emittance[0] * 1e9),
    _equilibrium("emittance_y_nm", "vertical emittance (mode II, with the floor), nm rad",
                 lambda e: e.emittance[1] * 1e9),
    _equilibrium("energy_spread", "relative rms energy spread", lambda e: e.energy_spread),
    _equilibrium("bunch_length_mm", "rms bunch length, mm", lambda e: e.bunch_length * 1e3),
    _equilibrium("damping_x_ms", "damping time of mode I, ms", lambda e: e.damping_times[0] * 1e3),
    _equilibrium("damping_y_ms", "damping time of mode II, ms", lambda e: e.damping_times[1] * 1e3),
    _equilibrium("damping_s_ms", "longitudinal damping time, ms", lambda e: e.damping_times[2] * 1e3),
    _equilibrium("energy_loss_kev", "energy radiated per turn, keV", lambda e: e.energy_loss / 1e3),
    _equilibrium("bucket_height", "half height of the RF bucket, relative", lambda e: e.bucket_height),
    _equilibrium("momentum_acceptance", "momentum acceptance of the Touschek lifetime: RF bucket or lattice",
                 lambda e: e.momentum_acceptance),
    _equilibrium("equilibrium_ms", "duration of the last equilibrium computation, ms",
                 lambda e: e.compute_seconds * 1e3),
    _equilibrium("equilibrium_version", "lattice version of the published equilibrium", lambda e: e.version),
    _equilibrium("beam_size_x_um", "rms horizontal beam size at a source point, µm", lambda e: _sizes(e, 0),
                 "beam", by_point=True),
    _equilibrium("beam_size_y_um", "rms vertical beam size at a source point, µm", lambda e: _sizes(e, 1),
                 "beam", by_point=True),
    _reading("version", "lattice version of the published state", lambda p: p.state.version, "model"),
    _reading("computed_at", "UTC time of the last computation", lambda p: _utc(p.state.computed_at), "model"),
    _reading("compute_ms", "duration of the last computation, ms", lambda p: p.state.compute_seconds * 1e3, "model"),
    _reading("energy_mev", "the energy the dipoles are set for, MeV", lambda p: p.state.energy / 1e6, "model"),
    _reading("true_orbit_x", "horizontal orbit of the model, before the BPMs, mm", lambda p: p.state.x * 1e3, "model"),
    _reading("true_orbit_y", "vertical orbit of the model, before the BPMs, mm", lambda p: p.state.y * 1e3, "model"),
    _reading("beam_lost", "1: no beam stored", lambda p: int(not p.alive), "model"),
    _reading("lost_reason", "why there is no beam", lambda p: p.lost_reason[:255], "model"),
    _reading("updates", "publications since start", lambda p: p.updates, ""),
    _reading("journal_seq", "number of the last journal entry", lambda p: p.journal_seq, ""),
    _reading("physics_restarts", "restarts of the physics worker since start", lambda p: p.restarts, ""),
    _reading("physics_status", "what the physics worker is doing", lambda p: p.physics_status[:255], ""),
    _reading("equilibrium_status", "what the equilibrium worker is doing", lambda p: p.equilibrium_status[:255], ""),
    _reading("dose_rate", "a dose-rate monitor: k × the beam power lost, (I / τ) · E (0 without beam)", _dose,
             "stored"),
    _reading("bpm_buffer", "the BPM buffer: each BPM's x at its slot, y 32 on, in counts of 0.3051758e-3 mm",
             _bpm_buffer),
]


@dataclass(frozen=True)
class Control:
    """A run-time setting of the twin: its record kind and what it acts on (a ``RunTime``)."""

    record: str
    doc: str
    show: Callable[[object], float]  # the value the twin starts with
    put: Callable[[object, float], None]  # what a put does


def _noise(run, value: float) -> None:
    run.bpm_errors.noise[:] = value * 1e-6


def _lifetime(run, value: float) -> None:
    run.lifetime.override_h = value if value > 0 else math.nan


def _lifetime_shown(run) -> float:
    return 0.0 if math.isnan(run.lifetime.override_h) else run.lifetime.override_h


def _band(run, low: float | None = None, high: float | None = None) -> None:
    run.beam.band = (run.beam.band[0] if low is None else low, run.beam.band[1] if high is None else high)


def _inject(run, value: float) -> None:
    if value:
        run.beam.inject()


def _topup(run, value: float) -> None:
    run.beam.topup = bool(value)


CONTROLS = {
    "bpm_noise_um": Control("ao", "σ of every BPM reading, µm", lambda run: float(np.mean(run.bpm_errors.noise)) * 1e6,
                            _noise),
    "lifetime_setting_h": Control("ao", "beam lifetime override, h; 0: from physics (Touschek and gas)",
                                  _lifetime_shown, _lifetime),
    "inject": Control("bo", "1: inject, filling to nominal or to the top of the top-up band", lambda run: 0, _inject),
    "topup": Control("bo", "top-up on or off", lambda run: int(run.beam.topup), _topup),
    "topup_low_mA": Control("ao", "top-up injects below this current", lambda run: run.beam.band[0],
                            lambda run, value: _band(run, low=value)),
    "topup_high_mA": Control("ao", "top-up fills up to this current", lambda run: run.beam.band[1],
                             lambda run, value: _band(run, high=value)),
    "ramp": Control("bo", "converters ramp at their slew rates, or jump", lambda run: int(run.ramp),
                    lambda run, value: run.set_ramp(bool(value))),
}

OTHERS = [
    Signal("setpoint", "setpoint", "a converter's setpoint: checked, journaled, through the faults to the converter"),
    Signal("readback", "readback", "a converter's output (with its noise): its element of $(P)READBACKS"),
    Signal("readbacks", "array", "every converter's readback, in $(P)READBACKS:NAMES order"),
    Signal("bpm_x", "bpm_reading", "a BPM's horizontal reading, mm: its element of $(P)ORBIT:X"),
    Signal("bpm_y", "bpm_reading", "a BPM's vertical reading, mm: its element of $(P)ORBIT:Y"),
    Signal("bpm_names", "names", "the BPM names in orbit order"),
    Signal("readback_names", "names", "the converter of each $(P)READBACKS element"),
    Signal("table_columns", "names", "the column names of the orbit table"),
    Signal("bpm_table", "table", "the orbit as a PVA NTTable: BPM, X, Y (mm)"),
    Signal("power", "converter_status", "a converter's power: OFF, or ON (tripped: OFF)"),
    Signal("fault", "converter_status", "a converter's fault state: OK, or FAULT (MAJOR) while tripped"),
    Signal("power_switch", "power_switch", "switch a converter off (its output ramps to zero) or on"),
    Signal("fault_add", "command", "add a fault: KIND PATTERN key=value ..."),
    Signal("fault_clear", "command", "clear a fault by its number, or all"),
    Signal("snapshot_save", "command", "save the twin's whole state under a name"),
    Signal("snapshot_restore", "command", "restore a saved state by name"),
    Signal("fault_list", "report", "the faults in force, one per line"),
    Signal("fault_count", "report", "the number of faults in force"),
    Signal("snapshot_list", "report", "the saved snapshots, one per line"),
    Signal("command_result", "report", "what the last fault or snapshot command did, or why it was refused"),
    Signal("seed", "report", "the seed of every random number of this run (a snapshot may bring another)"),
    Signal("optics_mode", "optics_mode", "set every converter of an optics mode to its table value, as one batch"),
    Signal("optics_table", "optics_mode", "a machine's own optics selector, its modes in its own order (the row's "
           "description): tied both ways to $(P)OPTICS:MODE"),
    Signal("replay_marker", "replay_marker", "on while a journal replay sends: its setpoint puts are journaled as "
           "the replay's; off by itself 30 s after the last"),
    Signal("feedback_run_mode", "orbit_feedback", "the slow orbit feedback's run mode: 0 off, any other value on"),
    Signal("feedback_switch", "orbit_feedback", "the slow orbit feedback off or on"),
    Signal("feedback_status", "orbit_feedback", "the run mode in effect: 0 while the feedback is not correcting"),
    Signal("feedback_state", "orbit_feedback", "what the slow orbit feedback is doing"),
    Signal("orbit_reference_x", "orbit_feedback", "the horizontal orbit the feedback steers the readings to, mm"),
    Signal("orbit_reference_y", "orbit_feedback", "the vertical orbit the feedback steers the readings to, mm"),
    Signal("inert_setting", "inert_setting", "a setting the twin keeps, autosaved and journaled, that drives nothing: "
           "no effect on the beam"),
    Signal("inert_readback", "inert_readback", "the readback of the inert setting of its row's device"),
]

SIGNALS: dict[str, Signal] = {s.name: s for s in READINGS + OTHERS} | {
    name: Signal(name, "control", control.doc) for name, control in CONTROLS.items()}


def check(rows: list[PvRow], tables: MachineTables) -> None:
    """Refuse a table the twin cannot serve as it stands: an unknown signal, a record kind the signal
    does not take, a device the machine does not have. The message names the row."""
    devices = {"converter": set(tables.converters), "BPM": set(tables.bpm_names), "lattice element": None}
    for row in rows:
        signal = SIGNALS.get(row.signal)
        if signal is None:
            raise TableError(f"{row.where}: unknown signal {row.signal!r} (known: {', '.join(SIGNALS)})")
        if row.record not in signal.records:
            raise TableError(f"{row.where}: signal {row.signal!r} takes a record of kind "
                             f"{' or '.join(signal.records)}, not {row.record!r}")
        kind = "lattice element" if signal.by_point else DEVICE_ROLES.get(signal.role)
        if kind == "lattice element" and devices[kind] is None:
            devices[kind] = set(tables.element_names())
        if kind and row.device not in devices[kind]:
            raise TableError(f"{row.where}: {row.device!r} is not a {kind} of this machine")


# -- the twin-only rows -------------------------------------------------------------------------


def pv_row(pv, record, device="", signal="", unit="", prec="", low="", high="", initial="", nelm="",
           description="", source="") -> dict:
    """A row of ``pvs.csv``, its columns in the table's order."""
    values = locals()
    return {column: values[column] for column in PV_COLUMNS}


# suffix under $(P), record kind, signal, unit, precision, description
TWIN_PVS = [
    ("TUNE:X", "ai", "tune_x", "", 5, "fractional horizontal tune"),
    ("TUNE:Y", "ai", "tune_y", "", 5, "fractional vertical tune"),
    ("TUNE:S", "ai", "tune_s", "", 6, "synchrotron tune"),
    ("CHROM:X", "ai", "chrom_x", "", 3, "horizontal chromaticity"),
    ("CHROM:Y", "ai", "chrom_y", "", 3, "vertical chromaticity"),
    ("MOMENTUM:OFFSET", "ai", "momentum_offset", "", 7, "momentum offset of the closed orbit"),
    ("MOMENTUM:COMPACTION", "ai", "momentum_compaction", "", 7, "momentum compaction factor"),
    ("ORBIT:X", "waveform", "orbit_x", "mm", 6, "horizontal orbit as the BPMs read it"),
    ("ORBIT:Y", "waveform", "orbit_y", "mm", 6, "vertical orbit as the BPMs read it"),
    ("ORBIT:TRUE:X", "waveform", "true_orbit_x", "mm", 6, "horizontal orbit of the model at the BPMs"),
    ("ORBIT:TRUE:Y", "waveform", "true_orbit_y", "mm", 6, "vertical orbit of the model at the BPMs"),
    ("ORBIT:NAMES", "names", "bpm_names", "", "", "BPM names in orbit order"),
    ("LATTICE:VERSION", "longin", "version", "", "", "lattice version of the published state"),
    ("UPDATES", "longin", "updates", "", "", "publications since start"),
    ("COMPUTED:AT", "stringin", "computed_at", "", "", "UTC time of the last computation"),
    ("COMPUTE:TIME", "ai", "compute_ms", "ms", 2, "duration of the last computation"),
    ("BEAM:LOST", "bi", "beam_lost", "", "", "no stable closed orbit"),
    ("BEAM:LOST:REASON", "longstring", "lost_reason", "", "", "why the beam is lost"),
    ("BEAM:CURRENT", "ai", "beam_current", "mA", 3, "stored beam current"),
    ("SEED", "longin", "seed", "", "", "seed of every random number of this run"),
    ("PHYSICS:RESTARTS", "longin", "physics_restarts", "", "", "restarts of the physics worker"),
    ("PHYSICS:STATUS", "longstring", "physics_status", "", "", "what the physics worker is doing"),
    ("EMITTANCE:X", "ai", "emittance_x_nm", "nm rad", 4, "horizontal emittance (mode I)"),
    ("EMITTANCE:Y", "ai", "emittance_y_nm", "nm rad", 5, "vertical emittance (mode II, with the floor)"),
    ("ENERGY:SPREAD", "ai", "energy_spread", "", 7, "relative rms energy spread"),
    ("BUNCH:LENGTH", "ai", "bunch_length_mm", "mm", 4, "rms bunch length"),
    ("DAMPING:X", "ai", "damping_x_ms", "ms", 3, "damping time of mode I"),
    ("DAMPING:Y", "ai", "damping_y_ms", "ms", 3, "damping time of mode II"),
    ("DAMPING:S", "ai", "damping_s_ms", "ms", 3, "longitudinal damping time"),
    ("ENERGY:LOSS", "ai", "energy_loss_kev", "keV", 3, "energy radiated per turn"),
    ("RF:BUCKET:HEIGHT", "ai", "bucket_height", "", 5, "half height of the RF bucket"),
    ("MOMENTUM:ACCEPTANCE", "ai", "momentum_acceptance", "", 5, "momentum acceptance (RF bucket or lattice)"),
    ("EMITTANCE:COMPUTE:TIME", "ai", "equilibrium_ms", "ms", 1, "duration of the last equilibrium computation"),
    ("EMITTANCE:VERSION", "longin", "equilibrium_version", "", "", "lattice version of the equilibrium"),
    ("EQUILIBRIUM:STATUS", "longstring", "equilibrium_status", "", "", "what the equilibrium worker is doing"),
    ("LIFETIME", "ai", "lifetime_h", "h", 3, "the lifetime the current decays with now"),
    ("LIFETIME:SOURCE", "longstring", "lifetime_source", "", "", "where the lifetime comes from"),
    ("LIFETIME:TOUSCHEK", "ai", "lifetime_touschek_h", "h", 3, "Touschek lifetime at the current of the moment"),
    ("LIFETIME:GAS", "ai", "lifetime_gas_h", "h", 3, "gas-scattering lifetime"),
    ("LIFETIME:MEASURED", "ai", "measured_lifetime_100s", "h", 3, "lifetime fitted to 100 s of current readings"),
]
# The twin's commands (long strings a client puts) and what they report: suffix, record, signal,
# length of the string, description
TWIN_COMMANDS = [
    ("FAULT:ADD", "command", "fault_add", 256, "add a fault: KIND PATTERN key=value ..."),
    ("FAULT:CLEAR", "command", "fault_clear", 64, "clear a fault by its number, or all"),
    ("FAULT:LIST", "longstring", "fault_list", 4096, "active faults, one per line"),
    ("FAULT:COUNT", "longin", "fault_count", "", "number of active faults"),
    ("SNAPSHOT:SAVE", "command", "snapshot_save", 64, "save the twin's whole state under a name"),
    ("SNAPSHOT:RESTORE", "command", "snapshot_restore", 64, "restore a saved state by name"),
    ("SNAPSHOT:LIST", "longstring", "snapshot_list", 4096, "saved snapshots, one per line"),
    ("COMMAND:RESULT", "longstring", "command_result", 256, "what the last fault or snapshot command did"),
    ("JOURNAL:SEQ", "longin", "journal_seq", "", "number of the last journal entry"),
]
# Run-time controls: suffix, record, signal, unit, low, high, description (bo: the state names)
TWIN_CONTROLS = [
    ("BPM:NOISE", "ao", "bpm_noise_um", "um", 0, 1000, "sigma of every BPM reading"),
    ("BEAM:LIFETIME", "ao", "lifetime_setting_h", "h", 0, 1000, "lifetime override; 0: from physics"),
    ("BEAM:INJECT", "bo", "inject", "", "", "", "IDLE/INJECT"),
    ("TOPUP:ENABLE", "bo", "topup", "", "", "", "OFF/ON"),
    ("TOPUP:LOW", "ao", "topup_low_mA", "mA", 0, 1000, "top-up injects below this current"),
    ("TOPUP:HIGH", "ao", "topup_high_mA", "mA", 0, 1000, "top-up fills up to this current"),
    ("RAMP:ENABLE", "bo", "ramp", "", "", "", "OFF/ON"),
]
# The orbit feedback's own (the switch is the machine's: a real name, or $(P)ORBIT:FEEDBACK) and the
# replay's marker: suffix, record, signal, unit, description
TWIN_FEEDBACK = [
    ("ORBIT:REFERENCE:X", "waveform_out", "orbit_reference_x", "mm", "horizontal orbit the feedback steers to"),
    ("ORBIT:REFERENCE:Y", "waveform_out", "orbit_reference_y", "mm", "vertical orbit the feedback steers to"),
    ("ORBIT:FEEDBACK:STATUS", "longstring", "feedback_state", "", "what the slow orbit feedback is doing"),
    ("REPLAY:ACTIVE", "bo", "replay_marker", "", "OFF/ON"),
]


def twin_rows(machine_rows: list[dict], n_bpms: int, modes: list[str] | None = None) -> list[dict]:
    """The twin-only PVs for a machine whose real PVs are *machine_rows*, with *n_bpms* BPMs and the
    optics *modes* of its tables."""
    rows = [pv_row(f"$(P){suffix}", record, signal=signal, unit=unit, prec=prec,
                   nelm=n_bpms if record in ("waveform", "names") else "",
                   description=description, source="twin only")
            for suffix, record, signal, unit, prec, description in TWIN_PVS]
    rows += [pv_row(f"$(P){suffix}", record, signal=signal, nelm=nelm, description=description,
                    source="twin only: faults, snapshots, journal")
             for suffix, record, signal, nelm, description in TWIN_COMMANDS]
    # Every converter readback in one array: the IOC publishes it once per tick, and the readback
    # PVs take their elements from it in the IOC's C code.
    n_readbacks = len({r["device"] for r in machine_rows if r["signal"] == "readback"})
    rows += [pv_row("$(P)READBACKS", "waveform", signal="readbacks", prec=4, nelm=n_readbacks,
                    description="every converter readback, in READBACKS:NAMES order", source="twin only"),
             pv_row("$(P)READBACKS:NAMES", "names", signal="readback_names", nelm=n_readbacks,
                    description="converter of each READBACKS element", source="twin only")]
    rows += [pv_row(f"$(P){suffix}", record, signal=signal, unit=unit, prec=3 if record == "ao" else "",
                    low=low, high=high, description=description, source="twin only: run-time control")
             for suffix, record, signal, unit, low, high, description in TWIN_CONTROLS]
    rows += [pv_row(f"$(P){suffix}", record, signal=signal, unit=unit, prec=4 if unit else "",
                    nelm=n_bpms if record == "waveform_out" else "", description=description,
                    source="twin only: orbit feedback, journal")
             for suffix, record, signal, unit, description in TWIN_FEEDBACK]
    if modes:
        rows.append(pv_row("$(P)OPTICS:MODE", "mbbo", signal="optics_mode", initial=modes[0],
                           description="/".join(modes), source="twin only: loads optics.csv"))
    return rows


def power_switch_row(converter: str) -> dict:
    """The twin-only on/off switch of a converter: off, its output ramps to zero."""
    return pv_row(f"$(P){converter}:POWER", "bo", converter, "power_switch", description="OFF/ON",
                  source="twin only: converter on/off")
