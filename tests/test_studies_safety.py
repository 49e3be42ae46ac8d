"""The measurement service's safety: loopback and tokens, a target that is not a twin, the envelope
every put then passes, and a service killed during a plan that puts the setpoints back on restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from ca import caget
from conftest import MLS_PREFIX
from web import WebProcess, epics_env, wait_done


def test_off_loopback_needs_a_token(twins):
    env = {k: v for k, v in os.environ.items() if k != "TWINIOC_WEB_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "web", "--machine", "mls", "--bind", "192.0.2.1"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs a token" in done.stderr


def test_a_token_guards_every_change(twins, tmp_path):
    with WebProcess("mls", epics_env(), tmp_path, MLS_PREFIX, "--token", "s3cret") as web, web.client() as client:
        assert client.get("/api/machine").status_code == 200  # reading needs none
        body = {"kind": "tune_response", "converters": ["Q1P1K1RP"], "samples": 1}
        assert client.post("/api/measurements", json=body).status_code == 401
        wrong = client.post("/api/measurements", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "token" in wrong.json()["detail"]
        assert client.get("/api/measurements").json()["measurements"] == []
        accepted = client.post("/api/measurements", json=body, headers={"Authorization": "Bearer s3cret"})
        assert accepted.status_code == 202
        assert client.delete(f"/api/measurements/{accepted.json()['id']}").status_code == 401
        assert wait_done(client, accepted.json()["id"])["status"] == "done"


def journal_after(twin, seq: int) -> list[dict]:
    entries = [json.loads(line) for line in (twin.state_dir / "journal.jsonl").read_text().splitlines() if line]
    return [e for e in entries if e["seq"] > seq]


def test_a_target_that_is_not_a_twin_is_refused_unless_allowed_and_then_enveloped(mls_ioc, tmp_path):
    """Under a prefix the twin does not serve, ``<prefix>SEED`` is missing: to the service it is a real
    machine. Plans are refused; with --allow-machine a 1.2 A step of a quadrupole (whose envelope allows
    0.5 A at once) goes out in steps of 0.4 A."""
    with WebProcess("mls", epics_env(), tmp_path / "refused", "NOTATWIN:") as web, web.client() as client:
        refused = client.post("/api/measurements", json={"kind": "dispersion"})
        assert refused.status_code == 403 and "not a twin" in refused.json()["detail"]
        assert client.get("/api/state").json()["target"] == "machine"
    seq = caget(mls_ioc.pv("JOURNAL:SEQ"))
    before = caget("Q1P1K1RP:setCur")
    with (WebProcess("mls", epics_env(), tmp_path / "allowed", "NOTATWIN:", "--allow-machine") as web,
          web.client() as client):
        id = client.post("/api/measurements", json={"kind": "tune_response", "converters": ["Q1P1K1RP"],
                                                    "step_A": 1.2, "samples": 1}).json()["id"]
        record = wait_done(client, id, timeout=120)
    assert record["status"] == "done", record
    puts = [e for e in journal_after(mls_ioc, seq) if e.get("device") == "Q1P1K1RP"]
    steps = [e["new"] - e["old"] for e in puts]
    assert len(steps) == 6 and max(abs(s) for s in steps) == pytest.approx(0.4, abs=1e-9), steps
    assert caget("Q1P1K1RP:setCur") == pytest.approx(before, abs=1e-9)


def test_a_service_killed_during_a_plan_puts_its_setpoints_back_when_it_starts_again(mls, twins, tmp_path):
    """And the orbit feedback, which the plan had switched off, runs again."""
    import epics

    names = [c.name for kind in ("hsteerer", "vsteerer") for c in mls.devices.of_kind(kind)]
    before = {n: caget(f"{n}:setCur") for n in names}
    assert epics.caput("ORBITCCP:selRunMode", 1, wait=True, timeout=5) == 1
    web = WebProcess("mls", epics_env(), tmp_path, MLS_PREFIX).start()
    try:
        with web.client() as client:
            id = client.post("/api/measurements", json={"kind": "orm"}).json()["id"]
            deadline = time.monotonic() + 60
            while client.get(f"/api/measurements/{id}").json()["progress"] < 0.3 and time.monotonic() < deadline:
                time.sleep(0.05)
        os.killpg(web.process.pid, signal.SIGKILL)
        web.process.wait()
        moved = [n for n in names if caget(f"{n}:setCur", use_monitor=False) != before[n]]
        assert moved, "the plan had a steerer out when it was killed"
        assert caget("ORBITCCP:selRunMode", use_monitor=False) == 0
        with WebProcess("mls", epics_env(), tmp_path, MLS_PREFIX) as again, again.client() as client:
            record = client.get(f"/api/measurements/{id}").json()
        assert record["status"] == "failed" and "put back" in record["error"] and "feedback" in record["error"]
        assert caget("ORBITCCP:selRunMode", use_monitor=False) == 1
        # the feedback runs again, on an ideal ring whose orbit is zero: it moves nothing measurable
        assert {n: caget(f"{n}:setCur", use_monitor=False) for n in names} == pytest.approx(before, abs=1e-6)
    finally:
        web.stop()
        epics.caput("ORBITCCP:selRunMode", 0, wait=True, timeout=5)
