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
from ca import TwinClient, ca_gets, ca_puts, caget
from conftest import DB, MLS_PREFIX
from physics import dispersion_orbit, relative_error
from twinioc.ioc.config import Config
from twinioc.model import Change, Engine
from twinioc.model.tables import MachineTables, read_csv

PVS = [row["pv"].replace("$(P)", MLS_PREFIX) for row in read_csv(DB / "mls" / "pvs.csv")]
BPMS = [b["name"] for b in read_csv(DB / "mls" / "bpms.csv")]
# The 34 names of betagui, the MLS control room's chromaticity tool, as the cainfo inventory probed them
BETAGUI = ["BPMZ1X003GP:rdBufBpm", "TUNEZRP:measX", "TUNEZRP:measY", "TUNEZRP:measZ", "cumz4x003gp:tuneSyn",
           "JLC09VP", "MCLKHGP:setFrq", "S1P1RP:setCur", "S1P2RP:setCur", "S2P1RP:setCur", "S2P2RP:setCur",
           "S2P2KRP:setCur", "S2P2LRP:setCur", "S3P1RP:setCur", "S3P2RP:setCur", "ORBITCCP:selRunMode", "RMC00VP",
           "IGPF:Z:FBCTRL", "IGPF:X:FBCTRL", "IGPF:Y:FBCTRL", "PAHRP:cmdExtPhasMod", "MLSOPCCP:actOptRmpTblSet",
           "CUM1ZK3RP:rdLt10", "CUM1ZK3RP:rdLt100", "OPCHECKCCP:calcCurrLife", "QPD01ZL2RP:rdSigmaX",
           "QPD01ZL2RP:rdSigmaY", "QPD00ZL4RP:rdSigmaX", "QPD00ZL4RP:rdSigmaY", "SEKRRP:rdDose", "CUM1ZK3RP:measCur",
           "ERMPCGP:rdRmp", "WFGENC1CP:rdVolt", "PAHRP:setVoltCav"]
# what the twin serves for the names the real machine did not answer (no type in the inventory)
UNANSWERED = {"JLC09VP": ("DOUBLE", 1), "IGPF:X:FBCTRL": ("ENUM", 1), "IGPF:Y:FBCTRL": ("ENUM", 1),
              "IGPF:Z:FBCTRL": ("ENUM", 1), "PAHRP:cmdExtPhasMod": ("ENUM", 1)}
BUFFER, MM_PER_COUNT = "BPMZ1X003GP:rdBufBpm", 0.3051758e-3  # betagui's decoding of the BPM buffer
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
    setpoints = [pv for pv in PVS if pv.endswith(":setCur") and pv != "S2P2RP:setCur"]  # that one drives nothing
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


def _native(pv: str) -> tuple[str, int, bool]:
    """A name's native DBF type, element count and write access, as cainfo shows them."""
    channel = epics.get_pv(pv, connect=True, timeout=5)
    native = epics.dbr.Name(epics.ca.field_type(channel.chid))
    return native, epics.ca.element_count(channel.chid), bool(epics.ca.write_access(channel.chid))


def test_every_betagui_name_connects_over_ca_and_pva(mls_ioc, pva):
    assert len(set(BETAGUI)) == 34 and not set(BETAGUI) - set(PVS)
    values = epics.caget_many(BETAGUI, connection_timeout=10, timeout=10)
    assert not [pv for pv, v in zip(BETAGUI, values, strict=True) if v is None]
    values = pva.get(BETAGUI, throw=False, timeout=10)
    assert not [pv for pv, v in zip(BETAGUI, values, strict=True) if isinstance(v, Exception)]
    for pv, (kind, count) in UNANSWERED.items():
        assert _native(pv) == (kind, count, True), pv


def test_native_types_counts_and_access_match_the_control_room_inventory(mls_ioc, reference):
    """Every PV of the cainfo inventory is served; those the real MLS answered look the same: native
    type, element count and write access."""
    inventory = json.loads((reference / "pvs" / "inventory.json").read_text())
    probes = inventory["legacy_pv_probe_results"]
    assert {probe["pv"] for probe in probes} == set(BETAGUI)
    real = {}
    for probe in probes:
        out = probe["result"].get("stdout", "")
        kind, count = re.search(r"Native data type: DBF_(\w+)", out), re.search(r"Element count:\s+(\d+)", out)
        access = re.search(r"Access:\s+(.+)", out)
        if kind and count and access:
            real[probe["pv"]] = (kind.group(1), int(count.group(1)), "write" in access.group(1))
    assert len(real) == 34 - len(UNANSWERED)
    for pv, expected in real.items():
        assert _native(pv) == expected, pv


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
        assert caget("SEKRRP:rdDose") == 0.0 and epics.caget("SEKRRP:rdDose.SEVR") == 2  # like the current: MAJOR
        assert epics.caget(f"{BUFFER}.SEVR") == 3  # like the BPM readings: INVALID
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


def test_the_bpm_buffer_holds_each_bpm_reading_in_counts_at_its_slot(mls_ioc, pva):
    """betagui's decoding: x at the 1-based slots 1-7, 9-15, 17-23, 25-31 by s; y 32 on (assumed)."""
    slots = {b["name"]: int(b["buffer_slot"]) for b in read_csv(DB / "mls" / "bpms.csv")}
    assert sorted(slots.values()) == [s - 1 for s in range(1, 32) if s % 8]
    mls.put("HS3P1K3RP:setCur", 0.4)
    mls.put("VS3P1L2RP:setCur", 0.5)
    try:
        x, y = orbit_x(), orbit_y()
        buffer = caget(BUFFER)
        assert buffer.dtype.kind == "i" and len(buffer) == 256
        expected = np.zeros(256, dtype=int)
        for name, bx, by in zip(BPMS, x, y, strict=True):
            expected[slots[name]], expected[slots[name] + 32] = round(bx / MM_PER_COUNT), round(by / MM_PER_COUNT)
        assert np.count_nonzero(expected[:32]) > 20 and np.count_nonzero(expected[32:64]) > 20
        np.testing.assert_array_equal(buffer, expected)
        np.testing.assert_array_equal(pva.get(BUFFER, timeout=5), expected)
    finally:
        mls.put("VS3P1L2RP:setCur", 0.0)
        mls.put("HS3P1K3RP:setCur", 0.0)


def test_the_dose_follows_the_beam_power_lost(tmp_path):
    """SEKRRP:rdDose = k × (I / τ) × E, with the twin's own current, lifetime and energy (5 h here)."""
    from twinioc.ioc.testing import TwinProcess

    k = Config.for_machine("mls").dose_per_lost_watt
    names = ["SEKRRP:rdDose", "CUM1ZK3RP:measCur", "TWIN:LIFETIME", "ERMPCGP:rdRmp"]
    with TwinProcess("mls", "--ideal", "--set", "beam.lifetime_h=5", state_dir=tmp_path) as twin:
        dose, current_mA, lifetime_h, energy_MeV = ca_gets(twin.client_env, names).values()
    assert lifetime_h == 5.0 and current_mA > 100
    assert dose == pytest.approx(k * current_mA * 1e-3 / (lifetime_h * 3600) * energy_MeV * 1e6, rel=1e-4)
    assert caget("SEKRRP:rdDose") == 0.0  # the session's ideal twin loses no beam (no decay)


def test_the_dose_constant_is_the_live_snapshot_point(reference):
    snapshot = json.loads((reference / "pvs" / "ssmb_machine_snapshot.json").read_text())
    values = {c["pv"]: c["value"] for c in snapshot["latest_monitor_sample"]["channels"].values()}
    lost_W = values["CUM1ZK3RP:measCur"] * 1e-3 / (values["CUM1ZK3RP:rdLt100"] * 3600) * values["ERMPCGP:rdRmp"] * 1e6
    assert Config.for_machine("mls").dose_per_lost_watt == pytest.approx(values["SEKRRP:rdDose"] / lost_W, rel=1e-4)


INERT = {"S2P2RP:setCur": 12.5, "IGPF:X:FBCTRL": 0, "IGPF:Y:FBCTRL": 0, "IGPF:Z:FBCTRL": 0,
         "PAHRP:cmdExtPhasMod": 1, "TWIN:WFGENC1CP:VOLT": 0.02}
INERT_DEFAULTS = {"S2P2RP:setCur": 0.0, "IGPF:X:FBCTRL": 1, "IGPF:Y:FBCTRL": 1, "IGPF:Z:FBCTRL": 1,
                  "PAHRP:cmdExtPhasMod": 0, "TWIN:WFGENC1CP:VOLT": 0.011}


def test_inert_settings_refuse_bad_puts_move_no_beam_and_survive_a_restart(tmp_path):
    from twinioc.ioc import journal
    from twinioc.ioc.testing import TwinProcess

    names = [*INERT, "WFGENC1CP:rdVolt", "TWIN:LATTICE:VERSION", "TUNEZRP:measX"]
    with TwinProcess("mls", "--ideal", state_dir=tmp_path) as twin:
        before = ca_gets(twin.client_env, names)
        assert {pv: before[pv] for pv in INERT} == INERT_DEFAULTS and before["WFGENC1CP:rdVolt"] == 0.011
        ca_puts(twin.client_env, [("S2P2RP:setCur", math.nan), ("TWIN:WFGENC1CP:VOLT", math.inf),
                                  ("IGPF:X:FBCTRL", 7), *INERT.items(), ("PAHRP:cmdExtPhasMod", "enabled")])
        time.sleep(3.0)  # longer than the autosave period
        after = ca_gets(twin.client_env, names)
    assert {pv: after[pv] for pv in INERT} == INERT and after["WFGENC1CP:rdVolt"] == 0.02
    assert (after["TWIN:LATTICE:VERSION"], after["TUNEZRP:measX"]) == (before["TWIN:LATTICE:VERSION"],
                                                                       before["TUNEZRP:measX"])  # no effect
    puts = [e for e in journal.entries(tmp_path) if e["pv"] in INERT]
    assert [(e["pv"], e["old"]) for e in puts if e["outcome"] == "refused"] == [
        ("S2P2RP:setCur", 0.0), ("TWIN:WFGENC1CP:VOLT", 0.011), ("IGPF:X:FBCTRL", 1)]  # the old values stay
    assert [e["pv"] for e in puts if e["outcome"] == "accepted"] == [*INERT, "PAHRP:cmdExtPhasMod"]
    with TwinProcess("mls", "--ideal", state_dir=tmp_path) as twin:
        again = ca_gets(twin.client_env, names)
    assert {pv: again[pv] for pv in INERT} == INERT and again["WFGENC1CP:rdVolt"] == 0.02
