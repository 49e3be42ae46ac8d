"""Derive the project's MLS data (lattice, device tables, optics modes) from the public reference files.

    python tools/derive_mls.py [--reference ../shared/reference] [--out db/mls]

What comes from where (details in each table's ``source`` column):

* geometry and the user-optics quadrupoles: lat2db's MLS JSON, with the four 0.1 m octupoles it lacks
  put back at s = 5.075, 18.825, 29.075, 42.825 m (the gaps in its element numbering), so that the
  ring is 48.000 m; the two 0.15 m halves of the cavity become one 0.3 m cavity;
* BPM positions: the mlsreflat element table (they agree with MML's mlsinit; the JSON's do not);
* converters: mlsreflat's power-supply map (24 quadrupole, 7 sextupole, 2 octupole PCs), MML's
  steerer list and ranges, dt4acc's quadrupole and steerer factors;
* optics modes: mlsreflat's strength tables, converted to converter currents;
* betagui's names the twin lacked (``legacy_rows``): the BPM buffer's slots from betagui's decoding,
  the dose monitor's calibration from the live snapshot, settings that drive nothing (``ioc/inert.py``).
"""

from __future__ import annotations

import csv
import json
import math
import tomllib
from pathlib import Path

import at
from derive_common import ROOT, arguments, power_switch_row, pv_row, twin_rows
from twinioc.ioc.signals import BPM_BUFFER_LENGTH, BPM_BUFFER_MM_PER_COUNT, BPM_BUFFER_Y_OFFSET
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
    """BPMs in MML's order (mlsinit), which starts with BPMZ1K1RP, with each one's slot in the BPM buffer."""
    channels = csv.DictReader((ref / "pvs" / "mls_mml_channel_names_DERIVED_from_mlsinit.csv").open())
    names = [r["element"] for r in channels if r["family"] == "BPMx/BPMy"]
    monitors = {e.FamName for e in ring if isinstance(e, at.Monitor)}
    if set(names) != monitors or len(names) != 28:
        raise ValueError("the MML BPM list and the lattice's monitors differ")
    slots = buffer_slots(ring)
    source = (f"MML mlsinit BPM order; buffer_slot: 0-based element of {BPM_BUFFER} holding its x (betagui's "
              f"decoding: 1-based slots 1-7, 9-15, 17-23, 25-31 in the order of s from {FIRST_BUFFER_BPM_S} m)")
    return [{"index": i, "name": n, "element": n, "buffer_slot": slots[n], "source": source}
            for i, n in enumerate(names)]


BPM_BUFFER = "BPMZ1X003GP:rdBufBpm"
FIRST_BUFFER_BPM_S = 1.2034  # m: betagui's list of the buffer's BPMs starts at this s
BUFFER_GROUP, BUFFER_STRIDE = 7, 8  # betagui's slots: 7 BPMs (a quarter of the ring), then one slot left out


def buffer_slots(ring: at.Lattice) -> dict[str, int]:
    """The 0-based element of the BPM buffer that holds each BPM's x: the BPMs in the order of s,
    in groups of 7 that start 8 elements apart."""
    s = ring.get_s_pos(range(len(ring)))
    by_s = sorted((float(s[i]), e.FamName) for i, e in enumerate(ring) if isinstance(e, at.Monitor))
    if not math.isclose(by_s[0][0], FIRST_BUFFER_BPM_S, abs_tol=1e-4):
        raise ValueError(f"the first BPM by s is at {by_s[0][0]} m, betagui's buffer list at {FIRST_BUFFER_BPM_S} m")
    slots = {name: k // BUFFER_GROUP * BUFFER_STRIDE + k % BUFFER_GROUP for k, (_, name) in enumerate(by_s)}
    if max(slots.values()) + BPM_BUFFER_Y_OFFSET >= BPM_BUFFER_LENGTH:
        raise ValueError(f"the BPMs' slots do not fit into {BPM_BUFFER_LENGTH} elements")
    return slots


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


def pv_rows(converters: list[dict], bpms: list[dict], ref: Path) -> list[dict]:
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
        *legacy_rows(converters, ref),
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


# -- betagui's names that the twin lacked ------------------------------------------------------------
# betagui (the MLS control room's chromaticity tool) uses 34 names; the cainfo inventory probed each.

NO_EFFECT = "no effect on the beam"
UNANSWERED = "not answered in the cainfo inventory (no type there)"


def legacy_rows(converters: list[dict], ref: Path) -> list[dict]:
    """The rows of betagui's names the twin serves besides its magnets, RF and beam readings."""
    return [*inert_rows(converters), *diagnostic_rows(ref), *feedback_rows()]


def inert_rows(converters: list[dict]) -> list[dict]:
    """Settings betagui puts whose effect the twin does not model (``ioc/inert.py``): kept, autosaved, journaled."""
    s2k = next(c for c in converters if c["name"] == "S2P2KRP")
    rows = [pv_row("S2P2RP:setCur", "ao", "S2P2RP", "inert_setting", "A", 4, s2k["low"], s2k["high"], s2k["default"],
                   description=f"S2P2 family setpoint; {NO_EFFECT}",
                   source="cainfo inventory (DBF_DOUBLE, 1, read/write): the real gateway answers it, but the public "
                          "power-supply map (mls_storage_ring_power_supplies.json) puts every S2 magnet on S2P1RP, "
                          "S2P2KRP or S2P2LRP: a family PV left from before the split into K/L; betagui writes it in "
                          "its secondary scan window. The twin keeps the value (autosaved, journaled, NaN/inf "
                          f"refused), which drives no magnet: {NO_EFFECT}. Limits and initial value those of S2P2KRP "
                          "(assumed)")]
    rows += [pv_row(f"IGPF:{plane}:FBCTRL", "bo", f"IGPF:{plane}", "inert_setting", initial="ON", description="OFF/ON",
                    source=f"{UNANSWERED}: the {name} bunch-by-bunch feedback (Dimtel iGp) on/off; betagui puts 0 to "
                           "switch it off during a measurement and restores the value it read: a bo OFF/ON (DBF_ENUM) "
                           "assumed, ON by default (assumed: a ring in user operation runs it); autosaved, journaled; "
                           f"{NO_EFFECT} (the twin has no bunch-by-bunch feedback)")
             for plane, name in (("X", "horizontal"), ("Y", "vertical"), ("Z", "longitudinal"))]
    rows.append(pv_row("PAHRP:cmdExtPhasMod", "bo", "PAHRP", "inert_setting", initial="disabled",
                       description="disabled/enabled",
                       source=f"{UNANSWERED}: external RF phase modulation command; betagui puts the string "
                              "'disabled' in its reset path, so an enum with a state 'disabled'; a bo (DBF_ENUM) "
                              "with the other state 'enabled' assumed; disabled by default; autosaved, journaled; "
                              f"{NO_EFFECT} (the twin models no RF phase modulation)"))
    noise = "the white-noise generator that excites the beam for the tune measurement"
    rows += [pv_row("$(P)WFGENC1CP:VOLT", "ao", "WFGENC1CP", "inert_setting", "V", 4, initial=0.011,
                    description=f"white-noise level; {NO_EFFECT}",
                    source=f"twin only: the setting of {noise}, whose real name is not public; 0.011 V as the live "
                           "snapshot's WFGENC1CP:rdVolt reads (V assumed); autosaved, journaled, finite values only; "
                           f"{NO_EFFECT} (the twin's tunes are computed, not measured from an excitation)"),
             pv_row("WFGENC1CP:rdVolt", "ai", "WFGENC1CP", "inert_readback", "V", 4,
                    description="white-noise generator level readback",
                    source=f"cainfo inventory (DBF_DOUBLE, 1); betagui reads it: {noise}; reads back "
                           f"$(P)WFGENC1CP:VOLT (V assumed; the live snapshot reads 0.011); {NO_EFFECT} in the twin")]
    return rows


def diagnostic_rows(ref: Path) -> list[dict]:
    """Readings: the other synchrotron-tune source, the dose monitor, the BPM buffer."""
    k, point = dose_calibration(ref)
    return [
        pv_row("JLC09VP", "ai", signal="tune_s_hz", unit="Hz", prec=1, description="Qs * f_rev",
               source=f"{UNANSWERED}: betagui's commented-out alternative source of the synchrotron tune; DBF_DOUBLE "
                      "in Hz like cumz4x003gp:tuneSyn assumed"),
        pv_row("SEKRRP:rdDose", "ai", signal="dose_rate", prec=9, description="dose rate from the beam losses",
               source=f"cainfo inventory (DBF_DOUBLE, 1); a dose-rate monitor, read as k x the beam power lost, "
                      f"P = I / tau x E (W from A, s, V; tau the lifetime the current decays with now): assumed. "
                      f"k = {k:.5g} per W ([beam] dose_per_lost_watt) from the live snapshot's one point, "
                      f"{point}; the unit is not public (none given); 0 (MAJOR) without beam"),
        pv_row(BPM_BUFFER, "long_waveform", signal="bpm_buffer", unit="counts", nelm=BPM_BUFFER_LENGTH,
               description=f"BPM buffer: x, y in counts of {BPM_BUFFER_MM_PER_COUNT * 1e3:g} um",
               source=f"cainfo inventory (DBF_LONG, {BPM_BUFFER_LENGTH}); betagui's (commented-out) decoding: the 28 "
                      f"BPMs' x at the slots of bpms.csv's buffer_slot, mm = count x {BPM_BUFFER_MM_PER_COUNT} "
                      f"(20/65536 to 7 digits); y at the same slots + {BPM_BUFFER_Y_OFFSET}: assumed; every other "
                      "element 0 (their meaning is not public); from the same readings as :rdX/:rdY, INVALID "
                      "without beam"),
    ]


SNAPSHOT_DOSE = ("SEKRRP:rdDose", "CUM1ZK3RP:measCur", "CUM1ZK3RP:rdLt100", "ERMPCGP:rdRmp")


def dose_calibration(ref: Path) -> tuple[float, str]:
    """k, the live snapshot's SEKRRP:rdDose over the beam power lost then, (I / tau) x E, and the point
    it comes from; k must be the value of ``[beam] dose_per_lost_watt`` in startup/mls.toml."""
    channels = json.loads((ref / "pvs" / "ssmb_machine_snapshot.json").read_text())["latest_monitor_sample"]
    values = {c["pv"]: c["value"] for c in channels["channels"].values()}
    dose, current_mA, lifetime_h, energy_MeV = (values[pv] for pv in SNAPSHOT_DOSE)
    lost_W = current_mA * 1e-3 / (lifetime_h * 3600.0) * energy_MeV * 1e6
    k = dose / lost_W
    stated = tomllib.loads((ROOT / "startup" / "mls.toml").read_text())["beam"]["dose_per_lost_watt"]
    if not math.isclose(stated, k, rel_tol=1e-4):
        raise ValueError(f"startup/mls.toml: [beam] dose_per_lost_watt = {stated}, the snapshot gives {k:.5g}")
    point = (f"SEKRRP:rdDose {dose:.5g} at CUM1ZK3RP:measCur {current_mA:.5g} mA, CUM1ZK3RP:rdLt100 "
             f"{lifetime_h:.5g} h, ERMPCGP:rdRmp {energy_MeV:g} MeV: {lost_W:.5g} W lost")
    return k, point


def feedback_rows() -> list[dict]:
    """The optics table and the slow orbit correction's run mode and status (``ioc/orbit_feedback.py``)."""
    return [
        pv_row("MLSOPCCP:actOptRmpTblSet", "mbbo", signal="optics_table", initial="user",
               description="injection/user/ssmb/low_emittance/low_alpha",
               source="DBF_ENUM in the inventory; the real state strings are not public; index 2 = SSMB as the live "
                      "snapshot reads 2 in its SSMB mode; betagui guesses the maximum dispersion from the index (1: "
                      "1.5 m, 3: 1 m, else 2 m), which matches the twin's optics (η max: user 1.39 m, injection "
                      "1.30, low emittance 0.87, SSMB 1.86, low α 1.87 m), hence 1 = user, 3 = low emittance; 0 = "
                      "injection and 4 = low α are assumed; tied both ways to $(P)OPTICS:MODE"),
        pv_row("ORBITCCP:selRunMode", "longout", signal="feedback_run_mode", low=0, high=10, initial=0,
               description="run mode of the slow orbit correction: 0 off, non-zero running",
               source="DBF_LONG, written by betagui (0 during a measurement, restored from RMC00VP afterwards) and 0 "
                      "in the live snapshot; the meaning of the non-zero modes is not public: every non-zero mode "
                      "runs the twin's feedback"),
        pv_row("RMC00VP", "ai", signal="feedback_status", prec=0,
               description="status of the slow orbit correction: the run mode in effect, 0 when it is not correcting",
               source="DBF_DOUBLE; betagui reads it to restore selRunMode, so it reads the run mode while the "
                      "correction runs; 0.0 in the live snapshot with run mode 0"),
    ]


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
    write_csv(out / "pvs.csv", pv_rows(converters, bpms, ref))
    print(f"{len(ring)} elements, {ring.circumference:.6f} m, {len(converters)} converters, "
          f"{len(magnets)} windings -> {out}")


if __name__ == "__main__":
    main()
