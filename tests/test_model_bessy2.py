"""The BESSY II model against its reference data and against linear optics."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys

import at
import numpy as np
import pytest
from conftest import DB, ROOT
from physics import dispersion_orbit, orbit_response, relative_error, tune_shift
from twinioc.model import Change, SettingError
from twinioc.model.lattice_io import load_lattice

# -- counts and names -------------------------------------------------------------------------


def test_device_counts(bessy2):
    devices = bessy2.devices
    assert len(devices.bpms) == 123
    assert devices.bpms[0].name == "BPMZ5D1R"
    assert len(devices.of_kind("hsteerer")) == 48
    assert len(devices.of_kind("vsteerer")) == 64
    quads = [w for c in devices.of_kind("quadrupole") for w in c.windings]
    assert len(quads) == 145
    assert len({w.element for w in quads}) == 145
    assert all(isinstance(bessy2.ring[w.element], at.Quadrupole) for w in quads)
    sextupoles = [w for c in devices.of_kind("sextupole") for w in c.windings]
    assert len(sextupoles) == 112
    assert all(isinstance(bessy2.ring[w.element], at.Sextupole) for w in sextupoles)
    assert devices.rf.name == "MCLKHX251C"


def test_converters_match_reference(bessy2, reference):
    loco = json.loads((reference / "pvs" / "bessy2_quad_loco_current_hw2phys.json").read_text())
    ref_quad_pcs = {pc for pc in loco["setpoint"].values() if pc}
    inc = (reference / "pvs" / "power_converter.inc").read_text()
    ref_inc = set(re.findall(r"\{\s*([A-Z0-9]+)\s*,", inc))
    with (reference / "pvs" / "bessy2_pv_summary_DERIVED.csv").open() as f:
        summary = list(csv.DictReader(f))
    ref_steerers = {r["power_converter"] for r in summary if r["kind"] in ("HCM", "VCM")}

    quads = {c.name for c in bessy2.devices.of_kind("quadrupole")}
    steerers = {c.name for c in bessy2.devices.of_kind("hsteerer") + bessy2.devices.of_kind("vsteerer")}
    assert len(ref_quad_pcs) == 53
    assert ref_quad_pcs <= quads and quads - ref_quad_pcs == {"PQIT6R"}
    assert steerers == ref_steerers
    assert ref_quad_pcs | ref_steerers <= ref_inc | {"PQIT6R"}
    # every magnet sits on the converter the LOCO table names
    on = {w.magnet: c.name for c in bessy2.devices.converters.values() for w in c.windings}
    assert all(on[m] == pc for m, pc in loco["setpoint"].items() if pc)
    assert [b.name for b in bessy2.devices.bpms] == [r["element"] for r in summary if r["kind"] == "BPM"]


def test_calibrations_match_reference(bessy2, reference):
    """Quadrupole factors stay within 3.5 % of LOCO's hw2phys; steerers carry pyAML's factors."""
    loco = json.loads((reference / "pvs" / "bessy2_quad_loco_current_hw2phys.json").read_text())
    windings = {w.magnet: w for c in bessy2.devices.converters.values() for w in c.windings}
    for magnet, hw2phys in loco["hw2phys"].items():
        if hw2phys:
            assert windings[magnet].calibration == pytest.approx(hw2phys, rel=0.035), magnet
    hs4 = bessy2.devices.converters["HS4P2D1R"].windings[0]
    assert hs4.calibration == -0.0044502
    # -0.776 mrad/A at 1.7185 GeV, as ../shared/DESIGN.md quotes it
    assert hs4.strength(1.0, bessy2.rigidity) == pytest.approx(-0.776e-3, rel=1e-3)


def test_lattice_format_round_trips(reference):
    original = at.load_lattice(reference / "lattices" / "bessy2_standard_user.mat")
    ours = load_lattice(DB / "bessy2" / "lattice.json")
    assert len(ours) == len(original) == 1093
    assert ours.circumference == pytest.approx(240.00839, abs=1e-5)
    assert ours.energy == original.energy and ours.harmonic_number == 400
    for a, b in zip(ours, original, strict=True):
        assert type(a) is type(b) and a.FamName == b.FamName
        assert a.Length == b.Length
        for attr in ("PolynomB", "PolynomA", "BendingAngle", "KickAngle"):
            if hasattr(b, attr):
                np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))


def test_derived_tables_are_reproducible(reference, tmp_path):
    """The committed tables are exactly what tools/derive_bessy2.py makes of the references."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "derive_bessy2.py"), "--reference", str(reference),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("lattice.json", "converters.csv", "magnets.csv", "bpms.csv", "pvs.csv"):
        assert (tmp_path / name).read_text() == (DB / "bessy2" / name).read_text(), name


# -- the design point ---------------------------------------------------------------------------


def test_design_point(bessy2):
    state = bessy2.compute()
    assert state.stable and state.version == 0
    np.testing.assert_allclose(state.tune, [17.848, 6.727], atol=0.01)
    np.testing.assert_allclose(state.chromaticity, [1.75, 3.02], atol=0.3)
    assert bessy2.ring.get_mcf() == pytest.approx(7.08e-4, rel=0.02)
    assert np.max(np.abs(state.x)) < 1e-9 and np.max(np.abs(state.y)) < 1e-9
    assert state.revolution_frequency == pytest.approx(299792458 / 240.00839, rel=1e-6)


# -- physics against independent formulas ------------------------------------------------------


@pytest.mark.parametrize(
    "steerer, plane", [("HS4P2D1R", 0), ("HS1PT3R", 0), ("VS3P2D1R", 1), ("VS2P1T5R", 1)])
def test_orbit_response_of_one_steerer(bessy2, steerer, plane):
    design = bessy2.ring.deepcopy()
    current = 0.05  # A
    winding = bessy2.devices.converters[steerer].windings[0]
    theta = winding.strength(current, bessy2.rigidity)
    before = bessy2.compute(chromaticity=False)
    bessy2.apply([Change(steerer, "current", current)])
    after = bessy2.compute(chromaticity=False)
    measured = (after.x - before.x) if plane == 0 else (after.y - before.y)
    expected = orbit_response(design, bessy2._bpm_refs, winding.element, plane, theta)
    assert np.max(np.abs(expected)) > 1e-5  # tens of µm: a real signal
    assert relative_error(measured, expected) < 0.03
    other = after.y if plane == 0 else after.x
    # no linear coupling in the design lattice; sextupoles feed a vertical orbit down into x (∝ y²)
    assert np.max(np.abs(other)) < 0.01 * np.max(np.abs(measured))


def test_tune_shift_of_a_quadrupole_converter(bessy2):
    design = bessy2.ring.deepcopy()
    pc = bessy2.devices.converters["Q4PD3R"]
    di = 1.0  # A
    elements = [w.element for w in pc.windings]
    dk = [w.calibration * di for w in pc.windings]
    before = bessy2.compute(chromaticity=False)
    bessy2.apply([Change(pc.name, "current", bessy2.settings[pc.name] + di)])
    after = bessy2.compute(chromaticity=False)
    expected = tune_shift(design, elements, dk)
    assert np.all(np.abs(expected) > 1e-3)
    np.testing.assert_allclose(after.tune - before.tune, expected, rtol=0.03)


def test_rf_step_moves_the_orbit_through_dispersion(bessy2):
    design = bessy2.ring.deepcopy()
    rf = bessy2.devices.rf
    df_khz = 0.3
    bessy2.apply([Change(rf.name, "frequency", rf.default + df_khz)])
    state = bessy2.compute(chromaticity=False)
    df_over_f = df_khz / rf.default
    expected = dispersion_orbit(design, bessy2._bpm_refs, df_over_f)
    assert np.max(np.abs(expected)) > 1e-4
    assert relative_error(state.x, expected) < 0.03
    assert state.momentum_offset == pytest.approx(-df_over_f / design.get_mcf(), rel=0.03)
    assert state.revolution_frequency == pytest.approx((rf.default + df_khz) * 1e3 / 400)


def test_chromaticity_shows_in_the_tunes_of_an_rf_step(bessy2):
    """Q(δ) − Q(0) = ξ δ to first order."""
    rf = bessy2.devices.rf
    before = bessy2.compute()
    bessy2.apply([Change(rf.name, "frequency", rf.default + 0.1)])
    after = bessy2.compute(chromaticity=False)
    expected = before.chromaticity * after.momentum_offset
    np.testing.assert_allclose(after.tune - before.tune, expected, rtol=0.05)


# -- bad input ----------------------------------------------------------------------------------


def _strengths(engine):
    return [(e.PolynomB.copy(), getattr(e, "KickAngle", np.zeros(2)).copy())
            for e in engine.ring if hasattr(e, "PolynomB")]


@pytest.mark.parametrize("change, message", [
    (Change("NOSUCHPC", "current", 1.0), "unknown device"),
    (Change("HS4P2D1R", "current", math.nan), "not a finite"),
    (Change("HS4P2D1R", "current", math.inf), "not a finite"),
    (Change("HS4P2D1R", "current", -math.inf), "not a finite"),
    (Change("HS4P2D1R", "current", 1.5), "outside"),
    (Change("Q1PDR", "current", -1.0), "outside"),
    (Change("Q1PDR", "current", "200"), "not a number"),
    (Change("Q1PDR", "current", None), "not a number"),
    (Change("Q1PDR", "frequency", 200.0), "no property"),
    (Change("MCLKHX251C", "frequency", 400_000.0), "outside"),
])
def test_bad_changes_are_refused_and_change_nothing(bessy2, change, message):
    bessy2.apply([Change("HS4P2D1R", "current", 0.2)])
    version, settings, strengths = bessy2.version, dict(bessy2.settings), _strengths(bessy2)
    with pytest.raises(SettingError, match=message):
        # the good change in the same batch must not be applied either
        bessy2.apply([Change("VS3P2D1R", "current", 0.1), change])
    assert bessy2.version == version
    assert bessy2.settings == settings
    for (b0, k0), (b1, k1) in zip(strengths, _strengths(bessy2), strict=True):
        np.testing.assert_array_equal(b0, b1)
        np.testing.assert_array_equal(k0, k1)


def test_every_batch_makes_a_new_version(bessy2):
    assert bessy2.apply([]) == 0
    assert bessy2.apply([Change("HS4P2D1R", "current", 0.1), Change("Q1PDR", "current", 216.5)]) == 1
    assert bessy2.apply([Change("HS4P2D1R", "current", 0.0)]) == 2
    assert bessy2.compute().version == 2


def test_unstable_setting_loses_the_beam_and_recovers(bessy2):
    nominal = bessy2.settings["Q1PDR"]
    bessy2.apply([Change("Q1PDR", "current", 300.0)])  # K1 +40 %: no stable optics
    lost = bessy2.compute()
    assert not lost.stable
    assert lost.reason
    assert np.all(np.isnan(lost.x)) and np.all(np.isnan(lost.tune))
    bessy2.apply([Change("Q1PDR", "current", nominal)])
    back = bessy2.compute()
    assert back.stable
    np.testing.assert_allclose(back.tune, [17.848, 6.727], atol=0.01)


def test_integer_resonance_loses_the_beam(bessy2):
    """Walking the Q4PT converters down drives Qx towards 17: the beam is lost on the way."""
    names = [c.name for c in bessy2.devices.of_kind("quadrupole") if c.name.startswith("Q4PT")]
    states = []
    for scale in np.linspace(1.0, 0.8, 9):
        bessy2.apply([Change(n, "current", bessy2.devices.converters[n].default * scale) for n in names])
        states.append(bessy2.compute(chromaticity=False))
    assert states[0].stable
    assert not all(s.stable for s in states)
    bessy2.apply([Change(n, "current", bessy2.devices.converters[n].default) for n in names])
    assert bessy2.compute().stable
