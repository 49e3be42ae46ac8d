"""The MLS IOC over real CA (pyepics) and PVA (p4p), beside a BESSY II twin on the same host."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import epics
import numpy as np
import pytest
from ca import TwinClient, caget
from conftest import DB, MLS_PREFIX
from physics import dispersion_orbit, relative_error
from twinioc.model import Change, Engine
from twinioc.model.tables import MachineTables, read_csv

PVS = [row["pv"].replace("$(P)", MLS_PREFIX) for row in read_csv(DB / "mls" / "pvs.csv")]
BPMS = [b["name"] for b in read_csv(DB / "mls" / "bpms.csv")]
F_REV = 299792458 / 48.0
mls = TwinClient(MLS_PREFIX)
bessy = TwinClient("TWIN:")


def orbit_x():
    """The horizontal orbit in mm, BPM by BPM, as a control-room script reads it."""
    return np.array(epics.caget_many([f"{b}:rdX" for b in BPMS], timeout=5))


def orbit_y():
    return np.array(epics.caget_many([f"{b}:rdY" for b in BPMS], timeout=5))


@pytest.fixture
def model():
    return Engine.from_folder(DB / "mls")


def test_every_pv_connects_over_ca(mls_ioc):
    values = epics.caget_many(PVS, connection_timeout=10, timeout=10)
    assert not [pv for pv, v in zip(PVS, values, strict=True) if v is None]


def test_every_pv_connects_over_pva(mls_ioc, pva):
    values = pva.get(PVS, throw=False, timeout=10)
    assert not [pv for pv, v in zip(PVS, values, strict=True) if isinstance(v, Exception)]


def test_pv_counts_match_the_machine():
    setpoints = [pv for pv in PVS if pv.endswith(":setCur")]
    assert len([pv for pv in setpoints if pv.startswith("Q")]) == 24
    assert len([pv for pv in setpoints if pv.startswith("S")]) == 7
    assert len([pv for pv in setpoints if pv.startswith("OP")]) == 2
    assert len([pv for pv in setpoints if pv.startswith(("HS", "VS"))]) == 28
    assert "BPRP:setCur" in setpoints and len(setpoints) == 24 + 7 + 2 + 28 + 1
    assert len([pv for pv in PVS if pv.endswith(":rdCur") and pv != "CUM1ZK3RP:rdCur"]) == len(setpoints)
    assert sum(pv.startswith("BPMZ") and pv.endswith(":rdX") for pv in PVS) == 28
    for pv in ("TUNEZRP:measX", "TUNEZRP:measY", "TUNEZRP:measZ", "MCLKHGP:setFrq", "MCLKHGP:rdFrq",
               "PAHRP:setVoltCav", "CUM1ZK3RP:measCur", "CUM1ZK3RP:rdCur", "CUM1ZK3RP:rdLt10",
               "CUM1ZK3RP:rdLt100", "ERMPCGP:rdRmp"):
        assert pv in PVS


def test_native_types_and_counts_match_the_control_room_inventory(mls_ioc, reference):
    """Every PV the real MLS answered in the cainfo inventory, and the twin serves, looks the same."""
    inventory = json.loads((reference / "pvs" / "inventory.json").read_text())
    real = {}
    for probe in inventory["legacy_pv_probe_results"]:
        out = probe["result"].get("stdout", "")
        kind, count = re.search(r"Native data type: DBF_(\w+)", out), re.search(r"Element count:\s+(\d+)", out)
        if kind and count:
            real[probe["pv"]] = (kind.group(1), int(count.group(1)))
    served = [pv for pv in real if pv in PVS]
    assert len(served) >= 17  # tunes, RF, 7 sextupoles, current, lifetimes, energy, cavity voltage, Qs
    for pv in served:
        channel = epics.get_pv(pv, connect=True, timeout=5)
        native = epics.dbr.Name(epics.ca.field_type(channel.chid))
        assert (native, epics.ca.element_count(channel.chid)) == real[pv], pv


def test_the_two_machines_share_no_real_name(bessy2_ioc, mls_ioc):
    bessy_names = {row["pv"] for row in read_csv(DB / "bessy2" / "pvs.csv")}
    mls_names = {row["pv"] for row in read_csv(DB / "mls" / "pvs.csv")}
    assert all(pv.startswith("$(P)") for pv in bessy_names & mls_names)


def test_steerer_put_moves_the_orbit_as_the_model_predicts(mls_ioc, model):
    before_x, before_y = orbit_x(), orbit_y()
    mls.put("VS3P1L2RP:setCur", 0.5)
    try:
        assert caget("VS3P1L2RP:rdCur") == pytest.approx(0.5)
        measured = (orbit_y() - before_y) * 1e-3
        reference = model.compute(chromaticity=False)
        model.apply([Change("VS3P1L2RP", "current", 0.5)])
        after = model.compute(chromaticity=False)
        expected = after.y - reference.y
        assert np.max(np.abs(expected)) > 1e-4
        assert np.corrcoef(measured, expected)[0, 1] > 0.99
        assert np.linalg.norm(measured) == pytest.approx(np.linalg.norm(expected), rel=0.02)
        # no linear coupling, but the vertical orbit lengthens the path: at fixed RF, δ and x = ηδ follow
        np.testing.assert_allclose((orbit_x() - before_x) * 1e-3, after.x - reference.x, atol=1e-8)
        np.testing.assert_allclose(caget(mls("ORBIT:Y")), orbit_y(), atol=1e-6)
    finally:
        mls.put("VS3P1L2RP:setCur", 0.0)


def test_quadrupole_put_moves_the_tunes_as_the_model_predicts(mls_ioc, model):
    nominal = caget("Q3P2K3RP:setCur")
    h0, v0 = caget("TUNEZRP:measX"), caget("TUNEZRP:measY")
    mls.put("Q3P2K3RP:setCur", nominal + 0.5)
    try:
        h1, v1 = caget("TUNEZRP:measX"), caget("TUNEZRP:measY")
        q0 = model.compute(chromaticity=False).tune
        model.apply([Change("Q3P2K3RP", "current", nominal + 0.5)])
        dq = model.compute(chromaticity=False).tune - q0
        assert np.all(np.abs(dq) > 1e-3)
        np.testing.assert_allclose([(h1 - h0) * 1e3 / F_REV, (v1 - v0) * 1e3 / F_REV], dq, rtol=0.01)
    finally:
        mls.put("Q3P2K3RP:setCur", nominal)


def test_rf_put_moves_the_orbit_through_dispersion(mls_ioc, model):
    f0 = caget("MCLKHGP:setFrq")
    before = orbit_x()
    mls.put("MCLKHGP:setFrq", f0 + 2.0)
    try:
        assert caget("MCLKHGP:rdFrq") == pytest.approx(f0 + 2.0)
        measured = (orbit_x() - before) * 1e-3
        expected = dispersion_orbit(model.ring, model._bpm_refs, 2.0 / f0)
        assert relative_error(measured, expected) < 0.03
    finally:
        mls.put("MCLKHGP:setFrq", f0)


def test_synchrotron_tune_follows_the_cavity_voltage(mls_ioc, model):
    """Qs ∝ (V² − U0²)^¼: from 500 kV to 250 kV it falls by ≈16 %."""
    qs0 = caget("TUNEZRP:measZ")
    assert qs0 == pytest.approx(model.compute().synchrotron_tune * F_REV / 1e3, rel=1e-4)
    mls.put("PAHRP:setVoltCav", 250.0)
    try:
        qs1 = caget("TUNEZRP:measZ")
        u0 = model.energy_loss
        expected = ((250e3**2 - u0**2) / (500e3**2 - u0**2)) ** 0.25
        assert qs1 / qs0 == pytest.approx(expected, rel=1e-3)
        assert caget("cumz4x003gp:tuneSyn") == pytest.approx(qs1 * 1e3, rel=1e-4)
    finally:
        mls.put("PAHRP:setVoltCav", 500.0)


def test_beam_readings(mls_ioc):
    assert caget("CUM1ZK3RP:measCur") == pytest.approx(150.0)
    assert caget("CUM1ZK3RP:rdCur") == pytest.approx(150.0)
    assert caget("CUM1ZK3RP:rdLt10") == math.inf  # the session's twins are ideal: no decay
    assert caget("ERMPCGP:rdRmp") == pytest.approx(629.0)
    assert epics.PV("TUNEZRP:measZ").get_ctrlvars(timeout=5)["units"] == "kHz"


def test_cavity_voltage_below_the_energy_loss_loses_the_beam(mls_ioc):
    mls.put("PAHRP:setVoltCav", 5.0)
    try:
        assert caget(mls("BEAM:LOST")) == 1
        assert "energy loss" in caget(mls("BEAM:LOST:REASON"), as_string=True)
        assert caget("CUM1ZK3RP:measCur") == 0.0
        assert epics.caget("TUNEZRP:measZ.SEVR") == 3
    finally:
        mls.put("PAHRP:setVoltCav", 500.0)
    assert caget(mls("BEAM:LOST")) == 0
    assert caget("CUM1ZK3RP:measCur") == pytest.approx(150.0)


def test_optics_mode_switch_loads_a_mode_table(mls_ioc, model):
    modes = MachineTables(DB / "mls").optics
    assert epics.PV(mls("OPTICS:MODE")).get(as_string=True, timeout=5) == "user"
    mls.put(mls("OPTICS:MODE"), "low_alpha")
    try:
        for device, value in modes["low_alpha"].items():
            assert caget(f"{device}:setCur") == pytest.approx(value, abs=1e-9)
            assert caget(f"{device}:rdCur") == pytest.approx(value, abs=1e-9)
        model.apply([Change(d, "current", v) for d, v in modes["low_alpha"].items()])
        expected = model.compute()
        assert caget("TUNEZRP:measX") == pytest.approx(expected.fractional_tune[0] * F_REV / 1e3, rel=1e-4)
        assert caget(mls("MOMENTUM:COMPACTION")) == pytest.approx(expected.momentum_compaction, rel=1e-3)
        assert abs(expected.momentum_compaction) < 1e-3
    finally:
        mls.put(mls("OPTICS:MODE"), "user")
    assert caget("Q1P1K1RP:setCur") == pytest.approx(modes["user"]["Q1P1K1RP"])


def test_the_twins_do_not_interfere(bessy2_ioc, mls_ioc, pva):
    """A put on one twin changes nothing on the other; each serves on its own ports."""
    assert bessy2_ioc.ca_port != mls_ioc.ca_port and bessy2_ioc.pva_port != mls_ioc.pva_port
    bessy.settle()
    bessy_version, bessy_orbit = caget(bessy("LATTICE:VERSION")), caget("ORBITCC:rdPos")
    mls.put("HS3P1K3RP:setCur", 0.3)
    try:
        bessy.settle()
        assert caget(bessy("LATTICE:VERSION")) == bessy_version
        np.testing.assert_array_equal(caget("ORBITCC:rdPos"), bessy_orbit)
        mls.settle()
        mls_version = caget(mls("LATTICE:VERSION"))
        bessy.put("HS4P2D1R:set", 0.1)
        mls.settle()
        assert caget(mls("LATTICE:VERSION")) == mls_version
        assert pva.get("HS3P1K3RP:rdCur", timeout=5) == pytest.approx(0.3)
    finally:
        bessy.put("HS4P2D1R:set", 0.0)
        mls.put("HS3P1K3RP:setCur", 0.0)


def test_start_in_an_optics_mode_and_keep_later_puts_over_a_restart(tmp_path):
    from twinioc.ioc.testing import TwinProcess

    modes = MachineTables(DB / "mls").optics
    read = ("import epics, sys; print(epics.caget('TWIN:OPTICS:MODE', as_string=True, timeout=5), "
            "*(epics.caget(pv, timeout=5) for pv in sys.argv[1:]))")
    pvs = ["S2P1RP:setCur", "S2P1RP:rdCur", "Q1P1K1RP:setCur"]
    with TwinProcess("mls", "--ideal", "--optics", "ssmb", state_dir=tmp_path) as twin:
        out = subprocess.run([sys.executable, "-c", read, *pvs], env=twin.client_env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[-4] == "ssmb"
        assert [float(v) for v in out[-3:]] == pytest.approx(
            [modes["ssmb"]["S2P1RP"], modes["ssmb"]["S2P1RP"], modes["ssmb"]["Q1P1K1RP"]])
        put = "import epics, sys; sys.exit(0 if epics.caput('Q1P1K1RP:setCur', 20.5, wait=True, timeout=5) else 1)"
        subprocess.run([sys.executable, "-c", put], env=twin.client_env, check=True)
        time.sleep(3.0)  # longer than the autosave period
    with TwinProcess("mls", "--ideal", state_dir=tmp_path) as twin:
        out = subprocess.run([sys.executable, "-c", read, *pvs], env=twin.client_env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[-4] == "ssmb"  # the mode shown is restored, and not loaded again over later puts
        assert [float(v) for v in out[-3:]] == pytest.approx(
            [modes["ssmb"]["S2P1RP"], modes["ssmb"]["S2P1RP"], 20.5])


def test_cli_refuses_an_unknown_optics_mode():
    done = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "--machine", "mls", "--optics", "nosuch",
                           "--list-pvs"], capture_output=True, text=True)
    assert done.returncode != 0 and "no optics mode 'nosuch'" in done.stderr and "low_alpha" in done.stderr
