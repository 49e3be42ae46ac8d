"""The BESSY II IOC over real CA (pyepics) and PVA (p4p), against the model and linear optics."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import epics
import numpy as np
import pytest
from ca import TwinClient, caget, wait_for
from conftest import DB
from physics import dispersion_orbit, relative_error
from twinioc.model import Change, Engine
from twinioc.model.tables import read_csv

PVS = [row["pv"].replace("$(P)", "TWIN:") for row in read_csv(DB / "bessy2" / "pvs.csv")]
CA_PVS = [pv for pv in PVS if pv != "ORBITCC:rdBpm"]  # the NTTable is a PVA-only group


twin = TwinClient("TWIN:")


@pytest.fixture
def model():
    return Engine.from_folder(DB / "bessy2")


def test_every_pv_connects_over_ca(bessy2_ioc):
    values = epics.caget_many(CA_PVS, connection_timeout=10, timeout=10)
    missing = [pv for pv, v in zip(CA_PVS, values, strict=True) if v is None]
    assert not missing


def test_every_pv_connects_over_pva(pva):
    values = pva.get(PVS, throw=False, timeout=10)
    failed = [pv for pv, v in zip(PVS, values, strict=True) if isinstance(v, Exception)]
    assert not failed


def test_pv_counts_match_the_machine():
    steerers = [pv for pv in PVS if pv.endswith(":set") and pv[:2] in ("HS", "VS")]
    assert len(steerers) == 112
    assert sum(pv.startswith("BPMZ") and pv.endswith(":rdX") for pv in PVS) == 123
    quads = [pv for pv in PVS if pv.endswith(":set") and pv.startswith(("Q", "PQ"))]
    assert len(quads) == 54  # 53 LOCO converters + PQIT6R
    assert len([pv for pv in PVS if pv.endswith(":set") and pv.startswith("S")]) == 13
    for suffix in (":rdbk", ":stat1", ":stat2"):
        assert len([pv for pv in PVS if pv.endswith(suffix)]) == 112 + 54 + 13


def test_orbit_table_over_pva(pva):
    table = pva.get("ORBITCC:rdBpm", timeout=5)
    assert list(table.labels) == ["BPM", "X", "Y"]
    assert list(table.value.BPM)[:2] == ["BPMZ5D1R", "BPMZ6D1R"] and len(table.value.BPM) == 123
    orbit = caget("ORBITCC:rdPos")
    np.testing.assert_allclose(table.value.X, orbit[0::2] * 1e-6, atol=1e-6)


def test_metadata_of_a_setpoint(bessy2_ioc):
    pv = epics.PV("HS4P2D1R:set")
    ctrl = pv.get_ctrlvars(timeout=5)
    assert ctrl["units"] == "A"
    assert ctrl["lower_ctrl_limit"] == -1.0 and ctrl["upper_ctrl_limit"] == 1.0
    assert caget("Q1PDR:set") == pytest.approx(216.0197917196)
    assert epics.PV("ORBITCC:rdPos").get_ctrlvars(timeout=5)["units"] == "nm"


def test_steerer_put_moves_the_orbit_as_the_model_predicts(bessy2_ioc, model):
    before = caget("ORBITCC:rdPos")
    twin.put("HS4P1T2R:set", 0.3)
    try:
        assert caget("HS4P1T2R:rdbk") == pytest.approx(0.3)
        after = caget("ORBITCC:rdPos")
        measured = (after - before)[0::2] * 1e-9  # m
        reference = model.compute(chromaticity=False)
        model.apply([Change("HS4P1T2R", "current", 0.3)])
        expected = model.compute(chromaticity=False).x - reference.x
        assert np.corrcoef(measured, expected)[0, 1] > 0.99
        assert np.linalg.norm(measured) == pytest.approx(np.linalg.norm(expected), rel=0.02)
        per_bpm = np.array(epics.caget_many([f"{b['name']}:rdX" for b in read_csv(DB / "bessy2" / "bpms.csv")]))
        np.testing.assert_allclose(per_bpm, after[0::2] * 1e-6, atol=1e-6)  # mm vs nm
    finally:
        twin.put("HS4P1T2R:set", 0.0)


def test_every_readback_shows_its_element_of_the_readback_array(bessy2_ioc):
    """The readback PVs take their values from $(P)READBACKS in the IOC's C code (no Python per PV)."""
    rows = read_csv(DB / "bessy2" / "pvs.csv")
    readbacks = {row["device"]: row["pv"] for row in rows if row["signal"] == "readback"}
    names = list(caget("TWIN:READBACKS:NAMES"))
    assert sorted(names) == sorted(readbacks)
    twin.put("HS4P1T2R:set", 0.25)
    try:
        array = caget("TWIN:READBACKS")
        singles = epics.caget_many([readbacks[n] for n in names], timeout=5)
        np.testing.assert_allclose(singles, array, rtol=1e-12)
        assert array[names.index("HS4P1T2R")] == pytest.approx(0.25)
        assert array[names.index("Q3PD2R")] == pytest.approx(caget("Q3PD2R:set"))
    finally:
        twin.put("HS4P1T2R:set", 0.0)


def test_quadrupole_put_moves_the_tunes_as_the_model_predicts(bessy2_ioc, model):
    nominal = caget("Q3PD2R:set")
    f_rev = 299792458 / 240.00839
    h0, v0 = caget("TUNEZR:rdH"), caget("TUNEZR:rdV")
    twin.put("Q3PD2R:set", nominal + 2.0)
    try:
        h1, v1 = caget("TUNEZR:rdH"), caget("TUNEZR:rdV")
        q0 = model.compute(chromaticity=False).tune
        model.apply([Change("Q3PD2R", "current", nominal + 2.0)])
        dq = model.compute(chromaticity=False).tune - q0
        assert np.all(np.abs(dq) > 1e-3)
        np.testing.assert_allclose([(h1 - h0) * 1e3 / f_rev, (v1 - v0) * 1e3 / f_rev], dq, rtol=0.01)
        assert caget("TWIN:TUNE:X") == pytest.approx(h1 * 1e3 / f_rev, rel=1e-4)
    finally:
        twin.put("Q3PD2R:set", nominal)


def test_rf_put_moves_the_orbit_through_dispersion(bessy2_ioc, model):
    f0 = caget("MCLKHX251C:freq")
    before = caget("ORBITCC:rdPos")
    twin.put("MCLKHX251C:freq", f0 + 0.5)
    try:
        assert caget("MCLKHX251C:hwRdFreq") == pytest.approx(f0 + 0.5)
        measured = (caget("ORBITCC:rdPos") - before)[0::2] * 1e-9
        expected = dispersion_orbit(model.ring, model._bpm_refs, 0.5 / f0)
        assert relative_error(measured, expected) < 0.03
        assert caget("TWIN:MOMENTUM:OFFSET") == pytest.approx(-0.5 / f0 / model.ring.get_mcf(), rel=0.03)
    finally:
        twin.put("MCLKHX251C:freq", f0)


def test_nan_is_refused_with_an_alarm_and_the_old_value_stays(bessy2_ioc):
    twin.put("VS3P2D1R:set", 0.25)
    version = caget("TWIN:LATTICE:VERSION")
    epics.caput("VS3P2D1R:set", math.nan, wait=True, timeout=5)
    # the record refuses NaN (UDF/INVALID), then the twin marks the refusal (WRITE/MINOR)
    assert wait_for(lambda: epics.caget("VS3P2D1R:set.STAT"), lambda s: s == 2) == 2
    assert epics.caget("VS3P2D1R:set.SEVR") >= 1
    assert caget("VS3P2D1R:set") == pytest.approx(0.25)
    assert caget("VS3P2D1R:rdbk") == pytest.approx(0.25)
    twin.settle()
    assert caget("TWIN:LATTICE:VERSION") == version
    twin.put("VS3P2D1R:set", 0.0)  # a good put clears the alarm
    assert wait_for(lambda: epics.caget("VS3P2D1R:set.SEVR", as_string=False), lambda s: s == 0) == 0


@pytest.mark.parametrize("value", [5.0, math.inf, -math.inf])
def test_beyond_the_limits_is_clamped_with_an_alarm(bessy2_ioc, value):
    epics.caput("HS1PD4R:set", value, wait=True, timeout=5)
    limit = math.copysign(1.0, value)
    assert wait_for(lambda: caget("HS1PD4R:rdbk"), lambda v: v == limit) == limit
    assert caget("HS1PD4R:set") == limit
    assert epics.caget("HS1PD4R:set.SEVR") == 1
    twin.put("HS1PD4R:set", 0.0)


def test_a_string_put_is_refused(bessy2_ioc, pva):
    twin.put("VS2P1T5R:set", 0.1)
    with pytest.raises(Exception):  # noqa: B017 - the client library refuses to convert
        epics.caput("VS2P1T5R:set", "not a number", wait=True, timeout=5)
    with pytest.raises(Exception):  # noqa: B017
        pva.put("VS2P1T5R:set", "not a number", timeout=5)
    assert caget("VS2P1T5R:set") == pytest.approx(0.1)
    assert caget("TUNEZR:rdH") is not None  # still serving
    twin.put("VS2P1T5R:set", 0.0)


def test_unstable_setting_loses_the_beam_and_restoring_recovers(bessy2_ioc):
    nominal = caget("Q1PDR:set")
    twin.put("Q1PDR:set", 300.0)
    try:
        assert caget("TWIN:BEAM:LOST") == 1
        assert caget("CUMZR:rdCur") == 0.0
        assert epics.caget("BPMZ5D1R:rdX.SEVR") == 3  # INVALID
        assert epics.caget("TUNEZR:rdH.SEVR") == 3
        assert caget("TWIN:BEAM:LOST:REASON", as_string=True)
    finally:
        twin.put("Q1PDR:set", nominal)
    assert caget("TWIN:BEAM:LOST") == 0
    assert 299.0 <= caget("CUMZR:rdCur") <= 301.0  # re-injected by top-up, within its band
    assert epics.caget("BPMZ5D1R:rdX.SEVR") == 0
    assert caget("TWIN:TUNE:X") == pytest.approx(0.848, abs=0.01)


def test_setpoints_survive_a_restart(tmp_path):
    from twinioc.ioc.testing import TwinProcess

    script = ("import epics, sys; ok = epics.caput('HS4P2D3R:set', 0.42, wait=True, timeout=5); "
              "sys.exit(0 if ok == 1 else 1)")
    with TwinProcess("bessy2", "--ideal", state_dir=tmp_path) as twin:
        env = {**twin.client_env, "PATH": ""}
        subprocess.run([sys.executable, "-c", script], env=env, check=True)
        time.sleep(3.0)  # longer than the autosave period of the startup file
    with TwinProcess("bessy2", "--ideal", state_dir=tmp_path) as twin:
        read = ("import epics; print(epics.caget('HS4P2D3R:set', timeout=5), "
                "epics.caget('HS4P2D3R:rdbk', timeout=5))")
        out = subprocess.run([sys.executable, "-c", read], env=twin.client_env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert [float(v) for v in out[-2:]] == [0.42, 0.42]


def test_cli_lists_the_pvs():
    out = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "--list-pvs"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == len(PVS) + 1
    assert any(line.startswith("ORBITCC:rdPos\twaveform\tnm") for line in out)


def test_cli_refuses_an_unknown_machine():
    done = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "--machine", "nosuch", "--list-pvs"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "no machine 'nosuch'" in done.stderr


def test_refuses_to_start_where_another_server_answers_the_machine_names(bessy2_ioc, tmp_path):
    """A second twin on the same ports finds the first answering the sentinel names: it refuses to
    start, and starts only with --ignore-other-servers."""
    from twinioc.ioc.testing import TwinProcess

    def beside_the_session_twin(*args):
        twin = TwinProcess("bessy2", *args, state_dir=tmp_path / str(len(args)), prefix="TWIN2:")
        twin.ca_port, twin.repeater_port = bessy2_ioc.ca_port, bessy2_ioc.repeater_port
        return twin

    refused = beside_the_session_twin().launch()
    assert refused.process.wait(timeout=60) != 0
    assert "refusing to start" in refused.log() and "ORBITCC:rdPos" in refused.log()

    # on ports of its own for CA, but the session twin's for PVA: PVA answers
    on_pva = TwinProcess("bessy2", state_dir=tmp_path / "pva", prefix="TWIN2:")
    on_pva.pva_port, on_pva.pva_broadcast = bessy2_ioc.pva_port, bessy2_ioc.pva_broadcast
    on_pva.launch()
    assert on_pva.process.wait(timeout=60) != 0
    assert f"ORBITCC:rdPos at PVA port {bessy2_ioc.pva_broadcast}" in on_pva.log(), on_pva.log()

    forced = beside_the_session_twin("--ignore-other-servers").launch()
    try:
        deadline = time.monotonic() + 60
        while "serving" not in forced.log() and forced.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "starting anyway" in forced.log() and "serving" in forced.log(), forced.log()
    finally:
        forced.stop()
    assert caget("ORBITCC:rdPos") is not None  # the session twin serves on
