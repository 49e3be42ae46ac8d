"""The twin keeps serving when its physics worker dies, and refuses to start on what it cannot serve.

Over real CA and PVA against the real IOC process: ``kill -9`` of the physics worker while a client
keeps putting setpoints; a worker that cannot start at all; a PV table with an unknown signal; an
unknown setting; and what a first start says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ca import ca_gets, ca_puts, wait_for
from conftest import DB
from physics import relative_error
from twinioc.ioc import journal
from twinioc.model import Change, Engine
from twinioc.model.tables import MachineTables

STEERERS = [c.name for c in MachineTables(DB / "bessy2").converters.values() if c.kind in ("hsteerer", "vsteerer")]

# Puts steerers until told to stop (a file appears), each with completion, and writes down every
# acknowledged one; a put that is not acknowledged ends it with status 2.
PUTTER = """
import epics, json, os, random, sys, time
acked, stop, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rng = random.Random(7)
with open(acked, "a") as out:
    while not os.path.exists(stop):
        name, value = rng.choice(names), round(rng.uniform(-0.05, 0.05), 6)
        if epics.caput(name + ":set", value, wait=True, timeout=5) != 1:
            sys.exit(2)
        out.write(json.dumps([name, value]) + "\\n")
        out.flush()
        time.sleep(0.005)
"""


def acknowledged(path: Path) -> dict[str, float]:
    last = {}
    for line in path.read_text().splitlines():
        name, value = json.loads(line)
        last[name] = value
    return last


def test_kill_9_of_the_physics_worker_while_a_client_puts(tmp_path):
    from twinioc.ioc.testing import TwinProcess

    acked, stop = tmp_path / "acked.jsonl", tmp_path / "stop"
    with TwinProcess("bessy2", "--ideal", state_dir=tmp_path / "state") as twin:
        context = twin.pva_context()
        seen: list[tuple[float, int]] = []  # (when, severity) of each orbit update
        subscription = context.monitor("ORBITCC:rdPos", lambda value: seen.append((time.monotonic(), value.severity)))
        client = subprocess.Popen([sys.executable, "-c", PUTTER, str(acked), str(stop), json.dumps(STEERERS[:30])],
                                  env={**os.environ, **twin.client_env})
        try:
            wait_for(lambda: len(acked.read_text().splitlines()) if acked.exists() else 0, lambda n: n >= 50)
            killed = time.monotonic()
            os.kill(twin.worker_pid(), signal.SIGKILL)
            invalid = wait_for(lambda: [t for t, severity in seen if t > killed and severity == 3], bool, timeout=5)
            served = ca_gets(twin.client_env, ["TUNEZR:rdH", "TWIN:PHYSICS:RESTARTS", "TWIN:PHYSICS:STATUS"])
            valid = wait_for(lambda: [t for t, severity in seen if invalid and t > invalid[0] and severity == 0],
                             bool, timeout=15)
        finally:
            stop.touch()
            assert client.wait(timeout=30) == 0
            subscription.close()
        assert invalid[0] - killed < 0.2  # s: the readings are marked at the first tick after the death
        assert served["TUNEZR:rdH"] is not None and served["TWIN:PHYSICS:RESTARTS"] == 1
        assert served["TWIN:PHYSICS:STATUS"].startswith("restarting: the worker process ended (killed by signal 9)")
        assert valid[0] - killed < 10.0
        assert_every_setpoint_in_force(twin, context, acknowledged(acked))
        context.close()
    log = twin.log()
    assert "physics: the worker process ended (killed by signal 9) (pid " in log
    assert "physics: a new worker is ready (pid " in log and log.count("starting another worker") == 1
    assert [e.get("event") for e in journal.entries(twin.state_dir / "lattice.jsonl")].count("restart") == 1


def settle(context, ticks: int = 4) -> None:
    updates = int(context.get("TWIN:UPDATES", timeout=5))
    wait_for(lambda: int(context.get("TWIN:UPDATES", timeout=5)), lambda u: u >= updates + ticks)


def assert_every_setpoint_in_force(twin, context, last: dict[str, float]) -> None:
    """Every acknowledged setpoint is at its converter, the orbit is the model's for them, and a
    steerer put moves the orbit along its response."""
    settle(context)
    names = [f"{d}:{suffix}" for d in last for suffix in ("set", "rdbk")]
    values = ca_gets(twin.client_env, [*names, "TWIN:PHYSICS:RESTARTS", "TWIN:ORBIT:TRUE:X"])
    assert {d: (values[f"{d}:set"], values[f"{d}:rdbk"]) for d in last} == {d: (v, v) for d, v in last.items()}
    assert values["TWIN:PHYSICS:RESTARTS"] == 1
    model = Engine.from_folder(DB / "bessy2")
    model.apply([Change(d, "current", v) for d, v in last.items()])
    np.testing.assert_allclose(values["TWIN:ORBIT:TRUE:X"], model.compute().x * 1e3, rtol=0, atol=1e-6)  # mm
    steerer = next(d for d in STEERERS if d.startswith("HS") and d not in last)
    ca_puts(twin.client_env, [(f"{steerer}:set", 0.2)])
    settle(context)
    moved = np.asarray(context.get("TWIN:ORBIT:TRUE:X", timeout=5)) - np.asarray(values["TWIN:ORBIT:TRUE:X"])
    model.apply([Change(steerer, "current", 0.2)])
    assert relative_error(moved, model.compute().x * 1e3 - np.asarray(values["TWIN:ORBIT:TRUE:X"])) < 1e-3


def start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Start ``twinioc`` as a user would, on loopback ports of its own, and wait until it exits."""
    from twinioc.ioc.testing import TwinProcess

    ports = TwinProcess("mls", state_dir=tmp_path / "state")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")} | ports.server_env
    return subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", "--state-dir", str(tmp_path / "state"), *args],
                          env=env, capture_output=True, text=True, timeout=120)


def machine_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the MLS tables and a startup file that uses them."""
    tables = tmp_path / "tables"
    shutil.copytree(DB / "mls", tables)
    config = tmp_path / "mls.toml"
    config.write_text(f'machine = "MLS"\ntables = "{tables}"\n')
    return tables, config


def test_a_worker_that_cannot_start_ends_the_twin_with_the_reason(tmp_path):
    tables, config = machine_copy(tmp_path)
    text = (tables / "magnets.csv").read_text()  # a property only the model reads: the IOC takes the table
    row = "Q1M1K1RP,Q1M1K1RP,Q1P1K1RP,"
    (tables / "magnets.csv").write_text(text.replace(row + "K1,", row + "K9,"))
    done = start(tmp_path, "--config", str(config))
    assert done.returncode != 0
    assert ("twinioc: physics: the worker could not start: ValueError: magnets.csv: Q1M1K1RP: unknown property K9"
            in done.stderr), done.stderr


def test_an_unreadable_lattice_is_refused_at_start_naming_the_file(tmp_path):
    tables, config = machine_copy(tmp_path)
    (tables / "lattice.json").write_text('{"name": "MLS", "elements": [')
    done = start(tmp_path, "--config", str(config))
    assert done.returncode != 0
    assert f"twinioc: {tables / 'lattice.json'}: JSONDecodeError" in done.stderr, done.stderr


def test_a_table_row_with_an_unknown_signal_is_refused_at_start_naming_the_row(tmp_path):
    tables, config = machine_copy(tmp_path)
    text = (tables / "pvs.csv").read_text()
    (tables / "pvs.csv").write_text(text.replace("TUNEZRP:measX,ai,,tune_h_khz,", "TUNEZRP:measX,ai,,tune_h_khzz,"))
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if row.startswith("TUNEZRP:measX,"))
    done = start(tmp_path, "--config", str(config))
    assert done.returncode != 0
    assert f"pvs.csv line {line} (TUNEZRP:measX): unknown signal 'tune_h_khzz' (known: " in done.stderr, done.stderr


@pytest.mark.parametrize("where", ["command line", "startup file"])
def test_an_unknown_setting_is_refused_at_start_with_the_known_keys(tmp_path, where):
    _, config = machine_copy(tmp_path)
    if where == "startup file":
        config.write_text(config.read_text() + '[begin]\nstate = "x"\n')
        done = start(tmp_path, "--config", str(config))
    else:
        done = start(tmp_path, "--machine", "mls", "--set", "begin.state=x")
    assert done.returncode != 0
    assert "twinioc: bad setting: no setting 'begin' (known: machine, tables, prefix, rate_hz, seed" in done.stderr


def test_a_first_start_says_only_what_the_twin_has_to_say(bessy2_ioc, mls_ioc):
    for twin in (bessy2_ioc, mls_ioc):  # both started on empty state folders
        log = twin.log().split(" twin serving ", 1)[0]  # up to the line that says it serves
        assert "no saved setpoints: starting from the defaults" in log
        for noise in ("Could not", "autosave", "matplotlib", "Traceback", "WARNING", "ERROR"):
            assert noise not in log.replace("autosave in ", ""), (noise, log)


def test_restarts_that_keep_failing_end_the_twin_with_a_non_zero_status(tmp_path):
    from twinioc.ioc.testing import TwinProcess

    tables, config = machine_copy(tmp_path)
    twin = TwinProcess("mls", "--ideal", config=config, state_dir=tmp_path / "state").start()
    try:
        (tables / "lattice.json").write_text("{")  # every new worker fails to load it
        os.kill(twin.worker_pid(), signal.SIGKILL)
        assert twin.process.wait(timeout=60) == 3
    finally:
        twin.stop()
    assert ("stopping the twin: physics: 3 new workers in a row did not come up; the last: the worker could not "
            "start: JSONDecodeError") in twin.log(), twin.log()


EQUILIBRIUM = ["TWIN:LATTICE:VERSION", "TWIN:EMITTANCE:VERSION", "TWIN:EQUILIBRIUM:STATUS", "TWIN:EMITTANCE:X"]


def test_a_killed_equilibrium_worker_is_replaced_and_computes_the_newest_lattice(tmp_path):
    from twinioc.ioc.testing import TwinProcess

    with TwinProcess("mls", "--ideal", state_dir=tmp_path / "state") as twin:
        first = wait_for(lambda: ca_gets(twin.client_env, EQUILIBRIUM), lambda v: v["TWIN:EMITTANCE:VERSION"] > 0)
        old = twin.equilibrium_pid()
        os.kill(old, signal.SIGKILL)
        quadrupole = ca_gets(twin.client_env, ["Q1P1K1RP:setCur"])["Q1P1K1RP:setCur"]
        ca_puts(twin.client_env, [("Q1P1K1RP:setCur", 1.02 * quadrupole)])

        def caught_up(v: dict) -> bool:  # the equilibrium of the lattice after the put
            return v["TWIN:EMITTANCE:VERSION"] == v["TWIN:LATTICE:VERSION"] > first["TWIN:LATTICE:VERSION"]

        now = wait_for(lambda: ca_gets(twin.client_env, EQUILIBRIUM), caught_up, timeout=30)
        assert caught_up(now)
        status = now["TWIN:EQUILIBRIUM:STATUS"]
        assert status.startswith("running (pid ") and str(old) not in status
        assert now["TWIN:EMITTANCE:X"] != first["TWIN:EMITTANCE:X"]  # the stronger quadrupole's optics
    assert f"equilibrium: the process ended (exit status -9) (pid {old}); starting another process" in twin.log()


def test_without_the_equilibrium_its_readings_are_invalid_and_the_gas_lifetime_alone_counts(tmp_path):
    from twinioc.ioc.testing import TwinProcess

    with TwinProcess("mls", "--set=equilibrium.enabled=false", state_dir=tmp_path / "state") as twin:
        values = ca_gets(twin.client_env, ["TWIN:EMITTANCE:X.SEVR", "QPD01ZL2RP:rdSigmaX.SEVR", "TWIN:LIFETIME",
                                           "TWIN:LIFETIME:SOURCE", "TWIN:EQUILIBRIUM:STATUS"])
    assert values["TWIN:EMITTANCE:X.SEVR"] == 3 and values["QPD01ZL2RP:rdSigmaX.SEVR"] == 3  # INVALID
    assert values["TWIN:LIFETIME"] == pytest.approx(20.0)  # the MLS's gas lifetime
    assert values["TWIN:LIFETIME:SOURCE"].startswith("gas scattering 20 h alone")
    assert values["TWIN:EQUILIBRIUM:STATUS"] == "none"
