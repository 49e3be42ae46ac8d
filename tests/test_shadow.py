"""The shadow (``twinioc shadow``) follows a source twin read-only: real processes, real CA.

One ideal MLS twin stands in for the machine; the shadow knows only its address. The calibration
test uses a second source with seeded errors that the shadow is not told.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ca import ca_process, ca_puts
from twinioc.ioc.sentinel import answered
from twinioc.ioc.testing import LOOPBACK, ShadowProcess, TwinProcess, client_env
from twinioc.shadow.model import ShadowModel
from twinioc.shadow.serve import SERVED
from twinioc.studies.machine import MachineLayout

SOURCE_PREFIX = "SRC:"
SHADOW = "SHADOW:"
LAYOUT = MachineLayout.load("mls")
STEERER, QUAD = LAYOUT.steerers("x")[3], LAYOUT.of_kind("quadrupole")[5]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    twin = TwinProcess("mls", "--ideal", prefix=SOURCE_PREFIX, state_dir=tmp_path_factory.mktemp("source"))
    twin.start()
    yield twin
    twin.stop()


@pytest.fixture(scope="module")
def shadow(source, tmp_path_factory):
    follower = ShadowProcess(source, state_dir=tmp_path_factory.mktemp("shadow")).start()
    yield follower
    follower.stop()
    assert "Traceback" not in follower.log(), follower.log()


@pytest.fixture(scope="module")
def env(source, shadow):
    return client_env(source, shadow)


@pytest.fixture(scope="module")
def own_puts():
    return []  # every put this module makes on the source, to compare with its journal


def put(env, own_puts, pv, value):
    ca_puts(env, [(pv, value)])
    own_puts.append((pv, float(value)))


def read(env, names: list[str], samples: int = 1) -> dict[str, object]:
    """Each PV's value (the mean of *samples* reads 0.1 s apart), its severity and time stamp."""
    out = ca_process(env, f"""
import json, time
import numpy as np
names = json.loads({json.dumps(json.dumps(names))})
pvs = [epics.PV(n, form="time") for n in names]
for pv in pvs:
    pv.wait_for_connection(5)
sums = {{}}
for i in range({samples}):
    for pv in pvs:
        v = np.asarray(pv.get(use_monitor=False, timeout=5), float)
        sums[pv.pvname] = sums.get(pv.pvname, 0) + v / {samples}
    time.sleep(0.1)
print(json.dumps({{pv.pvname: [np.atleast_1d(sums[pv.pvname]).tolist(), pv.severity] for pv in pvs}}))
""")
    return {name: (np.array(v) if len(v) > 1 else v[0], severity) for name, (v, severity) in json.loads(out).items()}


def wait_for_change(env, name: str, before, timeout: float = 5.0) -> float:
    """Seconds until *name* differs from *before* (polled in one fresh process)."""
    out = ca_process(env, f"""
import time
import numpy as np
pv = epics.PV({name!r}); pv.wait_for_connection(5)
start, before = time.monotonic(), np.asarray({json.dumps(np.asarray(before).tolist())})
while time.monotonic() - start < {timeout}:
    if not np.allclose(np.asarray(pv.get(use_monitor=False), float), before, rtol=0, atol=1e-12):
        break
    time.sleep(0.01)
print(time.monotonic() - start)
""")
    return float(out)


def test_the_source_code_cannot_put():
    """Read-only by construction: the module that talks to the source names no put of any client."""
    text = (Path(__file__).parents[1] / "shadow" / "source.py").read_text()
    names = {node.id for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Name)}
    names |= {alias.name for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ImportFrom)
              for alias in node.names}
    assert not [n for n in names if "put" in n.lower()], names
    for module in (Path(__file__).parents[1] / "shadow").glob("*.py"):
        assert "caput" not in module.read_text() and ".put(" not in module.read_text(), module


def test_steerer_quadrupole_and_rf_puts_reach_the_model_within_a_second(env, shadow, own_puts):
    for converter, step, watched in ((STEERER, 0.05, "ORBIT:X"), (QUAD, 0.02, "TUNE:X"),
                                     (LAYOUT.rf, 0.001, "ORBIT:X")):
        before = read(env, [SHADOW + watched, converter.setpoint])
        old = before[converter.setpoint][0]
        t0 = time.monotonic()
        put(env, own_puts, converter.setpoint, old + step * (1 if converter.kind != "quadrupole" else old))
        seconds = wait_for_change(env, SHADOW + watched, before[SHADOW + watched][0]) + time.monotonic() - t0
        # the time of the put's process start counts against the shadow too: a loose upper bound
        assert seconds < 1.0 + 0.6, (converter.name, seconds)
        put(env, own_puts, converter.setpoint, old)


def test_predicted_orbit_change_matches_the_measured_one(env, shadow, own_puts):
    names = [SHADOW + "ORBIT:X", SHADOW + "ORBIT:MEASURED:X", SHADOW + "MODEL:VERSION"]
    before = read(env, names)
    old = read(env, [STEERER.setpoint])[STEERER.setpoint][0]
    put(env, own_puts, STEERER.setpoint, old + 0.1)
    wait_for_change(env, SHADOW + "ORBIT:MEASURED:X", before[names[1]][0])
    time.sleep(0.5)
    after = read(env, names)
    put(env, own_puts, STEERER.setpoint, old)
    predicted, measured = after[names[0]][0] - before[names[0]][0], after[names[1]][0] - before[names[1]][0]
    assert np.max(np.abs(measured)) > 0.05  # mm: the step moved the beam
    assert np.corrcoef(predicted, measured)[0, 1] > 0.99
    assert abs(np.linalg.norm(predicted) / np.linalg.norm(measured) - 1) < 0.02
    # and what the shadow predicts is what pyAT says for that kick (not just the source's echo)
    model = ShadowModel(LAYOUT.tables)
    column = model.engine.orbit_response([STEERER.name])[:len(LAYOUT.orbit.bpms), 0] * 1e3 * 0.1
    assert np.corrcoef(column, predicted)[0, 1] > 0.99


def test_the_shadow_serves_its_names_only(env, source, shadow):
    own = [SHADOW + s.suffix for s in SERVED]
    assert answered(own, [(LOOPBACK, shadow.ca_port)], 1.0).keys() == set(own)
    assert not answered(own, [(LOOPBACK, source.ca_port)], 1.0)
    theirs = [c.setpoint for c in LAYOUT.converters.values()] + [source.pv("SEED")]
    assert not answered(theirs, [(LOOPBACK, shadow.ca_port)], 1.0)
    values = read(env, [SHADOW + "SOURCE:CONNECTED", SHADOW + "SOURCE:LAG", SHADOW + "SOURCE:UNANSWERED:COUNT",
                        SHADOW + "EMITTANCE:X", SHADOW + "CHROM:X", SHADOW + "TUNE:RESIDUAL:X"])
    assert values[SHADOW + "SOURCE:CONNECTED"][0] == 1 and values[SHADOW + "SOURCE:UNANSWERED:COUNT"][0] == 0
    assert 0 <= values[SHADOW + "SOURCE:LAG"][0] < 1.0
    assert abs(values[SHADOW + "TUNE:RESIDUAL:X"][0]) < 1e-6  # an ideal source: the model's own tunes
    model = ShadowModel(LAYOUT.tables)
    assert values[SHADOW + "CHROM:X"][0] == pytest.approx(model.predict().chromaticity[0], abs=0.05)
    assert 10 < values[SHADOW + "EMITTANCE:X"][0] < 1000  # nm; against pyAT's envelope in test_model_*


def test_a_shadow_refuses_names_that_the_source_serves(shadow, tmp_path):
    """A second shadow with the same prefix, following the first: its names exist there, it refuses."""
    second = ShadowProcess(shadow, state_dir=tmp_path)
    done = subprocess.run(second.command(), env={**second.server_env}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "refusing to serve" in done.stderr, done.stderr


def test_a_journal_of_1000_puts_replays_to_the_source_state(env, source, own_puts, tmp_path):
    rng = np.random.default_rng(1)
    steerers = LAYOUT.steerers()
    values = read(env, [c.setpoint for c in steerers])
    puts = [(c.setpoint, round(float(values[c.setpoint][0] + rng.normal(0, 0.02)), 6))
            for c in (steerers[i] for i in rng.integers(0, len(steerers), 1000))]
    ca_puts(env, puts)
    own_puts.extend(puts)
    time.sleep(1.0)
    out = tmp_path / "predicted.jsonl"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "shadow", "replay", "--machine", "mls",
                           str(source.state_dir / "journal.jsonl"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    print(f"replay of the journal ({len(own_puts)} puts): {seconds:.1f} s with the start; {done.stderr.strip()}")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"replayed {len(own_puts)} values" in done.stderr  # puts of the same millisecond: one prediction
    assert len({line["time"] for line in lines}) == len(lines) > 100
    measured = read(env, [SHADOW + "ORBIT:MEASURED:X", SHADOW + "ORBIT:MEASURED:Y"])
    assert np.allclose(lines[-1]["orbit_x_mm"], measured[SHADOW + "ORBIT:MEASURED:X"][0], atol=1e-6)
    assert np.allclose(lines[-1]["orbit_y_mm"], measured[SHADOW + "ORBIT:MEASURED:Y"][0], atol=1e-6)


def test_an_archive_export_replays_with_residuals(tmp_path):
    bpm_x, tune = LAYOUT.orbit.x[0], LAYOUT.optional("tune_h_khz")
    model = ShadowModel(LAYOUT.tables)
    revolution = model.predict().revolution_khz
    export = tmp_path / "export.csv"
    export.write_text(f"time,PV,value\n2026-12-01T10:00:00+00:00,{STEERER.setpoint},0.1\n"
                      f"2026-12-01T10:00:01+00:00,{bpm_x},0.25\n2026-12-01T10:00:01+00:00,{tune},{0.2 * revolution}\n"
                      "2026-12-01T10:00:02+00:00,NOT:A:PV,1\n")
    done = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "shadow", "replay", "--machine", "mls",
                           str(export)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3 and "NOT:A:PV" in done.stderr
    model.set({STEERER.name: 0.1})
    expected = model.predict()
    assert lines[1]["tune_residual"][0] == pytest.approx(0.2 - expected.tune[0], abs=1e-9)
    assert lines[1]["orbit_residual_rms_mm"][0] == pytest.approx(abs(0.25 - expected.x_mm[0]), rel=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,PV,value\nyesterday,X,1\n")
    done = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "shadow", "replay", "--machine", "mls", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "bad.csv:2" in done.stderr


def test_source_journal_holds_no_put_of_the_shadow(source, shadow, own_puts):
    entries = [json.loads(line) for line in (source.state_dir / "journal.jsonl").read_text().splitlines()]
    from_clients = [(e["pv"], float(e["new"])) for e in entries if e.get("source") == "client"]
    assert from_clients == own_puts


def test_source_gone_and_back(env, source, shadow):
    """Last: the source stops; the shadow says so within 5 s, keeps serving, and follows it again."""
    source.stop()
    t0 = time.monotonic()
    out = ca_process(env, f"""
import time
pv = epics.PV({SHADOW + 'SOURCE:CONNECTED'!r}); orbit = epics.PV({SHADOW + 'ORBIT:X'!r}, form="time")
t0 = time.monotonic()
while time.monotonic() - t0 < 10:
    if pv.get(use_monitor=False) == 0 and orbit.get_with_metadata(use_monitor=False)["severity"] == 3:
        break
    time.sleep(0.05)
print(time.monotonic() - t0)
""")
    assert float(out) + 0 < 5.0, out
    assert shadow.process.poll() is None
    source.start()
    values = read(env, [SHADOW + "SOURCE:CONNECTED"])
    deadline = time.monotonic() + 20
    while values[SHADOW + "SOURCE:CONNECTED"][0] != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        values = read(env, [SHADOW + "SOURCE:CONNECTED", SHADOW + "ORBIT:X"])
    assert values[SHADOW + "SOURCE:CONNECTED"][0] == 1, time.monotonic() - t0
    assert read(env, [SHADOW + "ORBIT:X"])[SHADOW + "ORBIT:X"][1] == 0  # valid again
