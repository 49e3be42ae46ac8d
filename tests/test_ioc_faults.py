"""Faults injected over CA (and from a scenario file), seen through the real PVs; snapshots.

The twin is the tests' own and ideal (no noise, no ramps, no errors): a BPM reads the model's
orbit exactly, a readback is its converter's output. CA clients run in subprocesses; the effects
are read over CA there, or over PVA here.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from ca import ca_gets, ca_puts, wait_for
from conftest import DB
from twinioc.ioc import journal
from twinioc.model.tables import read_csv

BPMS = [r["name"] for r in sorted(read_csv(DB / "bessy2" / "bpms.csv"), key=lambda r: int(r["index"]))]
SCENARIO = """
[[fault]]
kind = "bpm-offset"
pattern = "BPMZ7D1R"
x_um = 20.0

[[fault]]
kind = "bpm-nan"
pattern = "BPMZ1T1R"
at_s = 2.0
"""


@pytest.fixture(scope="module")
def scenario_twin(tmp_path_factory):
    from twinioc.ioc.testing import TwinProcess

    folder = tmp_path_factory.mktemp("faults")
    (folder / "scenario.toml").write_text(SCENARIO)
    with TwinProcess("bessy2", "--ideal", "--faults", str(folder / "scenario.toml"), state_dir=folder) as scenario_twin:
        yield scenario_twin
    assert "Traceback" not in scenario_twin.log(), scenario_twin.log()


@pytest.fixture(scope="module")
def pva(scenario_twin):
    context = scenario_twin.pva_context()
    yield context
    context.close()


@pytest.fixture
def clean(scenario_twin):
    """No faults in force, not even the scenario's later one, whichever tests ran before."""
    wait_for(scenario_twin.log, lambda text: "added: bpm-nan BPMZ1T1R" in text)
    ca_puts(scenario_twin.client_env, [("TWIN:FAULT:CLEAR", "all")])


def get(pva, name):
    """A value over PVA as plain Python: an array, a float, or a str (p4p's own str() adds the time)."""
    value = pva.get(name, timeout=5)
    if isinstance(value, str):
        return value[:]
    return np.asarray(value) if np.ndim(value) else float(value)


def settle(pva, ticks: int = 3) -> None:
    """Wait until the twin has published a few times more (25 a second)."""
    updates = get(pva, "TWIN:UPDATES")
    wait_for(lambda: get(pva, "TWIN:UPDATES"), lambda u: u >= updates + ticks)


def fault_ids(pva) -> dict[str, int]:
    """Active faults by their spec: the number FAULT:LIST gives each."""
    listing = get(pva, "TWIN:FAULT:LIST")
    return {line.split(": ", 1)[1].rsplit(" (", 1)[0]: int(line.split(":")[0]) for line in listing.splitlines() if line}


def test_a_scenario_file_sets_faults_at_start_and_later(scenario_twin, pva):
    faults = wait_for(lambda: fault_ids(pva), lambda f: len(f) == 2, timeout=10)
    assert list(faults) == ["bpm-offset BPMZ7D1R x_um=20 y_um=0", "bpm-nan BPMZ1T1R"]
    values = ca_gets(scenario_twin.client_env,
                     ["BPMZ7D1R:rdX", "BPMZ1T1R:rdX", "TWIN:ORBIT:TRUE:X", "TWIN:FAULT:COUNT"])
    assert values["BPMZ7D1R:rdX"] - values["TWIN:ORBIT:TRUE:X"][BPMS.index("BPMZ7D1R")] == pytest.approx(0.020)
    assert math.isnan(values["BPMZ1T1R:rdX"]) and values["TWIN:FAULT:COUNT"] == 2
    ca_puts(scenario_twin.client_env, [("TWIN:FAULT:CLEAR", "all")])
    settle(pva)
    values = ca_gets(scenario_twin.client_env, ["BPMZ7D1R:rdX", "BPMZ1T1R:rdX", "TWIN:ORBIT:TRUE:X", "TWIN:FAULT:LIST"])
    assert values["BPMZ7D1R:rdX"] == pytest.approx(values["TWIN:ORBIT:TRUE:X"][BPMS.index("BPMZ7D1R")], abs=1e-9)
    assert values["BPMZ1T1R:rdX"] == pytest.approx(values["TWIN:ORBIT:TRUE:X"][BPMS.index("BPMZ1T1R")], abs=1e-9)
    assert values["TWIN:FAULT:LIST"] == ""


def test_dropped_delayed_and_modified_commands(scenario_twin, pva, clean):
    ca_puts(scenario_twin.client_env, [("TWIN:FAULT:ADD", "drop HS4P1D1R"),
                                       ("TWIN:FAULT:ADD", "delay VS2P1D1R seconds=1.5"),
                                       ("TWIN:FAULT:ADD", "modify HS4P2D1R scale=2 offset=0.01")])
    ids = fault_ids(pva)
    assert set(ids) == {"drop HS4P1D1R", "delay VS2P1D1R seconds=1.5", "modify HS4P2D1R scale=2 offset=0.01"}
    put_at = time.monotonic()
    ca_puts(scenario_twin.client_env, [("HS4P1D1R:set", 0.2), ("VS2P1D1R:set", 0.1), ("HS4P2D1R:set", 0.1)])
    settle(pva)
    values = ca_gets(scenario_twin.client_env, ["HS4P1D1R:set", "HS4P1D1R:rdbk", "VS2P1D1R:rdbk", "HS4P2D1R:rdbk"])
    assert values["HS4P1D1R:set"] == 0.2 and values["HS4P1D1R:rdbk"] == 0.0  # the command never arrived
    assert values["HS4P2D1R:rdbk"] == pytest.approx(2 * 0.1 + 0.01, abs=1e-12)
    if time.monotonic() - put_at < 1.4:
        assert values["VS2P1D1R:rdbk"] == 0.0
    arrived = wait_for(lambda: get(pva, "VS2P1D1R:rdbk"), lambda v: v == 0.1, timeout=10)
    assert arrived == 0.1 and time.monotonic() - put_at >= 1.5
    details = {e["pv"]: e["detail"] for e in journal.entries(scenario_twin.state_dir) if e["command"] == "set"}
    assert details["HS4P1D1R:set"] == f"dropped by fault {ids['drop HS4P1D1R']}"
    assert details["VS2P1D1R:set"].startswith("delayed 1.5 s")
    # cleared, the converters take commands again
    ca_puts(scenario_twin.client_env, [("TWIN:FAULT:CLEAR", str(i)) for i in ids.values()] +
            [("HS4P1D1R:set", 0.0), ("VS2P1D1R:set", 0.0), ("HS4P2D1R:set", 0.0)])
    settle(pva)
    assert fault_ids(pva) == {}
    assert [get(pva, f"{d}:rdbk") for d in ("HS4P1D1R", "VS2P1D1R", "HS4P2D1R")] == [0.0, 0.0, 0.0]


def test_a_tripped_converter_shows_fault_and_drops_to_zero_until_cleared(scenario_twin, pva, clean):
    ca_puts(scenario_twin.client_env, [("HS4P1D1R:set", 0.3)])
    settle(pva)
    kicked = get(pva, "TWIN:ORBIT:TRUE:X")
    ca_puts(scenario_twin.client_env, [("HS4P1D1R:set", 0.0)])
    settle(pva)
    zero = get(pva, "TWIN:ORBIT:TRUE:X")
    ca_puts(scenario_twin.client_env, [("HS4P1D1R:set", 0.3), ("TWIN:FAULT:ADD", "trip HS4P1D1R")])
    settle(pva)
    values = ca_gets(scenario_twin.client_env, ["HS4P1D1R:stat2", "HS4P1D1R:stat1", "HS4P1D1R:rdbk", "HS4P1D1R:set"])
    assert values == {"HS4P1D1R:stat2": 1, "HS4P1D1R:stat1": 0, "HS4P1D1R:rdbk": 0.0, "HS4P1D1R:set": 0.3}
    assert pva.get("HS4P1D1R:stat2", timeout=5).severity == 2  # MAJOR
    np.testing.assert_allclose(get(pva, "TWIN:ORBIT:TRUE:X"), zero, atol=1e-9)  # as if it were off
    ca_puts(scenario_twin.client_env, [("TWIN:FAULT:CLEAR", "all")])
    settle(pva)
    values = ca_gets(scenario_twin.client_env, ["HS4P1D1R:stat2", "HS4P1D1R:stat1", "HS4P1D1R:rdbk"])
    assert values == {"HS4P1D1R:stat2": 0, "HS4P1D1R:stat1": 1, "HS4P1D1R:rdbk": 0.3}
    np.testing.assert_allclose(get(pva, "TWIN:ORBIT:TRUE:X"), kicked, atol=1e-9)
    ca_puts(scenario_twin.client_env, [("HS4P1D1R:set", 0.0)])


def test_stuck_nan_and_offset_bpms(scenario_twin, pva, clean):
    stuck, nan, offset = BPMS[10], BPMS[20], BPMS[30]
    ca_puts(scenario_twin.client_env, [("TWIN:FAULT:ADD", f"bpm-stuck {stuck}"), ("TWIN:FAULT:ADD", f"bpm-nan {nan}"),
                              ("TWIN:FAULT:ADD", f"bpm-offset {offset} x_um=100 y_um=-50")])
    held = get(pva, f"{stuck}:rdX")
    ca_puts(scenario_twin.client_env, [("HS4P1D1R:set", 0.4)])  # the orbit moves everywhere
    settle(pva)
    names = [f"{b}:rd{p}" for b in (stuck, nan, offset) for p in "XY"] + ["TWIN:ORBIT:TRUE:X", "TWIN:ORBIT:TRUE:Y",
                                                                          "TWIN:ORBIT:X"]
    values = ca_gets(scenario_twin.client_env, names)
    true_x, true_y = np.array(values["TWIN:ORBIT:TRUE:X"]), np.array(values["TWIN:ORBIT:TRUE:Y"])
    i_stuck, i_nan, i_offset = BPMS.index(stuck), BPMS.index(nan), BPMS.index(offset)
    assert abs(true_x[i_stuck] - held) > 1e-3  # the beam moved there by more than a micrometre ...
    assert values[f"{stuck}:rdX"] == held  # ... and the stuck BPM did not see it
    assert math.isnan(values[f"{nan}:rdX"]) and math.isnan(values[f"{nan}:rdY"])
    assert math.isnan(values["TWIN:ORBIT:X"][i_nan])
    assert values[f"{offset}:rdX"] - true_x[i_offset] == pytest.approx(0.100, abs=1e-9)
    assert values[f"{offset}:rdY"] - true_y[i_offset] == pytest.approx(-0.050, abs=1e-9)
    ca_puts(scenario_twin.client_env, [("TWIN:FAULT:CLEAR", "all"), ("HS4P1D1R:set", 0.0)])
    settle(pva)
    assert get(pva, f"{stuck}:rdX") == pytest.approx(get(pva, "TWIN:ORBIT:TRUE:X")[i_stuck], abs=1e-9)


@pytest.mark.parametrize("command", ["explode HS4P1D1R", "trip NOSUCH*", "delay HS4P1D1R seconds=soon",
                                     "modify HS4P1D1R gain=2", "drop"])
def test_a_bad_fault_is_refused_with_the_reason(scenario_twin, pva, command):
    before = get(pva, "TWIN:FAULT:COUNT")
    ca_puts(scenario_twin.client_env, [("TWIN:FAULT:ADD", command)])
    assert get(pva, "TWIN:COMMAND:RESULT").startswith(f"refused {command!r}: ")
    assert get(pva, "TWIN:FAULT:COUNT") == before
    last = list(journal.entries(scenario_twin.state_dir))[-1]
    assert (last["pv"], last["new"], last["outcome"]) == ("TWIN:FAULT:ADD", command, "refused")


def test_a_snapshot_gives_back_every_setpoint_exactly(scenario_twin, pva, clean):
    rng = np.random.default_rng(11)
    converters = {r["name"]: r for r in read_csv(DB / "bessy2" / "converters.csv")}
    changed = [d for d in converters if converters[d]["kind"] in ("hsteerer", "vsteerer")][40:55] + \
        [d for d in converters if converters[d]["kind"] == "quadrupole"][10:15]
    names = [f"{d}:set" for d in changed]
    env = {**os.environ, **scenario_twin.client_env}
    saved = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "snapshot", "save", "before-study"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert saved.returncode == 0 and "saved" in saved.stdout, saved.stdout + saved.stderr
    settle(pva)
    before = ca_gets(scenario_twin.client_env, [*names, "TWIN:BPM:NOISE"])
    orbit = get(pva, "TWIN:ORBIT:TRUE:X")
    study = [(pv, before[pv] + float(rng.uniform(-0.05, 0.05))) for pv in names]
    ca_puts(scenario_twin.client_env, [*study, ("TWIN:BPM:NOISE", 3.0), ("TWIN:FAULT:ADD", "drop Q*")])
    assert ca_gets(scenario_twin.client_env, names) == dict(study)
    ca_puts(scenario_twin.client_env, [("TWIN:SNAPSHOT:RESTORE", "before-study")])  # completes when restored
    assert ca_gets(scenario_twin.client_env, [*names, "TWIN:BPM:NOISE"]) == before
    assert get(pva, "TWIN:FAULT:COUNT") == 0
    settle(pva)
    np.testing.assert_allclose(get(pva, "TWIN:ORBIT:TRUE:X"), orbit, atol=1e-6)  # mm
    assert "before-study" in get(pva, "TWIN:SNAPSHOT:LIST").splitlines()
    missing = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "snapshot", "restore", "no-such"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no snapshot 'no-such'" in missing.stdout


def test_a_snapshot_carries_the_errors_into_a_twin_of_another_seed(tmp_path):
    """Misaligned magnets and miscalibrated BPMs come with the snapshot: the other twin's orbit and
    readings become the first one's."""
    from twinioc.ioc.testing import TwinProcess

    quiet = ["--set", "bpm.noise_um=0", "--set", "converters.ramp=false", "--set", "converters.readback_noise_ppm=0",
             "--set", "beam.lifetime_h=inf", "--set", "orbit_feedback.enabled=false"]
    with TwinProcess("mls", "--seed", "3", *quiet, state_dir=tmp_path / "a") as first:
        ca_puts(first.client_env, [("HS1P1K1RP:setCur", 0.5), ("TWIN:SNAPSHOT:SAVE", "errors")])
        context = first.pva_context()
        settle(context)
        seen = {name: get(context, name) for name in ("TWIN:ORBIT:TRUE:X", "TWIN:ORBIT:X", "TWIN:ORBIT:Y")}
        context.close()
    (tmp_path / "b" / "snapshots").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "snapshots" / "errors.json", tmp_path / "b" / "snapshots")
    with TwinProcess("mls", "--seed", "4", *quiet, state_dir=tmp_path / "b") as second:
        context = second.pva_context()
        assert np.max(np.abs(get(context, "TWIN:ORBIT:TRUE:X") - seen["TWIN:ORBIT:TRUE:X"])) > 1e-3  # mm
        ca_puts(second.client_env, [("TWIN:SNAPSHOT:RESTORE", "errors")])
        settle(context, 5)
        assert get(context, "TWIN:SEED") == 3
        for name, value in seen.items():
            np.testing.assert_allclose(get(context, name), value, rtol=0, atol=1e-7)  # mm
        context.close()
