"""What the derive scripts share: their command line and the rows of the PV tables.

The derive scripts write a machine's real PV names themselves; the twin-only PVs under ``$(P)`` are
the same for every machine and are listed here once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arguments(doc: str, machine: str) -> argparse.Namespace:
    """``--reference`` (default ../shared/reference) and ``--out`` (default db/<machine>)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=ROOT.parent / "shared" / "reference")
    parser.add_argument("--out", type=Path, default=ROOT / "db" / machine,
                        help=f"folder to write (default: db/{machine})")
    return parser.parse_args()


def pv_row(pv, record, device="", signal="", unit="", prec="", low="", high="", initial="", nelm="",
           description="", source="") -> dict:
    return {"pv": pv, "record": record, "device": device, "signal": signal, "unit": unit,
            "prec": prec, "low": low, "high": high, "initial": initial, "nelm": nelm,
            "description": description, "source": source}


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
    ("BEAM:LIFETIME", "ao", "lifetime_setting_h", "h", 0, 1000, "beam lifetime; 0: no decay"),
    ("BEAM:INJECT", "bo", "inject", "", "", "", "IDLE/INJECT"),
    ("TOPUP:ENABLE", "bo", "topup", "", "", "", "OFF/ON"),
    ("TOPUP:LOW", "ao", "topup_low_mA", "mA", 0, 1000, "top-up injects below this current"),
    ("TOPUP:HIGH", "ao", "topup_high_mA", "mA", 0, 1000, "top-up fills up to this current"),
    ("RAMP:ENABLE", "bo", "ramp", "", "", "", "OFF/ON"),
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
    if modes:
        rows.append(pv_row("$(P)OPTICS:MODE", "mbbo", signal="optics_mode", initial=modes[0],
                           description="/".join(modes), source="twin only: loads optics.csv"))
    return rows


def power_switch_row(converter: str) -> dict:
    """The twin-only on/off switch of a converter: off, its output ramps to zero."""
    return pv_row(f"$(P){converter}:POWER", "bo", converter, "power_switch", description="OFF/ON",
                  source="twin only: converter on/off")
