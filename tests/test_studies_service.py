"""The measurement service over real HTTP, on the session's ideal twins over real CA: each plan's result
against pyAT's linear optics of the same lattice, the queue, cancelling, bad requests."""

from __future__ import annotations

import os
import time

import at
import epics
import numpy as np
import pytest
from ca import caget
from conftest import DB, MLS_PREFIX
from physics import orbit_response, relative_error, tune_shift
from twinioc.model.lattice_io import load_lattice
from web import epics_env, measure, wait_done


@pytest.fixture(scope="module")
def mls_http(mls_web):
    with mls_web.client() as client:
        yield client


def ring_of(machine: str) -> at.Lattice:
    return load_lattice(DB / machine / "lattice.json").disable_6d(copy=True)


def test_machine_structure(mls_http, mls):
    machine = mls_http.get("/api/machine").json()
    assert machine["machine"] == "mls" and machine["bpms"] == 28
    assert machine["converters_by_kind"]["hsteerer"] == 12 and machine["converters_by_kind"]["vsteerer"] == 16
    devices = mls_http.get("/api/machine/devices").json()["converters"]
    q = next(d for d in devices if d["name"] == "Q1P1K1RP")
    assert q["kind"] == "quadrupole" and q["unit"] == "A" and q["magnets"] == ["Q1M1K1RP"] and q["limits"][1] > 0
    elements = mls_http.get("/api/machine/lattice").json()["elements"]
    assert len(elements) == len(mls.ring)
    quad = next(e for e in elements if e["name"] == "Q1M1K1RP")
    assert quad["converter"] == "Q1P1K1RP" and quad["length"] == pytest.approx(mls.ring[quad_index(mls)].Length)
    assert elements[-1]["s"] + elements[-1]["length"] == pytest.approx(48.0, abs=1e-6)


def quad_index(engine) -> int:
    return next(i for i, e in enumerate(engine.ring) if e.FamName == "Q1M1K1RP")


def test_state_is_the_machine_now(mls_http, mls_ioc):
    state = mls_http.get("/api/state").json()
    assert state["target"] == "twin" and len(state["orbit_x_mm"]) == 28 and state["bpms"][0] == "BPMZ1K1RP"
    assert state["lattice_version"] >= 1 and state["seed"] == caget(mls_ioc.pv("SEED"))
    assert state["tune_x"] == pytest.approx(caget(mls_ioc.pv("TUNE:X")) % 1, abs=1e-4)
    assert state["current_mA"] == pytest.approx(caget("CUM1ZK3RP:measCur"), rel=1e-3)


STEERERS = ["HS1P2K1RP", "HS3P1L2RP", "VS2P2K1RP", "VS3P1L2RP"]


@pytest.fixture(scope="module")
def mls_orm(mls_http):
    return measure(mls_http, {"kind": "orm", "steerers": STEERERS})


def test_orm_against_pyat(mls_orm, mls):
    """Each column within 2 % of pyAT's linear response of the same lattice; the other plane silent."""
    result = mls_orm["result"]
    matrix, n = np.array(result["mm_per_A"]), len(result["bpms"])
    assert matrix.shape == (2 * n, len(STEERERS)) and result["bpms"] == [b.name for b in mls.devices.bpms]
    ring, bpms = ring_of("mls"), np.array([b.element for b in mls.devices.bpms])
    for j, name in enumerate(STEERERS):
        (winding,) = mls.devices.converters[name].windings
        plane = 0 if winding.field == "HKICK" else 1
        expected = orbit_response(ring, bpms, winding.element, plane, winding.strength(1.0, mls.rigidity)) * 1e3
        column = matrix[:, j]
        assert relative_error(column[plane * n:(plane + 1) * n], expected) < 0.02, name
        assert np.linalg.norm(column[(1 - plane) * n:(2 - plane) * n]) < 0.02 * np.linalg.norm(expected), name
    assert mls_orm["provenance"]["target"] == "twin" and mls_orm["run_uid"]


def test_the_run_is_in_the_catalog(mls_http, mls_orm):
    run = mls_http.get(f"/api/measurements/{mls_orm['id']}/run").json()
    assert run["start"]["kind"] == "orm" and run["stop"]["exit_status"] == "success"
    assert len(run["streams"]["primary"]["orbit-x"]) == len(STEERERS)
    assert len(run["streams"]["primary"]["orbit-x"][0]) == 28


def test_orbit_correction_with_the_measured_response_undoes_a_kick(mls_http, mls_orm, mls_ioc):
    steerer = "HS3P1L2RP"
    before = caget(f"{steerer}:setCur")
    try:
        assert epics.caput(f"{steerer}:setCur", before + 0.2, wait=True, timeout=5) == 1
        record = measure(mls_http, {"kind": "orbit_correction", "response": mls_orm["id"], "iterations": 2})
        result = record["result"]
        assert result["rms_um"]["x"][0] > 50 and result["rms_um"]["x"][-1] < 1.0, result["rms_um"]
        assert caget(f"{steerer}:setCur") == pytest.approx(before, abs=2e-3)
    finally:
        epics.caput(f"{steerer}:setCur", before, wait=True, timeout=5)


@pytest.mark.parametrize("machine", ["mls", "bessy2"])
def test_chromaticity_by_rf_scan_against_pyat(machine, request):
    web = request.getfixturevalue(f"{machine}_web")
    with web.client() as client:
        record = measure(client, {"kind": "chromaticity", "points": 5})
    expected = at.get_chrom(ring_of(machine))
    measured = np.array(record["result"]["xi"])
    assert np.all(np.abs(measured - expected) < 0.05 * np.abs(expected)), (measured, expected)


def test_dispersion_against_pyat(mls_http, mls):
    record = measure(mls_http, {"kind": "dispersion"})
    ring, bpms = ring_of("mls"), np.array([b.element for b in mls.devices.bpms])
    order = np.argsort(bpms)
    _, _, optics = ring.get_optics(refpts=bpms[order])
    eta = np.empty(len(bpms))
    eta[order] = optics.dispersion[:, 0]
    assert relative_error(np.array(record["result"]["eta_x_m"]), eta) < 0.02
    assert np.max(np.abs(record["result"]["eta_y_m"])) < 1e-3


def test_tune_response_against_beta_dk_l(mls_http, mls):
    converters = ["Q1P1K1RP", "Q2P1K1RP", "Q3P1K1RP"]
    record = measure(mls_http, {"kind": "tune_response", "converters": converters})
    ring = ring_of("mls")
    for name, measured in zip(converters, record["result"]["dq_per_A"], strict=True):
        (winding,) = mls.devices.converters[name].windings
        expected = tune_shift(ring, [winding.element], [winding.strength(1.0, mls.rigidity)])
        assert np.allclose(measured, expected, rtol=0.03), (name, measured, expected)


def steerer_setpoints(mls) -> dict[str, float]:
    names = [c.name for kind in ("hsteerer", "vsteerer") for c in mls.devices.of_kind(kind)]
    return {n: caget(f"{n}:setCur") for n in names}


def test_queue_and_cancel_put_every_setpoint_back(mls_http, mls):
    before = steerer_setpoints(mls)
    first = mls_http.post("/api/measurements", json={"kind": "orm"}).json()["id"]
    second = mls_http.post("/api/measurements", json={"kind": "dispersion"}).json()["id"]
    third = mls_http.post("/api/measurements", json={"kind": "dispersion"}).json()["id"]
    assert mls_http.get(f"/api/measurements/{second}").json()["status"] == "queued"
    deadline = time.monotonic() + 60
    while mls_http.get(f"/api/measurements/{first}").json()["progress"] < 0.2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mls_http.get(f"/api/measurements/{first}").json()["status"] == "running"
    assert mls_http.delete(f"/api/measurements/{third}").json()["status"] == "cancelled"
    mls_http.delete(f"/api/measurements/{first}")
    cancelled = wait_done(mls_http, first)
    assert cancelled["status"] == "cancelled", cancelled
    assert steerer_setpoints(mls) == pytest.approx(before, abs=1e-9)
    assert wait_done(mls_http, second)["status"] == "done"
    never = mls_http.get(f"/api/measurements/{third}").json()
    assert never["status"] == "cancelled" and never["run_uid"] is None and never["started"] is None
    listed = mls_http.get("/api/measurements", params={"kind": "dispersion"}).json()["measurements"]
    assert {second, third} <= {m["id"] for m in listed} and all(m["kind"] == "dispersion" for m in listed)
    by_device = mls_http.get("/api/measurements", params={"device": "HS3P1L2RP"}).json()["measurements"]
    assert first in {m["id"] for m in by_device} and second not in {m["id"] for m in by_device}
    recent = mls_http.get("/api/measurements", params={"since": cancelled["created"]}).json()["measurements"]
    assert [m["id"] for m in recent][:3] == [first, second, third]


BAD = [
    ({"kind": "laser"}, 422, "unknown kind"),
    ({"kind": "bba"}, 422, "quadrupole"),
    ({"kind": "bba", "quadrupole": "Q9M9X9RP"}, 422, "Q9M9X9RP"),
    ({"kind": "bba", "quadrupole": "S1M1K1RP"}, 422, "not"),
    ({"kind": "bba", "quadrupole": "Q1M1K1RP", "steps": 1000}, 422, "steps"),
    ({"kind": "orm", "steerers": ["Q1P1K1RP"]}, 422, "not a steerer"),
    ({"kind": "orm", "step_A": "big"}, 422, "step_A"),
    ({"kind": "orm", "step_A": -1}, 422, "step_A"),
    ({"kind": "chromaticity", "points": 2}, 422, "points"),
    ({"kind": "dispersion", "rf_step_khz": 1e9}, 422, "rf_step_khz"),
    ({"kind": "tune_response"}, 422, "converters"),
    ({"kind": "orbit_correction", "response": "nope"}, 404, "nope"),
    ({"kind": "dispersion", "colour": "red"}, 422, "colour"),
    ([1, 2, 3], 400, "JSON object"),
]


def test_bad_requests_are_refused_and_nothing_reaches_the_machine(mls_http, mls_ioc):
    seq = caget(mls_ioc.pv("JOURNAL:SEQ"))
    listed = len(mls_http.get("/api/measurements").json()["measurements"])
    for body, status, words in BAD:
        response = mls_http.post("/api/measurements", json=body)
        assert response.status_code == status and words in response.json()["detail"], (body, response.text)
    response = mls_http.post("/api/measurements", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not JSON" in response.json()["detail"]
    assert mls_http.get("/api/measurements/0123456789ab").status_code == 404
    assert mls_http.delete("/api/measurements/0123456789ab").status_code == 404
    assert mls_http.get("/api/measurements", params={"since": "yesterday"}).status_code == 422
    assert mls_http.get("/api/measurements", params={"kind": "laser"}).status_code == 422
    assert len(mls_http.get("/api/measurements").json()["measurements"]) == listed
    time.sleep(0.5)
    assert caget(mls_ioc.pv("JOURNAL:SEQ")) == seq
    assert mls_http.get("/api/machine").status_code == 200
    assert mls_http.get("/docs").status_code == 200 and "paths" in mls_http.get("/openapi.json").json()


def test_measure_on_the_command_line(twins, tmp_path):
    """``twinioc measure`` runs the same plan without the service and prints its record as JSON."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")} | epics_env()
    command = [sys.executable, "-m", "twinioc.ioc.cli", "measure"]
    done = subprocess.run([*command, "tune_response", "--machine", "mls", "--prefix", MLS_PREFIX, "--converters",
                           "Q1P1K1RP", "--samples", "2", "--state-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "done" and record["params"]["samples"] == 2
    assert record["result"]["converters"] == ["Q1P1K1RP"] and len(record["result"]["dq_per_A"][0]) == 2
    refused = subprocess.run([*command, "bba", "--machine", "mls", "--prefix", MLS_PREFIX, "--quadrupole", "Q9M9X9RP",
                              "--state-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Q9M9X9RP" in refused.stderr
