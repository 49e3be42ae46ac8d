"""The MLS model against its reference data and against linear optics."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import at
import numpy as np
import pytest
from conftest import DB, ROOT
from physics import dispersion_orbit, orbit_response, relative_error, tune_shift
from twinioc.model import Change, SettingError
from twinioc.model.lattice_io import load_lattice
from twinioc.model.tables import MachineTables

MODES = ["user", "injection", "low_alpha", "low_emittance", "ssmb"]

# -- counts, names, positions -------------------------------------------------------------------


def test_lattice_and_device_counts(mls):
    ring, devices = mls.ring, mls.devices
    assert ring.circumference == pytest.approx(48.0, abs=1e-9)
    assert ring.energy == 629e6 and ring.harmonic_number == 80
    count = {cls: sum(isinstance(e, cls) for e in ring)
             for cls in (at.Dipole, at.Quadrupole, at.Sextupole, at.Octupole, at.Monitor, at.RFCavity)}
    assert count == {at.Dipole: 8, at.Quadrupole: 24, at.Sextupole: 24, at.Octupole: 4, at.Monitor: 28,
                     at.RFCavity: 1}
    assert sum(e.BendingAngle for e in ring if isinstance(e, at.Dipole)) == pytest.approx(2 * math.pi)
    assert len(devices.bpms) == 28 and devices.bpms[0].name == "BPMZ1K1RP"
    assert len(devices.of_kind("hsteerer")) == 12 and len(devices.of_kind("vsteerer")) == 16
    assert len(devices.of_kind("quadrupole")) == 24
    assert all(len(c.windings) == 1 for c in devices.of_kind("quadrupole"))
    assert sorted(len(c.windings) for c in devices.of_kind("sextupole")) == [2, 2, 4, 4, 4, 4, 4]
    assert [len(c.windings) for c in devices.of_kind("octupole")] == [2, 2]
    assert [c.name for c in devices.of_kind("dipole")] == ["BPRP"]
    assert devices.rf.name == "MCLKHGP" and [c.name for c in devices.of_kind("cavity")] == ["PAHRP"]
    for c in devices.converters.values():
        for w in c.windings:
            element = ring[w.element]
            wanted = {"quadrupole": at.Quadrupole, "sextupole": at.Sextupole, "octupole": at.Octupole,
                      "hsteerer": at.Sextupole, "vsteerer": at.Sextupole, "dipole": at.Dipole,
                      "cavity": at.RFCavity}[c.kind]
            assert isinstance(element, wanted), (c.name, w.magnet)


def test_names_and_positions_match_reference(mls, reference):
    supplies = json.loads((reference / "pvs" / "mls_storage_ring_power_supplies.json").read_text())
    on = {w.magnet: c.name for c in mls.devices.converters.values() for w in c.windings}
    for family in ("quadrupole", "sextupole", "octupole"):
        for pc, magnets in supplies[family].items():
            assert all(on[m] == pc for m in magnets), pc
    with (reference / "pvs" / "mls_mml_channel_names_DERIVED_from_mlsinit.csv").open() as f:
        channels = list(csv.DictReader(f))
    steerers = {r["setpoint_pv"].split(":")[0] for r in channels if r["family"] in ("HCM", "VCM")}
    assert steerers == {c.name for c in mls.devices.of_kind("hsteerer") + mls.devices.of_kind("vsteerer")}
    bpm_s = {r["element"]: float(r["note"].split("=")[1]) for r in channels if r["family"] == "BPMx/BPMy"}
    assert [b.name for b in mls.devices.bpms] == list(bpm_s)
    positions = [mls.ring.get_s_pos(b.element)[0] for b in mls.devices.bpms]
    np.testing.assert_allclose(positions, list(bpm_s.values()), atol=1e-4)
    with (reference / "lattices" / "mls_lattice_low_emittance_elements.csv").open() as f:
        table = {r["family_name"]: r for r in csv.DictReader(f)}
    for i, e in enumerate(mls.ring):
        if isinstance(e, (at.Quadrupole, at.Sextupole, at.Octupole, at.Dipole)):
            assert mls.ring.get_s_pos(i)[0] == pytest.approx(float(table[e.FamName]["s_start_m"]), abs=1e-6)
    octupoles = [mls.ring.get_s_pos(i)[0] for i, e in enumerate(mls.ring) if isinstance(e, at.Octupole)]
    np.testing.assert_allclose(octupoles, [5.075, 18.825, 29.075, 42.825], atol=1e-9)


def test_steerer_factor_is_an_integrated_field(mls):
    """0.00268011 T·m/A at 629 MeV is ≈1.28 mrad/A (../shared/DESIGN.md)."""
    winding = mls.devices.converters["HS1P1K1RP"].windings[0]
    assert winding.strength(1.0, mls.rigidity) == pytest.approx(1.278e-3, rel=1e-3)


def test_derived_tables_are_reproducible(reference, tmp_path):
    """The committed tables are exactly what tools/derive_mls.py makes of the references."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "derive_mls.py"), "--reference", str(reference),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("lattice.json", "converters.csv", "magnets.csv", "bpms.csv", "optics.csv", "pvs.csv"):
        assert (tmp_path / name).read_text() == (DB / "mls" / name).read_text(), name


def test_lattice_keeps_the_reference_strengths(reference):
    """Quadrupoles and dipoles as in lat2db's JSON; only monitors moved and octupoles added."""
    (source,) = json.loads((reference / "lattices" / "mls_lattice_json.json").read_text())
    ours = {e.FamName: e for e in load_lattice(DB / "mls" / "lattice.json")}
    for e in source["sequences"]:
        if e["type"] == "Quadrupole":
            k1 = e["element_configuration"]["magnetic_element"]["coeffs"]["normal_coefficients"][1]
            assert ours[e["name"]].PolynomB[1] == k1
        elif e["type"] == "Dipole":
            assert ours[e["name"]].BendingAngle == e["bending_angle"]
            assert ours[e["name"]].Length == e["length"]


# -- the design point ---------------------------------------------------------------------------


def test_design_point(mls):
    state = mls.compute()
    assert state.stable
    np.testing.assert_allclose(state.tune, [3.176, 2.232], atol=0.01)
    np.testing.assert_allclose(state.chromaticity, [-3.50, -3.89], atol=0.05)  # no sextupoles: natural
    assert state.momentum_compaction == pytest.approx(0.0281, rel=0.01)
    assert state.momentum_compaction == pytest.approx(mls.ring.get_mcf(), rel=1e-6)
    assert state.energy == 629e6
    assert state.revolution_frequency == pytest.approx(299792458 / 48.0, rel=1e-9)
    assert np.max(np.abs(state.x)) < 1e-9 and np.max(np.abs(state.y)) < 1e-9


def test_synchrotron_tune_against_6d_tracking(mls):
    """The analytic Qs against pyAT's 6D one-turn map, at the design voltage and at 300 kV."""
    for kv in (500.0, 300.0):
        mls.apply([Change("PAHRP", "voltage", kv)])
        state = mls.compute()
        assert mls.rf_voltage == kv * 1e3
        qs_6d = mls.ring.enable_6d(copy=True).get_tune()[2]
        assert state.synchrotron_tune == pytest.approx(qs_6d, rel=0.005), kv


def test_rf_voltage_below_the_energy_loss_loses_the_beam(mls):
    assert mls.energy_loss == pytest.approx(9.06e3, rel=0.01)  # U0 = Cγ E⁴ I2 / 2π of the 8 bends
    mls.apply([Change("PAHRP", "voltage", 5.0)])
    lost = mls.compute()
    assert not lost.stable and "energy loss" in lost.reason
    mls.apply([Change("PAHRP", "voltage", 500.0)])
    assert mls.compute().stable


# -- physics against independent formulas ------------------------------------------------------


@pytest.mark.parametrize("steerer, plane", [("HS1P1K1RP", 0), ("HS3P2L2RP", 0), ("VS2P1L4RP", 1),
                                            ("VS3P2K3RP", 1)])
def test_orbit_response_of_one_steerer(mls, steerer, plane):
    design = mls.ring.deepcopy()
    current = 0.05  # A
    winding = mls.devices.converters[steerer].windings[0]
    theta = winding.strength(current, mls.rigidity)
    before = mls.compute(chromaticity=False)
    mls.apply([Change(steerer, "current", current)])
    after = mls.compute(chromaticity=False)
    measured = (after.x - before.x) if plane == 0 else (after.y - before.y)
    expected = orbit_response(design, mls._bpm_refs, winding.element, plane, theta)
    assert np.max(np.abs(expected)) > 1e-5
    assert relative_error(measured, expected) < 0.03


def test_tune_shift_of_a_quadrupole_converter(mls):
    design = mls.ring.deepcopy()
    pc = mls.devices.converters["Q3P1L2RP"]
    di = 0.2  # A
    before = mls.compute(chromaticity=False)
    mls.apply([Change(pc.name, "current", mls.settings[pc.name] + di)])
    after = mls.compute(chromaticity=False)
    expected = tune_shift(design, [w.element for w in pc.windings], [w.calibration * di for w in pc.windings])
    assert np.all(np.abs(expected) > 1e-3)
    np.testing.assert_allclose(after.tune - before.tune, expected, rtol=0.03)


def test_rf_step_moves_the_orbit_through_dispersion(mls):
    design = mls.ring.deepcopy()
    rf = mls.devices.rf
    df_khz = 2.0
    mls.apply([Change(rf.name, "frequency", rf.default + df_khz)])
    state = mls.compute(chromaticity=False)
    df_over_f = df_khz / rf.default
    expected = dispersion_orbit(design, mls._bpm_refs, df_over_f)
    assert np.max(np.abs(expected)) > 1e-4
    assert relative_error(state.x, expected) < 0.03
    assert state.momentum_offset == pytest.approx(-df_over_f / design.get_mcf(), rel=0.03)


def test_dipole_current_sets_the_beam_energy(mls):
    """At a fixed RF frequency the beam follows the dipole field: δ = ΔB/B, and the orbit hardly moves."""
    epsilon = -2e-3  # BPRP's range ends at 630 A, just above the 629 A of 629 MeV
    mls.apply([Change("BPRP", "current", 629.0 * (1 + epsilon))])
    state = mls.compute()
    assert state.energy == pytest.approx(629e6 * (1 + epsilon))
    assert state.momentum_offset == pytest.approx(epsilon, rel=0.03)
    eta = mls.ring.get_optics(refpts=mls._bpm_sorted)[2].dispersion[:, 0]
    assert np.max(np.abs(state.x)) < 0.05 * np.max(np.abs(eta)) * abs(epsilon)


# -- optics modes -------------------------------------------------------------------------------


def test_optics_modes_are_the_mlsreflat_tables(mls, reference):
    modes = MachineTables(DB / "mls").optics
    assert list(modes) == MODES
    assert modes["user"] == {name: c.default for name, c in mls.devices.converters.items()
                             if c.kind in ("quadrupole", "sextupole", "octupole")}
    index = {e.FamName: i for i, e in enumerate(mls.ring)}
    for mode in MODES[1:]:
        mls.apply([Change(device, "current", value) for device, value in modes[mode].items()])
        with (reference / "lattices" / f"mls_storage_ring_{mode}.csv").open() as f:
            for row in csv.DictReader(f):
                if not row["element"]:
                    continue
                order = {"K": 1, "H": 2, "PolynomA": 3}[row["attribute"]]  # octupoles: normal, see derive
                strength = mls.ring[index[row["element"]]].PolynomB[order]
                assert strength == pytest.approx(float(row["value"]), rel=1e-12, abs=1e-12), (mode, row)
        state = mls.compute()
        assert state.stable, mode
        assert state.momentum_compaction == pytest.approx(mls.ring.get_mcf(), rel=1e-3), mode


def test_low_alpha_modes_lower_the_momentum_compaction(mls):
    modes = MachineTables(DB / "mls").optics
    compaction = {}
    for mode in MODES:
        mls.apply([Change(device, "current", value) for device, value in modes[mode].items()])
        compaction[mode] = mls.compute().momentum_compaction
    assert compaction["user"] == pytest.approx(0.0281, rel=0.01)
    assert abs(compaction["low_alpha"]) < 0.01 * compaction["user"]
    assert abs(compaction["ssmb"]) < 0.01 * compaction["user"]


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (Change("PAHRP", "voltage", math.nan), "not a finite"),
    (Change("PAHRP", "voltage", 1e4), "outside"),
    (Change("PAHRP", "current", 100.0), "no property"),
    (Change("HS1P1K1RP", "current", 3.6), "outside"),
    (Change("Q1P1K1RP", "current", -1.0), "outside"),
    (Change("OP1RP", "current", 7.0), "outside"),
    (Change("BPRP", "current", math.inf), "not a finite"),
    (Change("MCLKHGP", "frequency", 499_000.0), "outside"),
])
def test_bad_changes_are_refused_and_change_nothing(mls, change, message):
    settings = dict(mls.settings)
    with pytest.raises(SettingError, match=message):
        mls.apply([Change("VS2P1K1RP", "current", 0.1), change])
    assert mls.settings == settings and mls.version == 0
