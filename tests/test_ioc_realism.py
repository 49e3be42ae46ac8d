"""A realistic MLS twin (ramps, noise, errors, lifetime, aperture) seen by real CA and PVA clients.

The session's twins are ideal and the pyepics context in this process points at them, so these
tests reach their own twin through p4p contexts and through CA clients in subprocesses.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from ca import ca_process as ca
from ca import wait_for
from conftest import ROOT

SEED = 7
QUAD_OFFSET_UM = (120.0, -80.0)  # Q2M1K3RP, for the beam-based alignment
ARGS = ["--seed", str(SEED),
        "--set", "errors.quadrupole_offset_um=0", "--set", "errors.sextupole_offset_um=0",
        "--set", "errors.roll_urad=0",
        "--set", f"errors.offsets_um.Q2M1K3RP=[{QUAD_OFFSET_UM[0]}, {QUAD_OFFSET_UM[1]}]",
        "--set", "bpm.offset_um=0", "--set", "bpm.gain_error=0", "--set", "bpm.roll_mrad=0",
        "--set", "converters.slew_per_s.hsteerer=1.0", "--set", "beam.fill_rate_mA_per_s=50",
        "--set", "start.state=commissioning", "--set", "orbit_feedback.enabled=false"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from twinioc.ioc.testing import TwinProcess

    with TwinProcess("mls", *ARGS, state_dir=tmp_path_factory.mktemp("real")) as twin:
        yield twin
    assert "Traceback" not in twin.log(), twin.log()


@pytest.fixture(scope="module")
def pva(real):
    context = real.pva_context()
    yield context
    context.close()


def collect(context, names: list[str], seconds: float = 0.0, count: int = 0) -> dict[str, list]:
    """Monitor *names* for *seconds*, or until the first has *count* updates: (IOC time, value)."""
    seen = {name: [] for name in names}

    def keep(name):
        return lambda value: seen[name].append((value.timestamp, np.asarray(value)))

    subscriptions = [context.monitor(name, keep(name)) for name in names]
    deadline = time.monotonic() + (seconds or 30.0)
    try:
        while time.monotonic() < deadline and not (count and len(seen[names[0]]) >= count):
            time.sleep(0.05)
    finally:
        for subscription in subscriptions:
            subscription.close()
    return seen


def put_and_wait(pva, name, value, settle=0.5):
    pva.put(name, value, timeout=5)
    time.sleep(settle)


def test_a_steerer_ramps_at_its_slew_rate_and_the_orbit_follows_the_readback(real, pva):
    before = np.asarray(pva.get("TWIN:ORBIT:TRUE:X", timeout=5))
    pva.put("HS1P1K1RP:setCur", 1.0, timeout=5)
    seen = collect(pva, ["HS1P1K1RP:rdCur", "TWIN:ORBIT:TRUE:X"], seconds=2.5)
    try:
        readback = np.array([(t, float(v)) for t, v in seen["HS1P1K1RP:rdCur"]])
        ramping = readback[(readback[:, 1] > 0.1) & (readback[:, 1] < 0.9)]
        assert len(ramping) >= 5  # about 20 ticks of 0.04 A at 25 Hz
        slope = np.polyfit(ramping[:, 0], ramping[:, 1], 1)[0]
        assert slope == pytest.approx(1.0, rel=0.1)  # A/s, as --set converters.slew_per_s.hsteerer=1.0
        assert readback[-1, 1] == pytest.approx(1.0, abs=1e-3)
        # each published orbit belongs to the readback of the same tick
        final = seen["TWIN:ORBIT:TRUE:X"][-1][1] - before
        k = int(np.argmax(np.abs(final)))
        matched = 0
        for t, orbit in seen["TWIN:ORBIT:TRUE:X"]:
            # a tick publishes the readbacks first, then the orbit: the last readback before an orbit
            # is that tick's (or, when none came with it, the output has not moved since)
            earlier = np.flatnonzero(readback[:, 0] <= t)
            if len(earlier) and t - readback[earlier[-1], 0] < 1.0:
                assert (orbit - before)[k] / final[k] == pytest.approx(readback[earlier[-1], 1], abs=0.01)
                matched += 1
        assert matched >= 15
        # switched off, the output ramps to zero and the setpoint stays; on again, it comes back
        pva.put("TWIN:HS1P1K1RP:POWER", 0, timeout=5)
        time.sleep(1.5)
        assert float(pva.get("HS1P1K1RP:rdCur", timeout=5)) == pytest.approx(0.0, abs=1e-3)
        assert float(pva.get("HS1P1K1RP:setCur", timeout=5)) == 1.0
        pva.put("TWIN:HS1P1K1RP:POWER", 1, timeout=5)
        time.sleep(1.5)
        assert float(pva.get("HS1P1K1RP:rdCur", timeout=5)) == pytest.approx(1.0, abs=1e-3)
    finally:
        put_and_wait(pva, "HS1P1K1RP:setCur", 0.0, settle=1.5)


def test_bpm_readings_have_the_configured_noise_around_the_true_orbit(real, pva):
    put_and_wait(pva, "TWIN:BPM:NOISE", 5.0)
    try:
        seen = collect(pva, ["TWIN:ORBIT:X", "TWIN:ORBIT:TRUE:X"], count=100)
    finally:
        put_and_wait(pva, "TWIN:BPM:NOISE", 1.0)
    readings = np.array([v for _, v in seen["TWIN:ORBIT:X"][:100]])  # mm
    truth = seen["TWIN:ORBIT:TRUE:X"][-1][1]
    sigma = np.std(readings, axis=0, ddof=1).mean() * 1e3  # µm
    assert sigma == pytest.approx(5.0, rel=0.2)
    assert np.max(np.abs(readings.mean(axis=0) - truth)) * 1e3 < 4 * 5.0 / math.sqrt(100)
    assert len({r.tobytes() for r in readings}) == 100  # no two readings alike
    per_bpm = ca(real.client_env, "print(*(epics.caget(f'BPMZ{i}K1RP:rdX', timeout=5) for i in range(1, 8)))")
    assert len(set(per_bpm.split())) == 7


def test_the_same_seed_gives_the_same_readings(tmp_path):
    """Two twins started with one seed show one sequence of noisy readings, tick for tick."""
    from twinioc.ioc.testing import TwinProcess

    twins = [TwinProcess("mls", *ARGS, state_dir=tmp_path / name) for name in ("a", "b")]
    try:
        for twin in twins:
            twin.launch()
        for twin in twins:
            twin.wait_ready()
        contexts = [twin.pva_context() for twin in twins]
        subscriptions, runs = [], ([], [])
        for context, run in zip(contexts, runs, strict=True):
            subscriptions.append(context.monitor("TWIN:ORBIT:X", lambda v, run=run: run.append(np.asarray(v))))
        deadline = time.monotonic() + 30
        while overlap(*runs)[2] < TICKS and time.monotonic() < deadline:  # a late start needs longer
            time.sleep(0.05)
        for subscription in subscriptions:
            subscription.close()
        for context in contexts:
            context.close()
    finally:
        for twin in twins:
            twin.stop()
    a, b, n = overlap(*runs)
    assert n >= TICKS
    for x, y in zip(a[:TICKS], b[:TICKS], strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[1])  # and they are noisy


TICKS = 20  # publications compared


def overlap(first: list, second: list) -> tuple[list, list, int]:
    """The two runs from the tick they share first (they started a few ticks apart: the later one's
    first reading falls in the earlier one), and how many ticks they then share."""
    for a, b in ((first, second), (second, first)):
        if b and any(np.array_equal(b[0], v) for v in a):
            start = next(i for i, v in enumerate(a) if np.array_equal(b[0], v))
            return a[start:], list(b), min(len(a) - start, len(b))
    return first, second, 0


def test_the_lifetime_comes_from_physics_and_the_current_monitor_measures_it(real, pva):
    assert pva.get("TWIN:LIFETIME:SOURCE", timeout=5).startswith("physics: Touschek")
    touschek, gas = (float(pva.get(f"TWIN:LIFETIME:{part}", timeout=5)) for part in ("TOUSCHEK", "GAS"))
    lifetime = float(pva.get("TWIN:LIFETIME", timeout=5))
    assert lifetime == pytest.approx(1 / (1 / touschek + 1 / gas), rel=0.01)
    assert 2.0 < lifetime < 20.0  # hours, as the MLS runs (6 h is the figure the startup file quotes)
    wait_for(lambda: time.monotonic() - real.started_at, lambda age: age > 15.0, timeout=20.0)
    measured = float(pva.get("CUM1ZK3RP:rdLt100", timeout=5))
    assert measured == pytest.approx(lifetime, rel=0.10)  # fitted to the noisy readings of the decay
    product = float(pva.get("OPCHECKCCP:calcCurrLife", timeout=5))
    assert product == pytest.approx(float(pva.get("CUM1ZK3RP:measCur", timeout=5)) * measured, rel=0.01)


def test_current_decays_at_the_lifetime_and_top_up_holds_the_band(real, pva):
    put_and_wait(pva, "TWIN:BEAM:LIFETIME", 0.05)  # h: 3 minutes
    try:
        assert "override" in str(pva.get("TWIN:LIFETIME:SOURCE", timeout=5))
        samples = np.array([(t, float(v)) for t, v in collect(pva, ["CUM1ZK3RP:measCur"], seconds=3.0)
                            ["CUM1ZK3RP:measCur"]])
        tau = -1.0 / np.polyfit(samples[:, 0], np.log(samples[:, 1]), 1)[0]
        assert tau == pytest.approx(180.0, rel=0.05)
        time.sleep(8.5)  # the current monitor's 10 s window now holds the decay alone
        assert float(pva.get("CUM1ZK3RP:rdLt10", timeout=5)) == pytest.approx(0.05, rel=0.10)
        assert float(pva.get("TWIN:LIFETIME", timeout=5)) == pytest.approx(0.05)

        pva.put("TWIN:BEAM:LIFETIME", 0.002, timeout=5)  # 7.2 s
        pva.put("TWIN:TOPUP:LOW", 100.0, timeout=5)
        pva.put("TWIN:TOPUP:HIGH", 105.0, timeout=5)
        pva.put("TWIN:TOPUP:ENABLE", 1, timeout=5)
        time.sleep(5.0)  # from ~140 mA down into the band
        held = [float(v) for _, v in collect(pva, ["CUM1ZK3RP:measCur"], seconds=6.0)["CUM1ZK3RP:measCur"]]
        per_tick = 105.0 * (1 - math.exp(-0.15 / 7.2))  # the decay of one (slow) tick
        assert min(held) >= 100.0 - per_tick and max(held) <= 105.0 + 0.01  # the monitor's noise: 1 µA
        assert max(held) - min(held) > 1.0  # it did decay and refill meanwhile
    finally:
        pva.put("TWIN:TOPUP:ENABLE", 0, timeout=5)
        pva.put("TWIN:BEAM:LIFETIME", 6.0, timeout=5)
        put_and_wait(pva, "TWIN:BEAM:INJECT", 1, settle=2.0)  # back to 150 mA at 50 mA/s


def test_an_orbit_beyond_the_aperture_loses_the_beam_until_injection(real, pva):
    check = ("print(epics.caget('TWIN:BEAM:LOST', timeout=5), epics.caget('CUM1ZK3RP:measCur', timeout=5), "
             "epics.caget('CUM1ZK3RP:measCur.SEVR', timeout=5), epics.caget('BPMZ1K1RP:rdY.SEVR', timeout=5), "
             "epics.caget('TUNEZRP:measX.SEVR', timeout=5)); "
             "print(epics.caget('TWIN:BEAM:LOST:REASON', as_string=True, timeout=5))")
    pva.put("VS3P1L2RP:setCur", 7.0, timeout=5)
    put_and_wait(pva, "VS3P2L2RP:setCur", 7.0, settle=3.0)  # 5 A/s: 1.4 s to get there
    try:
        values, reason = ca(real.client_env, check).splitlines()
        assert values.split() == ["1", "0.0", "2", "3", "3"]  # lost; 0 mA MAJOR; readings INVALID
        assert "aperture" in reason
    finally:
        pva.put("VS3P1L2RP:setCur", 0.0, timeout=5)
        put_and_wait(pva, "VS3P2L2RP:setCur", 0.0, settle=3.0)
    values, reason = ca(real.client_env, check).splitlines()
    assert values.split()[:2] == ["1", "0.0"] and "inject" in reason  # the machine holds a beam again: none is there
    put_and_wait(pva, "TWIN:BEAM:INJECT", 1, settle=4.0)
    values, reason = ca(real.client_env, check).splitlines()
    lost, current, *severities = values.split()
    assert lost == "0" and float(current) == pytest.approx(150.0, abs=0.1)  # refilled, decaying again
    assert severities == ["0", "0", "0"] and reason == ""


def test_beam_based_alignment_over_ca_finds_the_quadrupole_offset(real):
    """examples/bba.py, a control-room style script, recovers the configured offset within 10 µm."""
    found = {}
    for plane, steerer in (("x", "HS3P2L2RP"), ("y", "VS2P1L4RP")):
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "bba.py"), "--quad", "Q2P1K3RP",
                               "--bpm", "BPMZ3K3RP", "--steerer", steerer, "--plane", plane],
                              env={**os.environ, **real.client_env}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        found[plane] = float(done.stdout.split(":")[-1].split()[0])
    assert found["x"] == pytest.approx(QUAD_OFFSET_UM[0], abs=10.0)
    assert found["y"] == pytest.approx(QUAD_OFFSET_UM[1], abs=10.0)
