"""The journal of puts, its replay behind a safety envelope, and setpoints that survive kill -9.

These twins are the tests' own (the session's pyepics context belongs to the session's twins): CA
clients run in subprocesses, reads go over PVA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
from ca import wait_for
from conftest import DB
from twinioc.ioc import journal
from twinioc.model.tables import read_csv

STEERERS = [r["name"] for r in read_csv(DB / "bessy2" / "converters.csv") if r["kind"] in ("hsteerer", "vsteerer")]
MAX_STEP = {r["name"]: float(r["max_step"]) for r in read_csv(DB / "bessy2" / "converters.csv") if r["max_step"]}


def setpoints(context, devices) -> dict[str, float]:
    return {d: float(v) for d, v in zip(devices, context.get([f"{d}:set" for d in devices], timeout=5), strict=True)}


def settled_orbit(context) -> np.ndarray:
    """The orbit once the twin has computed after every put: the lattice version stands still
    over a few publications."""
    def version_and_updates():
        return int(context.get("TWIN:LATTICE:VERSION", timeout=5)), int(context.get("TWIN:UPDATES", timeout=5))

    version, updates = version_and_updates()
    wait_for(version_and_updates, lambda vu: vu[1] >= updates + 3)
    assert version_and_updates()[0] == version or wait_for(version_and_updates, lambda vu: vu[1] >= updates + 6)
    return np.concatenate([np.asarray(context.get("TWIN:ORBIT:TRUE:X", timeout=5)),
                           np.asarray(context.get("TWIN:ORBIT:TRUE:Y", timeout=5))])


def twinioc(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


CLIENT = """
import json, sys
for pv, value in json.loads(sys.argv[1]):
    assert epics.caput(pv, value, wait=True, timeout=5) == 1, pv
"""


def put_from_clients(env: dict, per_client: list[list[tuple[str, float]]]) -> None:
    """Each list of puts from its own CA client process, all at once, each put waiting for completion."""
    clients = [subprocess.Popen([sys.executable, "-c", "import epics\n" + CLIENT, json.dumps(puts)],
                                env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
               for puts in per_client]
    for client in clients:
        assert client.wait(timeout=240) == 0, client.stderr.read()


def test_a_thousand_puts_from_four_clients_are_journaled_in_order_and_replay_onto_a_fresh_twin(tmp_path):
    from twinioc.ioc.testing import TwinProcess

    rng = np.random.default_rng(3)
    devices = STEERERS[:20]
    per_client = [[(f"{d}:set", round(float(rng.uniform(-0.5, 0.5)), 6))
                   for d in rng.choice(devices[5 * i:5 * i + 5], 250)] for i in range(4)]
    source_dir = tmp_path / "source"
    # small journal files: the thousand lines cross several rotations
    with TwinProcess("bessy2", "--ideal", "--set", "journal.max_mb=0.05", "--set", "journal.keep=100",
                     state_dir=source_dir) as source:
        put_from_clients(source.client_env, per_client)
        context = source.pva_context()
        final, orbit = setpoints(context, devices), settled_orbit(context)
        context.close()

    lines = [e for e in journal.entries(source_dir) if e["command"] == "set"]
    assert len(lines) == 1000 and len(journal.files(source_dir)) >= 3
    assert [e["seq"] for e in lines] == list(range(lines[0]["seq"], lines[0]["seq"] + 1000))
    assert all(e["outcome"] == "accepted" and e["time"] >= p["time"] for p, e in zip(lines, lines[1:], strict=False))
    assert {e["source"] for e in lines} == {"client"}
    for puts in per_client:  # each client's puts, in the order it made them (its devices are its own)
        mine = {pv for pv, _ in puts}
        assert [(e["pv"], e["new"]) for e in lines if e["pv"] in mine] == puts
    # every put names the lattice version that first carried it, and the lattice journal has it
    carried = {e["version"] for e in journal.entries(source_dir / "lattice.jsonl") if "outputs" in e}
    assert {e["lattice_version"] for e in lines if e["new"] != e["old"]} <= carried
    # the journal's last values are the twin's
    assert {e["device"]: e["new"] for e in lines} == final

    with TwinProcess("bessy2", "--ideal", state_dir=tmp_path / "fresh") as fresh:
        done = twinioc(fresh.client_env, "journal", "replay", str(source_dir))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "sent 1000 of 1000" in done.stdout
        context = fresh.pva_context()
        assert setpoints(context, devices) == final
        replayed = [e for e in journal.entries(tmp_path / "fresh") if e["command"] == "set"]
        assert len(replayed) == 1000 and {e["source"] for e in replayed} == {"replay"}  # the replay said so
        # the same orbit, to a nanometre (mm)
        np.testing.assert_allclose(settled_orbit(context), orbit, rtol=0, atol=1e-6)

        # Onto a target not known as a twin: the envelope holds each steerer to its max_step. The
        # dry-run finds the first step beyond it; without the code nothing is sent; with it, the
        # replay stops before that command.
        dry = twinioc(fresh.client_env, "journal", "replay", str(source_dir), "--any-target", "--dry-run")
        assert dry.returncode == 1, dry.stdout + dry.stderr
        plan = [line.split() for line in dry.stdout.splitlines() if line.startswith("  ")]
        first = next(i for i, words in enumerate(plan) if "REFUSED:" in words)
        device = plan[first][1].removesuffix(":set")
        step = abs(float(plan[first][4]) - float(plan[first][2]))
        assert step > MAX_STEP[device]
        assert all(abs(float(w[4]) - float(w[2])) <= MAX_STEP[w[1].removesuffix(":set")] for w in plan[:first])
        code = dry.stdout.split("confirmation code: ")[1].split()[0]
        refused = twinioc(fresh.client_env, "journal", "replay", str(source_dir), "--any-target")
        assert refused.returncode == 2 and "dry-run" in refused.stderr
        assert setpoints(context, devices) == final
        stopped = twinioc(fresh.client_env, "journal", "replay", str(source_dir), "--any-target", "--confirm", code)
        assert stopped.returncode == 1 and f"sent {first} of 1000" in stopped.stdout, stopped.stdout + stopped.stderr
        assert setpoints(context, [device])[device] != float(plan[first][4])
        # a twin is told by its own PVs: under another prefix there is none, and nothing is sent
        wrong = twinioc(fresh.client_env, "journal", "replay", str(source_dir), "--prefix", "NOTWIN:")
        assert wrong.returncode == 2 and "no twin answers NOTWIN:SEED" in wrong.stderr
        context.close()

    shown = twinioc({}, "journal", "show", str(source_dir), "--device", devices[0])
    assert shown.returncode == 0
    assert len(shown.stdout.splitlines()) == sum(e["device"] == devices[0] for e in lines)


def test_every_acknowledged_setpoint_is_back_after_kill_9(tmp_path):
    from twinioc.ioc.testing import TwinProcess

    state = tmp_path / "state"
    rng = np.random.default_rng(5)
    first = [(f"{d}:set", round(float(rng.uniform(-0.5, 0.5)), 6)) for d in STEERERS[:10]]
    burst = [(f"{d}:set", round(float(rng.uniform(-0.5, 0.5)), 6)) for d in rng.choice(STEERERS[5:25], 200)]
    expected = dict(first) | dict(burst)
    # autosave every second: the first puts reach the autosave file, the burst cannot
    twin = TwinProcess("bessy2", "--ideal", "--set", "autosave.period_s=1", state_dir=state).start()
    try:
        put_from_clients(twin.client_env, [first])
        wait_for(lambda: (state / "bessy2.softsav").exists() and dict(first)[first[-1][0]] ==
                 _autosaved(state / "bessy2.softsav").get(first[-1][0]), bool, timeout=10)
        put_from_clients(twin.client_env, [burst])
    finally:
        twin.stop(signal.SIGKILL)
    assert _autosaved(state / "bessy2.softsav") != {pv: v for pv, v in expected.items()}

    with TwinProcess("bessy2", "--ideal", state_dir=state) as again:
        context = again.pva_context()
        devices = [pv.removesuffix(":set") for pv in expected]
        assert setpoints(context, devices) == {pv.removesuffix(":set"): v for pv, v in expected.items()}
        context.close()
    said = [line for line in again.log().splitlines() if "setpoints restored" in line][-1]
    assert "autosave of" in said and f"of {len(expected)} setpoints" in said


def _autosaved(path) -> dict[str, float]:
    """The setpoints in softioc's autosave file (YAML lines 'PV: value')."""
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition(": ")
        if sep and name.endswith(":set"):
            values[name.strip()] = float(value)
    return values


def test_a_journal_reads_back_across_rotation_and_skips_a_line_cut_by_a_crash(tmp_path):
    log = journal.Journal(tmp_path / "journal.jsonl", max_bytes=2000, keep=3)
    for i in range(100):
        log.append({"command": "set", "device": "HS1", "new": float(i), "outcome": "accepted"})
    log.close()
    with (tmp_path / "journal.jsonl").open("a") as f:
        f.write('{"seq": 101, "time": "2026-')  # what kill -9 in the middle of a write leaves
    kept = list(journal.entries(tmp_path))
    assert len(journal.files(tmp_path)) == 4  # the current file and three rotated ones
    assert [e["seq"] for e in kept] == list(range(kept[0]["seq"], 101)) and kept[0]["seq"] > 1
    assert journal.setpoints_since(tmp_path, None)[0] == {"HS1": 99.0}
    assert journal.Journal(tmp_path / "journal.jsonl").seq == 100  # numbering goes on after a restart
    nan = journal.Journal(tmp_path / "other.jsonl").append({"new": float("nan")})
    assert nan["new"] == "nan"


def test_the_envelope_refuses_by_limits_and_step_and_paces_the_commands():
    from datetime import UTC, datetime, timedelta

    from twinioc.ioc.config import Config
    from twinioc.ioc.replay import Command, Envelope, plan, schedule

    envelope = Envelope.for_machine(Config.for_machine("bessy2"), {
        "max_rate_hz": 2.0, "limits": {"HS4P1D1R": [-0.2, 0.2]}, "max_step": {"quadrupole": 0.5, "HS*": 9.0}})
    start = datetime(2026, 11, 21, tzinfo=UTC)

    def command(seq, seconds, device, value):
        return Command(seq, start + timedelta(seconds=seconds), device, f"{device}:set", value)

    q1 = 216.0
    journal_ = [command(1, 0.0, "HS4P1D1R", 0.05), command(2, 0.1, "HS4P1D1R", 0.3),
                command(3, 5.0, "Q1PDR", q1 + 0.6), command(4, 5.0, "Q1PDR", q1 + 0.4),
                command(5, 6.0, "HS4P1D1R", 0.05 + MAX_STEP["HS4P1D1R"] * 1.01), command(6, 7.0, "NOSUCH", 1.0)]
    verdicts = plan(journal_, envelope, {"HS4P1D1R": 0.0, "Q1PDR": q1})
    assert [v.refusal is None for v in verdicts] == [True, False, False, True, False, False]
    assert "outside [-0.2, 0.2]" in verdicts[1].refusal  # narrowed from the table's ±1 A
    assert "step 0.6" in verdicts[2].refusal  # the quadrupoles' 2 A of the startup file, narrowed
    assert verdicts[4].before == 0.05 and "maximum step" in verdicts[4].refusal  # the steerer's own, not 9 A
    assert "not a converter" in verdicts[5].refusal
    # the journal's spacing (speed 1) or none (speed 0), never faster than 2 a second
    assert schedule(journal_[:3], 1.0, 2.0) == [0.0, 0.5, 5.0]
    assert schedule(journal_[:3], 0.0, 2.0) == [0.0, 0.5, 1.0]
