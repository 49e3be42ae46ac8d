"""Derive the project's MLS data (lattice, device tables, optics modes) from the public reference files.

    python tools/derive_mls.py [--reference ../shared/reference] [--out db/mls]

What comes from where (details in each table's ``source`` column):

* geometry and the user-optics quadrupoles: lat2db's MLS JSON, with the four 0.1 m octupoles it lacks
  put back at s = 5.075, 18.825, 29.075, 42.825 m (the gaps in its element numbering), so that the
  ring is 48.000 m; the two 0.15 m halves of the cavity become one 0.3 m cavity;
* BPM positions: the mlsreflat element table (they agree with MML's mlsinit; the JSON's do not);
* converters: mlsreflat's power-supply map (24 quadrupole, 7 sextupole, 2 octupole PCs), MML's
  steerer list and ranges, dt4acc's quadrupole and steerer factors;
* optics modes: mlsreflat's strength tables, converted to converter currents.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import at
from derive_common import arguments, power_switch_row, pv_row, twin_rows
from twinioc.model.lattice_io import write_lattice
from twinioc.model.tables import write_csv

ENERGY = 629e6
HARMONIC_NUMBER = 80
CAVITY_VOLTAGE = 500e3  # the JSON's two cavity halves, 250 kV each

# MML's ranges (mlsinit) for families whose range the channel table gives, A
STEERER_RANGE = {"hsteerer": 3.51, "vsteerer": 7.0}

# Sextupoles: dt4acc's factor (1.7066e-8 per A) is on a scale that cannot give the mode tables'
# strengths within MML's 34 A. The twin assumes |PolynomB[2]| = 2.5 /m3 per A, which puts the
# strongest mode value (S2, injection, 81.7 /m3) at 32.7 A, with the sign that makes each family's
# usual current positive. S3 changes sign between modes, so the range is bipolar.
SEXTUPOLE_B2_PER_AMPERE = {"S1": 2.5, "S2": -2.5, "S3": -2.5}
SEXTUPOLE_MAX_CURRENT = 34.0
SEXTUPOLE_SOURCE = "assumed: |PolynomB2| = 2.5 /m3 per A (dt4acc's 1.7066e-8 is another scale); MML range 34 A"
# Octupoles: no public factor. |PolynomB[3]| = 80 /m4 per A puts the strongest mode value
# (injection, -400 /m4) at 5 A inside MML's [0, 6] A.
OCTUPOLE_B3_PER_AMPERE = -80.0
OCTUPOLE_SOURCE = "assumed: PolynomB3 = -80 /m4 per A; MML range [0, 6] A"
# The dipole converter BPRP: MML's range is [0, 630] A and the ring's design maximum 630 MeV; the
# twin assumes a field proportional to current with 629 A at 629 MeV (1 MeV per A).
BEND_NOMINAL_CURRENT = 629.0
BEND_SOURCE = "assumed: field proportional to current, 629 A at 629 MeV; MML range [0, 630] A"

RF_WINDOW_KHZ = 50.0  # accepted RF window around h*f_rev (SSMB runs 32 kHz above it)
CAVITY_RANGE_KV = (0.0, 600.0)

MODES = ["user", "injection", "low_alpha", "low_emittance", "ssmb"]


def _json(ref: Path) -> dict:
    return json.loads((ref / "lattices" / "mls_lattice_json.json").read_text())[0]


def _element_table(ref: Path) -> list[dict]:
    with (ref / "lattices" / "mls_lattice_low_emittance_elements.csv").open() as f:
        return list(csv.DictReader(f))


def _thick(e: dict) -> at.Element:
    """A pyAT element for one lat2db record (everything but drifts, monitors and markers)."""
    name, length = e["name"], float(e["length"])
    coeffs = e.get("element_configuration", {}).get("magnetic_element", {}).get("coeffs", {})
    normal = coeffs.get("normal_coefficients", [0, 0, 0])
    if e["type"] == "Quadrupole":
        return at.Quadrupole(name, length, float(normal[1]), NumIntSteps=10)
    if e["type"] == "Sextupole":
        return at.Sextupole(name, length, float(normal[2]), NumIntSteps=10, KickAngle=[0.0, 0.0])
    if e["type"] == "Dipole":
        return at.Dipole(name, length, e["bending_angle"], EntranceAngle=e["entranceangle"],
                         ExitAngle=e["exitangle"], FringeInt1=e["fringeint1"], FringeInt2=e["fringeint2"],
                         FullGap=e["fullgap"], NumIntSteps=10)
    raise ValueError(f"{name}: no rule for a {e['type']}")


def build_lattice(ref: Path) -> at.Lattice:
    table = _element_table(ref)
    octupoles = sorted((float(r["s_start_m"]), r["family_name"]) for r in table
                        if r["element_type"] == "Octupole")
    bpms = sorted((float(r["s_start_m"]), r["family_name"]) for r in table if r["element_type"] == "Monitor")
    undulator = next(r["family_name"] for r in table
                     if r["element_type"] == "Marker" and r["family_name"] != "SEP_MARKER")

    # 1. the JSON's sequence without its monitors, the octupoles put into the numbering gaps
    placed: list[tuple[float, at.Element]] = []  # (s at entrance, element)
    s, previous, cavity = 0.0, -1, False
    for e in _json(ref)["sequences"]:
        if e["index"] != previous + 1:
            s_oct, name = octupoles.pop(0)
            if not math.isclose(s_oct, s, abs_tol=1e-9):
                raise ValueError(f"{name} belongs at {s_oct} m but the gap is at {s} m")
            placed.append((s, at.Octupole(name, 0.1, [0, 0, 0, 0], [0, 0, 0, 0.0], NumIntSteps=10)))
            s += 0.1
        previous = e["index"]
        kind, length = e["type"], float(e["length"])
        if kind == "Drift":
            placed.append((s, at.Drift(e["name"], length)))
        elif kind == "Marker" and e["name"] == "UND_MARKER":
            placed.append((s, at.Marker(undulator)))
        elif kind == "Marker" and e["name"] == "SEP_MARKER":
            placed.append((s, at.Marker(e["name"])))
        elif kind == "RFCavity":
            if not cavity:  # the first half: one cavity of both halves' length and voltage
                cavity = True
                placed.append((s, at.RFCavity("CAV", 2 * length, CAVITY_VOLTAGE, 0.0, HARMONIC_NUMBER, ENERGY)))
        elif kind not in ("Monitor", "Marker"):
            placed.append((s, _thick(e)))
        s += length
    if octupoles:
        raise ValueError(f"octupoles without a gap: {octupoles}")
    # 2. monitors at the element table's positions: before the element they touch, splitting a drift
    elements: list[at.Element] = []
    for start, element in placed:
        end = start + element.Length
        here = [(b, name) for b, name in bpms if start <= b < end or b == start]
        cut = start
        for b, name in here:
            if b > cut:
                if not isinstance(element, at.Drift):
                    raise ValueError(f"BPM {name} at {b} m falls inside {element.FamName}")
                elements.append(at.Drift(element.FamName, b - cut))
                cut = b
            elements.append(at.Monitor(name))
            bpms.remove((b, name))
        if end - cut > 1e-12 or element.Length == 0:
            elements.append(element if cut == start else at.Drift(element.FamName, end - cut))
    if bpms:
        raise ValueError(f"BPMs not placed: {bpms}")
    ring = at.Lattice(elements, name="MLS", energy=ENERGY, periodicity=1, harmonic_number=HARMONIC_NUMBER)
    ring.set_rf_frequency()  # h * c / C
    return ring


def _magnet_strengths(ring: at.Lattice) -> dict[str, float]:
    """The strength each converter kind sets, per magnet: K1, PolynomB[2], PolynomB[3]."""
    values = {}
    for e in ring:
        if isinstance(e, at.Quadrupole):
            values[e.FamName] = float(e.PolynomB[1])
        elif isinstance(e, at.Sextupole):
            values[e.FamName] = float(e.PolynomB[2])
        elif isinstance(e, at.Octupole):
            values[e.FamName] = float(e.PolynomB[3])
    return values


def magnet_rows(ring: at.Lattice, ref: Path) -> list[dict]:
    """One row per winding: the element it sets, the property and the calibration."""
    setup = list(csv.DictReader((ref / "pvs" / "mls_accelerator_setup_DERIVED.csv").open()))
    factor = {r["magnet"]: float(r["magnetic_strength_per_unit_current(k)"]) for r in setup}
    supplies = json.loads((ref / "pvs" / "mls_storage_ring_power_supplies.json").read_text())
    rows = []
    for pc, magnets in supplies["quadrupole"].items():
        for m in magnets:
            rows.append({"magnet": m, "element": m, "converter": pc, "property": "K1",
                         "calibration": factor[m], "cal_unit": "1/m2/A",
                         "source": "dt4acc accelerator_setup factor (K1 per A); PC map mlsreflat"})
    for pc, magnets in supplies["sextupole"].items():
        for m in magnets:
            rows.append({"magnet": m, "element": m, "converter": pc, "property": "K2",
                         "calibration": SEXTUPOLE_B2_PER_AMPERE[m[:2]], "cal_unit": "1/m3/A",
                         "source": SEXTUPOLE_SOURCE})
    for pc, magnets in supplies["octupole"].items():
        for m in magnets:
            rows.append({"magnet": m, "element": m, "converter": pc, "property": "K3",
                         "calibration": OCTUPOLE_B3_PER_AMPERE, "cal_unit": "1/m4/A", "source": OCTUPOLE_SOURCE})
    for r in setup:
        if r["type"] != "Steerer":
            continue
        m = r["magnet"]  # HS3M2K1RP: the horizontal winding on sextupole S3M2K1RP
        element = m[1:]
        if not isinstance(ring[_index(ring, element)], at.Sextupole):
            raise ValueError(f"steerer {m}: {element} is not a sextupole")
        rows.append({"magnet": m, "element": element, "converter": r["power_converter"],
                     "property": "HKICK" if m.startswith("H") else "VKICK",
                     "calibration": float(r["magnetic_strength_per_unit_current(k)"]), "cal_unit": "T.m/A",
                     "source": "dt4acc accelerator_setup factor, integrated field (DESIGN.md)"})
    for e in ring:
        if isinstance(e, at.Dipole):
            rows.append({"magnet": e.FamName, "element": e.FamName, "converter": "BPRP", "property": "BEND",
                         "calibration": 1.0 / BEND_NOMINAL_CURRENT, "cal_unit": "1/A", "source": BEND_SOURCE})
    rows.append({"magnet": "CAV", "element": "CAV", "converter": "PAHRP", "property": "VOLTAGE",
                 "calibration": 1000.0, "cal_unit": "V/kV", "source": "one cavity; lat2db JSON 2 x 250 kV"})
    return rows


def _index(ring: at.Lattice, name: str) -> int:
    (index,) = [i for i, e in enumerate(ring) if e.FamName == name]
    return index


KINDS = {"K1": "quadrupole", "K2": "sextupole", "K3": "octupole", "HKICK": "hsteerer", "VKICK": "vsteerer",
         "BEND": "dipole", "VOLTAGE": "cavity"}


def converter_rows(ring: at.Lattice, magnets: list[dict], ref: Path) -> list[dict]:
    """One row per converter; the default current reproduces the lattice's (user-optics) strengths."""
    channels = list(csv.DictReader((ref / "pvs" / "mls_mml_channel_names_DERIVED_from_mlsinit.csv").open()))
    mml_range = {}
    for r in channels:
        if "range=[" in r["note"]:
            low, high = r["note"].split("range=[")[1].rstrip("]").split()
            mml_range[r["element"][:2]] = (float(low), float(high))
    strengths = _magnet_strengths(ring)
    rows: dict[str, dict] = {}
    for m in magnets:
        pc, kind = m["converter"], KINDS[m["property"]]
        if kind in ("quadrupole", "sextupole", "octupole"):
            default = strengths[m["element"]] / m["calibration"]
        elif kind == "dipole":
            default = BEND_NOMINAL_CURRENT
        elif kind == "cavity":
            default = CAVITY_VOLTAGE / m["calibration"]
        else:
            default = 0.0
        if kind == "quadrupole":
            (low, high), source = mml_range[m["magnet"][:2]], "default: lat2db JSON K1 / factor; range MML mlsinit"
        elif kind == "sextupole":
            low, high, source = -SEXTUPOLE_MAX_CURRENT, SEXTUPOLE_MAX_CURRENT, SEXTUPOLE_SOURCE
        elif kind == "octupole":
            (low, high), source = mml_range["OM"], OCTUPOLE_SOURCE
        elif kind in STEERER_RANGE:
            low, high, source = -STEERER_RANGE[kind], STEERER_RANGE[kind], "range MML mlsinit"
        elif kind == "dipole":
            low, high, source = 0.0, 630.0, BEND_SOURCE
        else:
            (low, high), source = CAVITY_RANGE_KV, "default lat2db JSON (2 x 250 kV); range assumed"
        row = rows.setdefault(pc, {"name": pc, "kind": kind, "unit": "kV" if kind == "cavity" else "A",
                                   "default": default, "low": low, "high": high, "max_step": "", "source": source})
        if not math.isclose(row["default"], default, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"{m['magnet']}: strength differs from the rest of converter {pc}")
        if not low <= default <= high:
            raise ValueError(f"{pc}: default {default} outside [{low}, {high}]")
    f_khz = ring.get_rf_frequency() / 1e3
    rows["MCLKHGP"] = {"name": "MCLKHGP", "kind": "rf", "unit": "kHz", "default": f_khz,
                       "low": f_khz - RF_WINDOW_KHZ, "high": f_khz + RF_WINDOW_KHZ, "max_step": "",
                       "source": f"design h*f_rev of the 48 m ring; window +-{RF_WINDOW_KHZ:g} kHz assumed"}
    order = ["quadrupole", "sextupole", "octupole", "hsteerer", "vsteerer", "dipole", "rf", "cavity"]
    return sorted(rows.values(), key=lambda r: order.index(r["kind"]))


def bpm_rows(ring: at.Lattice, ref: Path) -> list[dict]:
    """BPMs in MML's order (mlsinit), which starts with BPMZ1K1RP."""
    channels = csv.DictReader((ref / "pvs" / "mls_mml_channel_names_DERIVED_from_mlsinit.csv").open())
    names = [r["element"] for r in channels if r["family"] == "BPMx/BPMy"]
    monitors = {e.FamName for e in ring if isinstance(e, at.Monitor)}
    if set(names) != monitors or len(names) != 28:
        raise ValueError("the MML BPM list and the lattice's monitors differ")
    return [{"index": i, "name": n, "element": n, "source": "MML mlsinit BPM order"} for i, n in enumerate(names)]


def optics_rows(ring: at.Lattice, magnets: list[dict], converters: list[dict], ref: Path) -> list[dict]:
    """Converter settings of each optics mode: ``user`` is the default, the others mlsreflat's tables.

    The tables give element strengths (K for quadrupoles, H = PolynomB[2] for sextupoles, and
    "PolynomA[3]" for the octupoles, which the MLS uses as normal octupoles: read as PolynomB[3]).
    """
    on = {m["element"]: m for m in magnets if m["property"] in ("K1", "K2", "K3")}
    defaults = {c["name"]: c for c in converters if c["kind"] in ("quadrupole", "sextupole", "octupole")}
    rows = [{"mode": "user", "device": pc, "value": c["default"],
             "source": "lat2db JSON strengths (standard user optics)"} for pc, c in defaults.items()]
    for mode in MODES[1:]:
        currents: dict[str, float] = {}
        with (ref / "lattices" / f"mls_storage_ring_{mode}.csv").open() as f:
            for r in csv.DictReader(f):
                if not r["element"]:
                    continue
                m = on[r["element"]]
                current = float(r["value"]) / m["calibration"]
                if m["converter"] in currents and not math.isclose(currents[m["converter"]], current):
                    raise ValueError(f"{mode}: {r['element']} differs from the rest of {m['converter']}")
                currents[m["converter"]] = current
        if set(currents) != set(defaults):
            raise ValueError(f"{mode}: converters {set(defaults) ^ set(currents)} missing or unknown")
        for pc, current in currents.items():
            c = defaults[pc]
            if not c["low"] <= current <= c["high"]:
                raise ValueError(f"{mode}: {pc} at {current} A is outside [{c['low']}, {c['high']}]")
            rows.append({"mode": mode, "device": pc, "value": current + 0.0,
                         "source": f"mlsreflat {mode} strength table"})
    return rows


def pv_rows(converters: list[dict], bpms: list[dict]) -> list[dict]:
    """The MLS PV table: real names as the control room spells them, twin PVs under $(P)."""
    mml = "MML mlsinit channel table"
    rows = []
    for c in converters:
        name, kind = c["name"], c["kind"]
        if kind == "rf":
            rows += [pv_row(f"{name}:setFrq", "ao", name, "setpoint", "kHz", 4, c["low"], c["high"], c["default"],
                            description="RF master clock setpoint", source=f"{mml}; cainfo inventory"),
                     pv_row(f"{name}:rdFrq", "ai", name, "readback", "kHz", 4,
                            description="RF master clock readback", source=mml)]
        elif kind == "cavity":
            rows.append(pv_row(f"{name}:setVoltCav", "ao", name, "setpoint", "kV", 1, c["low"], c["high"],
                               c["default"], description="cavity voltage setpoint",
                               source=f"{mml}; cainfo inventory; kV as in the live snapshot (300)"))
        else:
            rows += [pv_row(f"{name}:setCur", "ao", name, "setpoint", "A", 4, c["low"], c["high"], c["default"],
                            description=f"{kind} converter setpoint", source=mml),
                     pv_row(f"{name}:rdCur", "ai", name, "readback", "A", 4,
                            description="converter readback", source=mml),
                     power_switch_row(name)]
    for b in bpms:
        rows += [pv_row(f"{b['name']}:rdX", "ai", b["name"], "bpm_x", "mm", 6, description="horizontal position",
                        source=f"{mml}; mm as in the live snapshot"),
                 pv_row(f"{b['name']}:rdY", "ai", b["name"], "bpm_y", "mm", 6, description="vertical position",
                        source=f"{mml}; mm as in the live snapshot")]
    inventory = "cainfo inventory (DBF_DOUBLE, 1)"
    rows += [
        pv_row("TUNEZRP:measX", "ai", signal="tune_h_khz", unit="kHz", prec=3, description="frac(Qx) * f_rev",
               source=inventory),
        pv_row("TUNEZRP:measY", "ai", signal="tune_v_khz", unit="kHz", prec=3, description="frac(Qy) * f_rev",
               source=inventory),
        pv_row("TUNEZRP:measZ", "ai", signal="tune_s_khz", unit="kHz", prec=3, description="Qs * f_rev",
               source=inventory),
        pv_row("cumz4x003gp:tuneSyn", "ai", signal="tune_s_hz", unit="Hz", prec=1, description="Qs * f_rev",
               source=f"{inventory}; Hz as in the live snapshot (39193)"),
        pv_row("CUM1ZK3RP:measCur", "ai", signal="beam_current", unit="mA", prec=3, description="stored beam current",
               source=inventory),
        pv_row("CUM1ZK3RP:rdCur", "ai", signal="beam_current", unit="mA", prec=3, description="stored beam current",
               source=mml),
        pv_row("CUM1ZK3RP:rdLt10", "ai", signal="measured_lifetime_10s", unit="h", prec=3,
               description="lifetime fitted to the current's decay over 10 s",
               source=f"{inventory}; window assumed 10 s from the name; noisy and negative at low current "
                      "in the live snapshot (-0.28 at 0.046 mA)"),
        pv_row("CUM1ZK3RP:rdLt100", "ai", signal="measured_lifetime_100s", unit="h", prec=3,
               description="lifetime fitted to the current's decay over 100 s",
               source=f"{inventory}; window assumed 100 s from the name"),
        pv_row("OPCHECKCCP:calcCurrLife", "ai", signal="current_lifetime_product", unit="mA h", prec=4,
               description="current x lifetime (100 s)",
               source=f"{inventory}; the live snapshot's value 0.019960 is measCur 0.046451 mA x rdLt100 "
                      "0.42971 h: the current-lifetime product"),
        *beam_size_rows(),
        pv_row("ERMPCGP:rdRmp", "ai", signal="energy_mev", unit="MeV", prec=2, description="beam energy of the ramp",
               source=f"{inventory}; MeV as in the live snapshot (250)"),
    ]
    return rows + twin_rows(rows, len(bpms), MODES)


# The MLS's two beam-size monitors, synchrotron-radiation profile monitors named for the straights
# L2 and L4 (betagui's SSMB tools: "QPD01 SR camera/profile monitor in L2", "QPD00 ... in L4"; the
# QPD00 width serves there as an energy-spread proxy, so its source is dispersive). No public file
# gives their source points: the twin takes the centre of the bend just upstream of each straight,
# whose light travels forward into that straight.
BEAM_SIZE_MONITORS = {"QPD01ZL2RP": "BM1L2RP", "QPD00ZL4RP": "BM1L4RP"}


def beam_size_rows() -> list[dict]:
    source = ("cainfo inventory (DBF_DOUBLE, 1); µm as in the live snapshot (430 / 115 at 250 MeV); "
              "source point assumed: the centre of {bend}, the bend before the straight the name gives")
    return [pv_row(f"{monitor}:rdSigma{plane}", "ai", bend, f"beam_size_{plane.lower()}_um", "um", 2,
                   description=f"rms {'horizontal' if plane == 'X' else 'vertical'} beam size at the source point",
                   source=source.format(bend=bend))
            for monitor, bend in BEAM_SIZE_MONITORS.items() for plane in ("X", "Y")]


def main() -> None:
    args = arguments(__doc__, "mls")
    ref = args.reference
    ring = build_lattice(ref)
    magnets = magnet_rows(ring, ref)
    converters = converter_rows(ring, magnets, ref)
    bpms = bpm_rows(ring, ref)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_lattice(ring, out / "lattice.json", source="lat2db MLS JSON + octupoles + mlsreflat BPM positions "
                                                       "via tools/derive_mls.py")
    write_csv(out / "converters.csv", converters)
    write_csv(out / "magnets.csv", magnets)
    write_csv(out / "bpms.csv", bpms)
    write_csv(out / "optics.csv", optics_rows(ring, magnets, converters, ref))
    write_csv(out / "pvs.csv", pv_rows(converters, bpms))
    print(f"{len(ring)} elements, {ring.circumference:.6f} m, {len(converters)} converters, "
          f"{len(magnets)} windings -> {out}")


if __name__ == "__main__":
    main()
