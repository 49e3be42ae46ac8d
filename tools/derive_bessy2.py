"""Derive the project's BESSY II data (lattice, device tables) from the public reference files.

The reference files stay in ``../shared/reference``; this script reads their numbers and writes the
project's own tables into ``db/bessy2/``.  Run it again when a reference changes:

    python tools/derive_bessy2.py [--reference ../shared/reference]

Every figure that is not in a reference is an assumption; its row says so in the ``source`` column.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import at
import numpy as np
from derive_common import arguments, power_switch_row, pv_row, twin_rows
from twinioc.model.lattice_io import write_lattice
from twinioc.model.tables import write_csv

# Sextupole converters: the Tracy standard-user file names the circuits (s1pr, s2pdr, s3pd1r,
# s3p1t6r, ...); which magnet hangs on which circuit follows from its name.
SEXTUPOLE_CIRCUITS = [
    (r"S1M.*", "S1PR"),
    (r"S2M.D.R", "S2PDR"),
    (r"S2M.T.R", "S2PTR"),
    (r"S3M.D1R", "S3PD1R"),
    (r"S3M.D.R", "S3PDR"),
    (r"S3M1T6R", "S3P1T6R"),
    (r"S3M2T6R", "S3P2T6R"),
    (r"S3M.T.R", "S3PTR"),
    (r"S4M.D1R", "S4PD1R"),
    (r"S4M.D.R", "S4PDR"),
    (r"S4M1T6R", "S4P1T6R"),
    (r"S4M2T6R", "S4P2T6R"),
    (r"S4M.T.R", "S4PTR"),
]
# No public current-to-strength calibration exists for the BESSY II sextupoles: the twin assumes
# one linear transfer function for all of them (PolynomB[2] per ampere), polarity in its sign.
SEXTUPOLE_B2_PER_AMPERE = 0.2
SEXTUPOLE_MAX_CURRENT = 300.0
SEXTUPOLE_SOURCE = "assumed: linear, |PolynomB2| = 0.2 /m3 per A (no public transfer function)"

# QIT6 has no converter in the LOCO table; the pyAML/dt4acc liaison names it PQIT6R.
QIT6_CONVERTER = "PQIT6R"

# RF master clock: a window around the design frequency within which the twin accepts puts.
RF_WINDOW_KHZ = 5.0


def load_reference_lattice(ref: Path) -> at.Lattice:
    return at.load_lattice(ref / "lattices" / "bessy2_standard_user.mat")


def quadrupole_rows(ring: at.Lattice, ref: Path) -> tuple[list[dict], list[dict]]:
    """Quadrupole converters and magnets.

    The default current of a converter is the machine's operating current from the LOCO table; each
    magnet's calibration is then design K1 / that current, so that the defaults reproduce the design
    lattice exactly (it agrees with the LOCO hw2phys factor within a few per cent).
    """
    loco = json.loads((ref / "pvs" / "bessy2_quad_loco_current_hw2phys.json").read_text())
    transfer = json.loads((ref / "pvs" / "calibration_data.json").read_text())
    saturation = transfer["I_s"]
    design_k = {e.FamName: float(e.PolynomB[1]) for e in ring if isinstance(e, at.Quadrupole)}

    def magnet_type(magnet: str) -> str:
        return "Q5M" if magnet.startswith("Q5") else magnet[:4]

    converters: dict[str, dict] = {}
    magnets = []
    for magnet, pc in loco["setpoint"].items():
        element = magnet if magnet in design_k else magnet + "R"
        if not pc:  # QIT6: converter named by the liaison table, Q5-type transfer function assumed
            pc = QIT6_CONVERTER
            hw2phys = float(np.mean([loco["hw2phys"][m] for m in loco["hw2phys"] if m.startswith("Q5")]))
            current = design_k[element] / hw2phys
            high = saturation["Q5M"]
            source = "assumed: Q5 mean hw2phys (QIT6 has no converter in the LOCO table)"
        else:
            hw2phys = loco["hw2phys"][magnet]
            current = loco["current"][magnet]
            high = saturation[magnet_type(magnet)]
            source = f"LOCO hw2phys {hw2phys:.7g} 1/m2/A; design K1 / LOCO current"
        row = converters.setdefault(
            pc,
            {"name": pc, "kind": "quadrupole", "unit": "A", "default": current,
             "low": 0.0, "high": high, "max_step": "",
             "source": "LOCO current (dt4acc hw2phys table); DRVH = saturation current I_s"},
        )
        row["high"] = min(row["high"], high)
        magnets.append({"magnet": magnet, "element": element, "converter": pc, "property": "K1",
                        "calibration": design_k[element] / row["default"], "cal_unit": "1/m2/A",
                        "source": source})
    return list(converters.values()), magnets


def sextupole_rows(ring: at.Lattice) -> tuple[list[dict], list[dict]]:
    converters: dict[str, dict] = {}
    magnets = []
    for e in ring:
        if not isinstance(e, at.Sextupole):
            continue
        pc = next(pc for pattern, pc in SEXTUPOLE_CIRCUITS if re.fullmatch(pattern, e.FamName))
        b2 = float(e.PolynomB[2])
        cal = np.sign(b2) * SEXTUPOLE_B2_PER_AMPERE
        current = b2 / cal
        row = converters.setdefault(
            pc, {"name": pc, "kind": "sextupole", "unit": "A", "default": current, "low": 0.0,
                 "high": SEXTUPOLE_MAX_CURRENT, "max_step": "", "source": SEXTUPOLE_SOURCE})
        if not np.isclose(row["default"], current):
            raise ValueError(f"{e.FamName}: strength differs from the rest of circuit {pc}")
        magnets.append({"magnet": e.FamName, "element": e.FamName, "converter": pc, "property": "K2",
                        "calibration": cal, "cal_unit": "1/m3/A", "source": SEXTUPOLE_SOURCE})
    return list(converters.values()), magnets


def steerer_rows(ref: Path) -> tuple[list[dict], list[dict]]:
    """Steerer windings: pyAML's integrated-field factors (T·m/A), limits from bact."""
    summary = list(csv.DictReader((ref / "pvs" / "bessy2_pv_summary_DERIVED.csv").open()))
    limits = json.loads((ref / "pvs" / "steerer_current_limits.json").read_text())
    bact = {s["name"]: s["conversion"]["slope"]
            for s in json.loads((ref / "pvs" / "steerer_conversions.json").read_text())["steerers"]}
    converters, magnets = [], []
    for row in summary:
        if row["kind"] not in ("HCM", "VCM"):
            continue
        pc = row["power_converter"]
        lim = limits[pc.lower()]
        converters.append({
            "name": pc, "kind": "hsteerer" if row["kind"] == "HCM" else "vsteerer", "unit": "A",
            "default": 0.0, "low": lim["neg_limit"], "high": lim["pos_limit"],
            "max_step": lim["pos_limit_dI"], "source": "limits: bact steerer_current_limits.json"})
        magnets.append({
            "magnet": row["element"], "element": row["lattice_element"].split("@")[0], "converter": pc,
            "property": "HKICK" if row["kind"] == "HCM" else "VKICK",
            "calibration": float(row["calibration"]), "cal_unit": "T.m/A",
            "source": f"pyAML BESSY2Orbit.yaml; bact slope {bact.get(pc, 'n/a')} (other scale, unused)"})
    return converters, magnets


def rf_row(ring: at.Lattice) -> dict:
    main_cavities = [i for i, e in enumerate(ring)
                     if isinstance(e, at.RFCavity) and e.HarmNumber == ring.harmonic_number]
    f_khz = ring.get_rf_frequency(cavpts=main_cavities) / 1e3
    return {"name": "MCLKHX251C", "kind": "rf", "unit": "kHz", "default": f_khz,
            "low": f_khz - RF_WINDOW_KHZ, "high": f_khz + RF_WINDOW_KHZ, "max_step": "",
            "source": "design h*f_rev of the lattice; window +-5 kHz assumed"}


def bpm_rows(ring: at.Lattice, ref: Path) -> list[dict]:
    summary = [r for r in csv.DictReader((ref / "pvs" / "bessy2_pv_summary_DERIVED.csv").open())
               if r["kind"] == "BPM"]
    names = {e.FamName for e in ring}
    rows = []
    for index, r in enumerate(summary):
        if r["lattice_element"] not in names:
            raise ValueError(f"BPM {r['element']} not in the lattice")
        rows.append({"index": index, "name": r["element"], "element": r["lattice_element"],
                     "source": "ORBITCC:rdPos order of pyAML BESSY2Orbit.yaml"})
    return rows


# Converter status words: their bit layout on the real machine is not public; the twin serves them
# as two-state mbbi records, a one-line change here when the real meaning is known.
STATUS_SOURCE = "assumed: state names not public"


def pv_rows(converters: list[dict], bpms: list[dict]) -> list[dict]:
    """The BESSY II PV table: real names as the control room spells them, twin PVs under $(P)."""
    rows = []
    for c in converters:
        name = c["name"]
        if c["kind"] == "rf":
            rows += [
                pv_row(f"{name}:freq", "ao", name, "setpoint", "kHz", 6, c["low"], c["high"], c["default"],
                       description="RF master clock setpoint", source="pyAML BESSY2Orbit.yaml"),
                pv_row(f"{name}:hwRdFreq", "ai", name, "readback", "kHz", 6,
                       description="RF master clock readback", source="bact MasterClock device")]
            continue
        rows += [
            pv_row(f"{name}:set", "ao", name, "setpoint", "A", 4, c["low"], c["high"], c["default"],
                   description=f"{c['kind']} converter setpoint", source="pyAML BESSY2*.yaml naming"),
            pv_row(f"{name}:rdbk", "ai", name, "readback", "A", 4, description="converter readback",
                   source="pyAML BESSY2*.yaml naming"),
            pv_row(f"{name}:stat1", "mbbi", name, "power", description="OFF/ON", source=STATUS_SOURCE),
            pv_row(f"{name}:stat2", "mbbi", name, "fault", description="OK/FAULT", source=STATUS_SOURCE),
            power_switch_row(name)]
    for b in bpms:
        rows += [pv_row(f"{b['name']}:rdX", "ai", b["name"], "bpm_x", "mm", 6, description="horizontal position",
                        source="DESIGN.md: per-BPM rdX/rdY in mm"),
                 pv_row(f"{b['name']}:rdY", "ai", b["name"], "bpm_y", "mm", 6, description="vertical position",
                        source="DESIGN.md: per-BPM rdX/rdY in mm")]
    n = len(bpms)
    rows += [
        pv_row("ORBITCC:rdPos", "waveform", signal="orbit", unit="nm", prec=0, nelm=2 * n,
               description="x0,y0,x1,y1,... in BPM order",
               source="nm: HZB dt4acc and pyAML BESSY2Orbit.yaml read it so"),
        pv_row("ORBITCC:rdBpmNames", "names", signal="bpm_names", nelm=n, description="BPM names in orbit order",
               source="DESIGN.md"),
        pv_row("ORBITCC:rdBpm", "table", signal="bpm_table",
               description="PVA NTTable: BPM, X [mm], Y [mm]", source="DESIGN.md"),
        pv_row("TUNEZR:rdH", "ai", signal="tune_h_khz", unit="kHz", prec=3, description="frac(Qx) * f_rev",
               source="DESIGN.md"),
        pv_row("TUNEZR:rdV", "ai", signal="tune_v_khz", unit="kHz", prec=3, description="frac(Qy) * f_rev",
               source="DESIGN.md"),
        pv_row("CUMZR:rdCur", "ai", signal="beam_current", unit="mA", prec=3, description="stored beam current",
               source="DESIGN.md"),
    ]
    rows.append(pv_row("$(P)ORBIT:COLUMNS", "names", signal="table_columns", nelm=3,
                       description="column names of ORBITCC:rdBpm", source="twin only"))
    rows += [pv_row("$(P)ORBIT:FEEDBACK", "bo", signal="feedback_switch", description="OFF/ON",
                    source="twin only: the slow orbit feedback's real PVs are not public"),
             pv_row("$(P)ORBIT:FEEDBACK:RUNNING", "ai", signal="feedback_status", prec=0,
                    description="1 while the feedback corrects, else 0", source="twin only")]
    rows += beam_size_rows()
    return rows + twin_rows(rows, n)


# No public file at hand names a BESSY II beam-size monitor: the twin shows beam sizes under its own
# prefix, at the centres of a high-beta and two low-beta straights and of one bend.
BEAM_SIZE_POINTS = {"D1": ("MRING_START", "centre of the high-beta straight D1 (s = 0)"),
                    "T1": ("W7IT1R", "centre of the low-beta straight T1, the W7 wiggler (s = 15 m)"),
                    "T2": ("CPMU20_MID", "centre of the low-beta straight T2, the CPMU20 undulator (s = 45 m)"),
                    "BM1T1R": ("BM1T1R", "centre of the bend BM1T1R, a dipole source (s = 9.39 m)")}


def beam_size_rows() -> list[dict]:
    return [pv_row(f"$(P)BEAMSIZE:{point}:{plane}", "ai", element, f"beam_size_{plane.lower()}_um", "um", 2,
                   description=f"rms {'horizontal' if plane == 'X' else 'vertical'} beam size, {where}",
                   source="twin only: no public BESSY II beam-size monitor name")
            for point, (element, where) in BEAM_SIZE_POINTS.items() for plane in ("X", "Y")]


def main() -> None:
    args = arguments(__doc__, "bessy2")
    ref = args.reference
    ring = load_reference_lattice(ref)

    quad_pcs, quad_mags = quadrupole_rows(ring, ref)
    sext_pcs, sext_mags = sextupole_rows(ring)
    steer_pcs, steer_mags = steerer_rows(ref)
    converters = quad_pcs + sext_pcs + steer_pcs + [rf_row(ring)]
    magnets = quad_mags + sext_mags + steer_mags

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_lattice(ring, out / "lattice.json",
                  source="bessy2_standard_user.mat (pyAML BESSY2 example) via tools/derive_bessy2.py")
    write_csv(out / "converters.csv", converters)
    write_csv(out / "magnets.csv", magnets)
    bpms = bpm_rows(ring, ref)
    write_csv(out / "bpms.csv", bpms)
    write_csv(out / "pvs.csv", pv_rows(converters, bpms))
    print(f"{len(ring)} elements, {len(converters)} converters, {len(magnets)} magnets -> {out}")


if __name__ == "__main__":
    main()
