"""The shadow (``twinioc shadow``) follows a source twin read-only: real processes, real CA.

One ideal MLS twin stands in for the machine; the shadow knows only its address. The calibration
test uses a second source with seeded errors that the shadow is not told.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ca import ca_gets, ca_process, ca_puts
from twinioc.ioc.sentinel import answered
from twinioc.ioc.testing import LOOPBACK, ShadowProcess, TwinProcess, client_env
from twinioc.model.calibration import Calibration
from twinioc.shadow.model import ShadowModel
from twinioc.shadow.serve import SERVED
from twinioc.studies.machine import MachineLayout
from web import empty_catalog

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


def put_and_time(env, own_puts, pv: str, value: float, watched: str, timeout: float = 10.0) -> float:
    """Put *pv* at the source, wait until the shadow's *watched* changes, and return the seconds from
    the moment the put was sent to the shadow server's time stamp of the change (one host, one clock).
    What the client process costs to start and to poll does not count."""
    out = ca_process(env, f"""
import time
import numpy as np
setpoint, watched = epics.PV({pv!r}), epics.PV({watched!r}, form="time")
assert setpoint.wait_for_connection(5) and watched.wait_for_connection(5)
before = np.asarray(watched.get(use_monitor=False), float)
sent = time.time()
assert setpoint.put({value!r}, wait=True, timeout=5) == 1
deadline = time.monotonic() + {timeout}
while time.monotonic() < deadline:
    now = watched.get_with_metadata(use_monitor=False)
    if not np.allclose(np.asarray(now["value"], float), before, rtol=0, atol=1e-12):
        break
    time.sleep(0.01)
else:
    raise SystemExit("no change of {watched} in {timeout} s")
print(now["timestamp"] - sent)
""")
    own_puts.append((pv, float(value)))
    return float(out)


def test_steerer_quadrupole_and_rf_puts_reach_the_model_within_a_second(env, shadow, own_puts):
    for converter, step, watched in ((STEERER, 0.05, "ORBIT:X"), (QUAD, 0.02, "TUNE:X"),
                                     (LAYOUT.rf, 0.001, "ORBIT:X")):
        old = read(env, [converter.setpoint])[converter.setpoint][0]
        new = old + step * (1 if converter.kind != "quadrupole" else old)
        seconds = put_and_time(env, own_puts, converter.setpoint, new, SHADOW + watched)
        print(f"{converter.name}: put at the source -> the shadow's {watched} {seconds * 1e3:.0f} ms")
        assert 0 < seconds < 1.0, (converter.name, seconds)
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
    texts = ca_gets(env, [SHADOW + "MODEL:STATUS", SHADOW + "CALIBRATION", SHADOW + "MODEL:REFUSED"])
    assert texts == {SHADOW + "MODEL:STATUS": "", SHADOW + "CALIBRATION": "none", SHADOW + "MODEL:REFUSED": ""}
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


def test_calibration_from_a_measured_orm_of_a_source_with_errors(tmp_path):
    """A source with seeded errors the shadow is not told (BPM gains of 5 %, misaligned magnets):
    its ORM measured by the measurement service, a calibration fitted from it; the orbit change of
    a steerer the ORM left out is then predicted ≥ 3× better, and the tunes agree within 0.002."""
    errors = ("--set", "bpm.gain_error=0.05", "--set", "converters.ramp=false", "--set", "orbit_feedback.enabled=false")
    new_h, new_v = LAYOUT.steerers("x")[5], LAYOUT.steerers("y")[7]
    steerers = [c.name for c in LAYOUT.steerers() if c not in (new_h, new_v)]
    (tmp_path / "measured" / "tiled").mkdir(parents=True)
    shutil.copyfile(empty_catalog(), tmp_path / "measured" / "tiled" / "catalog.db")  # tiled's init: seconds
    with TwinProcess("mls", *errors, prefix=SOURCE_PREFIX, seed=11, state_dir=tmp_path / "source") as source:
        env = client_env(source)
        done = subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "measure", "orm", "--machine", "mls",
                               "--prefix", SOURCE_PREFIX, "--state-dir", str(tmp_path / "measured"),
                               "--steerers", *steerers],
                              env={**os_environ(), **env}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        (tmp_path / "orm.json").write_text(done.stdout.splitlines()[-1])
        # a BBA record of one plane, as the service gives it: its offset goes to that plane only
        bba_bpm = LAYOUT.orbit.bpms[2]
        (tmp_path / "bba.json").write_text(json.dumps({"kind": "bba", "params": {"planes": ["y"]},
                                                       "result": {"bpm": bba_bpm, "offset_um": [-40.0]}}))
        calibrate = [sys.executable, "-m", "twinioc.ioc.cli", "shadow", "calibrate", "--machine", "mls",
                     "--source-ca-addr", f"{LOOPBACK}:{source.ca_port}", "--orm", str(tmp_path / "orm.json"),
                     "--bba", str(tmp_path / "bba.json"), "--out", str(tmp_path / "calibration.json")]
        done = subprocess.run(calibrate, env={**os_environ(), **env}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        calibration = Calibration.load(tmp_path / "calibration.json", "mls", list(LAYOUT.orbit.bpms),
                                       list(LAYOUT.converters))
        assert calibration.offset_y_mm == {bba_bpm: -0.04} and not calibration.offset_x_mm
        misfit = calibration.provenance["orm"]["misfit_rms_mm_per_A"]
        assert misfit[-1] < misfit[0] / 3, misfit
        for steerer in (new_h, new_v):
            plain, calibrated = step_residuals(env, steerer, calibration)
            print(f"{steerer.name}: residual rms {plain * 1e3:.2f} um plain, {calibrated * 1e3:.2f} um calibrated")
            assert calibrated * 3 <= plain, (steerer.name, plain, calibrated)
        with ShadowProcess(source, "--calibration", str(tmp_path / "calibration.json"),
                           state_dir=tmp_path / "shadow") as follower:
            values = read(client_env(source, follower), [SHADOW + n for n in ("TUNE:RESIDUAL:X", "TUNE:RESIDUAL:Y")])
            assert all(abs(v) < 0.002 for v, _ in values.values()), values


def os_environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}


def step_residuals(env, steerer, calibration: Calibration) -> tuple[float, float]:
    """rms (mm) of measured − predicted orbit change for a step of *steerer*, by the plain and the calibrated model."""
    setpoints = [c.setpoint for c in LAYOUT.converters.values()]
    bpms = [*LAYOUT.orbit.x, *LAYOUT.orbit.y]
    state = read(env, setpoints)
    before = read(env, bpms, samples=10)
    step = 0.3 * (steerer.high - steerer.low) / 20
    origin = state[steerer.setpoint][0]
    ca_puts(env, [(steerer.setpoint, origin + step)])
    time.sleep(1.0)
    after = read(env, bpms, samples=10)
    ca_puts(env, [(steerer.setpoint, origin)])
    measured = np.array([after[pv][0] - before[pv][0] for pv in bpms])
    values = {c.name: float(state[c.setpoint][0]) for c in LAYOUT.converters.values()}
    residuals = []
    for model in (ShadowModel(LAYOUT.tables), ShadowModel(LAYOUT.tables, calibration)):
        model.set(values)
        p0 = model.predict(chromaticity=False)
        model.set({steerer.name: origin + step})
        p1 = model.predict(chromaticity=False)
        predicted = np.concatenate([p1.x_mm - p0.x_mm, p1.y_mm - p0.y_mm])
        assert np.max(np.abs(measured)) > 0.1  # mm: a clear signal
        residuals.append(float(np.sqrt(np.mean((measured - predicted) ** 2))))
    return residuals[0], residuals[1]


def test_a_twin_and_a_shadow_load_the_same_calibration(tmp_path):
    """A twin with a calibration reads and steers as the calibrated machine; a shadow with the same
    file then predicts it exactly. A bad file stops the twin, saying why."""
    bpm = LAYOUT.orbit.bpms[0]
    path = tmp_path / "calibration.json"
    Calibration("mls", gain_x={bpm: 1.1}, offset_y_mm={bpm: 0.05}, converter_scale={STEERER.name: 1.25}).save(path)
    with TwinProcess("mls", "--ideal", "--calibration", str(path), prefix=SOURCE_PREFIX,
                     state_dir=tmp_path / "twin") as twin, \
            ShadowProcess(twin, "--calibration", str(path), state_dir=tmp_path / "shadow") as follower:
        env = client_env(twin, follower)
        names = [*LAYOUT.orbit.x, LAYOUT.orbit.y[0]]
        before = read(env, names)
        ca_puts(env, [(STEERER.setpoint, 0.1)])
        time.sleep(1.0)
        after = read(env, names + [SHADOW + "ORBIT:RESIDUAL:X:RMS", SHADOW + "ORBIT:RESIDUAL:Y:RMS"])
    measured = np.array([after[pv][0] - before[pv][0] for pv in LAYOUT.orbit.x])
    column = ShadowModel(LAYOUT.tables).engine.orbit_response([STEERER.name])[:len(measured), 0] * 1e3 * 0.1
    expected = 1.25 * column * np.where(np.arange(len(column)) == 0, 1.1, 1.0)  # linear: the sextupoles aside
    assert np.corrcoef(measured, expected)[0, 1] > 0.999
    assert np.linalg.norm(measured) / np.linalg.norm(expected) == pytest.approx(1.0, abs=0.02)
    assert before[LAYOUT.orbit.y[0]][0] == pytest.approx(0.05, abs=1e-6)
    assert after[SHADOW + "ORBIT:RESIDUAL:X:RMS"][0] < 1e-6 and after[SHADOW + "ORBIT:RESIDUAL:Y:RMS"][0] < 1e-6
    path.write_text(json.dumps({"format": 1, "machine": "mls", "gain_x": {"NO-SUCH-BPM": 1.0}}))
    twin = TwinProcess("mls", "--ideal", "--calibration", str(path), state_dir=tmp_path / "bad")
    done = subprocess.run(twin.command(), env=os_environ() | twin.server_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "NO-SUCH-BPM" in done.stderr, done.stderr


def test_the_dashboard_compares_the_machine_with_the_shadow(source, tmp_path):
    """``twinioc web --shadow``: the Compare view's model is the shadow's. A calibration that moves one
    BPM's reading by 50 µm in the model shows as exactly that difference there, and nowhere else."""
    import os

    import browser
    from web import WebProcess

    why = browser.missing()
    if why:
        if os.environ.get("TWINIOC_REQUIRE_BROWSER"):
            pytest.fail(f"the browser test must run here (TWINIOC_REQUIRE_BROWSER is set): {why}")
        pytest.skip(why)
    bpm = LAYOUT.orbit.bpms[4]
    Calibration("mls", offset_x_mm={bpm: 0.05}).save(tmp_path / "calibration.json")
    with ShadowProcess(source, "--calibration", str(tmp_path / "calibration.json"),
                       state_dir=tmp_path / "shadow") as follower:
        web = WebProcess("mls", client_env(source, follower), tmp_path / "web", SOURCE_PREFIX, "--shadow", SHADOW)
        web.start()
        driver = browser.chromium()
        try:
            driver.get(web.url)
            browser.click_tab(driver, "Compare")
            traces = browser.wait_for(lambda: [t for t in browser.graph_data(driver, "compare-orbit") or []
                                               if t["name"] == "now − model"], 20)
            assert traces, "no comparison with the shadow's model"
            x = dict(zip(traces[0]["text"], traces[0]["y"], strict=True))
            assert x[bpm] == pytest.approx(-0.05, abs=1e-4)  # mm: the machine reads 50 µm less than the model
            assert max(abs(v) for name, v in x.items() if name != bpm) < 1e-4
            numbers = driver.find_element("id", "compare-numbers").text
            assert "shadow follows the machine" in numbers, numbers
        finally:
            driver.quit()
            web.stop()
