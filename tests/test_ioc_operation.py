"""Twins that start as rings in operation, and the rings' slow orbit feedback, over PVA and CA.

Each machine's default twin (every imperfection of its startup file on) starts with its orbit
corrected to the reference and its tunes on the working point: the tunes of the public lattice as
pyAT's own linear optics give them. Its feedback then holds the orbit against a client's kick, and
switched off it leaves the kick alone. The journal says who made each entry.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from ca import ca_puts, wait_for
from conftest import DB, MLS_PREFIX
from twinioc.ioc.testing import TwinProcess
from twinioc.model import Engine
from twinioc.model.lattice_io import load_lattice

# machine -> (a steerer's setpoint, the kick the acceptance names in A, the feedback's switch)
KICKS = {"bessy2": ("HS4P2D1R:set", 0.3, "TWIN:ORBIT:FEEDBACK"),
         "mls": ("HS1P1K1RP:setCur", 0.4, "ORBITCCP:selRunMode")}
READINGS_RMS_MM = 0.05


def get(pva, name):
    value = pva.get(name, timeout=5)
    if isinstance(value, str):
        return value[:]
    return np.asarray(value) if np.ndim(value) else float(value)


def rms(values) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def readings_rms(pva) -> tuple[float, float]:
    return rms(get(pva, "TWIN:ORBIT:X")), rms(get(pva, "TWIN:ORBIT:Y"))


def journal(twin) -> list[dict]:
    return [json.loads(line) for line in (twin.state_dir / "journal.jsonl").read_text().splitlines()]


def working_point(machine: str) -> np.ndarray:
    """The fractional tunes of the machine's lattice without errors, from pyAT's linear optics."""
    ring = load_lattice(DB / machine / "lattice.json").disable_6d(copy=True)
    return np.asarray(ring.get_tune(), dtype=float)


@pytest.fixture(scope="module", params=sorted(KICKS))
def operating(request, tmp_path_factory):
    with TwinProcess(request.param, state_dir=tmp_path_factory.mktemp(f"operation-{request.param}")) as twin:
        twin.pva = twin.pva_context()
        yield twin
        twin.pva.close()


def test_a_twin_in_operation_starts_with_its_orbit_and_tunes_corrected(operating):
    pva = operating.pva
    x, y = readings_rms(pva)
    assert x < READINGS_RMS_MM and y < READINGS_RMS_MM
    tunes = np.array([get(pva, "TWIN:TUNE:X"), get(pva, "TWIN:TUNE:Y")])
    np.testing.assert_allclose(tunes, working_point(operating.machine), atol=0.002)
    true = [rms(get(pva, f"TWIN:ORBIT:TRUE:{plane}")) for plane in "XY"]
    assert min(true) > 0.005  # mm: the errors are there, behind the correctors
    start = journal(operating)[0]
    assert (start["command"], start["source"], start["outcome"]) == ("start", "start", "accepted")
    steerer = KICKS[operating.machine][0].split(":")[0]
    assert steerer in start["setpoints"] and any(name.startswith("Q3P") for name in start["setpoints"])
    trimmed_since = 1e-3  # A: the feedback trims the noise away meanwhile
    assert get(pva, KICKS[operating.machine][0]) == pytest.approx(start["setpoints"][steerer], abs=trimmed_since)


def test_the_feedback_corrects_a_kick_and_journals_its_puts(operating):
    pva, (setpoint, kick, _) = operating.pva, KICKS[operating.machine]
    seq = len(journal(operating))
    pva.put(setpoint, get(pva, setpoint) + kick)
    time.sleep(1.5)
    assert max(readings_rms(pva)) > 0.1  # the kick shows before the feedback takes it out
    wait_for(lambda: readings_rms(pva), lambda r: max(r) < READINGS_RMS_MM, timeout=30)
    entries = journal(operating)[seq:]
    assert entries[0]["source"] == "client" and entries[0]["pv"] == setpoint
    corrections = [e for e in entries if e["source"] == "orbit feedback"]
    assert corrections and all(e["command"] == "correct" and e["setpoints"] for e in corrections)
    if operating.machine == "mls":
        assert get(pva, "RMC00VP") == 1.0


def test_switched_off_the_feedback_leaves_a_kick_and_puts_nothing(operating):
    pva, (setpoint, kick, switch) = operating.pva, KICKS[operating.machine]
    pva.put(switch, 0)
    time.sleep(1.2)
    seq = len(journal(operating))
    before = get(pva, setpoint)
    pva.put(setpoint, before + kick)
    time.sleep(4)
    assert max(readings_rms(pva)) > 0.1 and get(pva, setpoint) == pytest.approx(before + kick)
    assert not [e for e in journal(operating)[seq:] if e["source"] == "orbit feedback"]
    assert "off" in get(pva, "TWIN:ORBIT:FEEDBACK:STATUS")
    if operating.machine == "mls":
        assert get(pva, "RMC00VP") == 0.0
    pva.put(switch, 1)  # a tool restores the run mode it found: the feedback takes the kick out again
    wait_for(lambda: readings_rms(pva), lambda r: max(r) < READINGS_RMS_MM, timeout=30)


def test_the_reference_orbit_is_where_the_feedback_steers(operating):
    """The reference moved by an orbit the steerers can make (the design response of one steerer,
    0.2 mm at its peak): the feedback brings the readings there, to within a fifth of the move."""
    pva, machine = operating.pva, operating.machine
    switch = KICKS[machine][2]
    pva.put(switch, 1)  # on (the tests before may have left it off)
    engine = Engine.from_folder(DB / machine)
    horizontal = engine.devices.of_kind("hsteerer")
    steerer = horizontal[len(horizontal) // 2].name
    before = get(pva, "TWIN:ORBIT:X")
    column = engine.orbit_response([steerer])[:len(before), 0]
    move = column * 0.2 / np.max(np.abs(column))  # mm
    reference = before + move  # where the readings are now, and whatever the feedback still takes out
    pva.put("TWIN:ORBIT:REFERENCE:X", reference)
    try:
        wait_for(lambda: get(pva, "TWIN:ORBIT:X"), lambda x: rms(x - reference) < rms(move) / 5, timeout=30)
    finally:
        pva.put("TWIN:ORBIT:REFERENCE:X", np.zeros(len(before)))
    with pytest.raises(Exception):  # noqa: B017 - a wrong length is refused
        pva.put("TWIN:ORBIT:REFERENCE:X", np.zeros(len(before) - 1))
    np.testing.assert_array_equal(get(pva, "TWIN:ORBIT:REFERENCE:X"), np.zeros(len(before)))


def test_a_restart_keeps_the_start_state_and_the_same_seed_gives_the_same(tmp_path):
    still = "--set=orbit_feedback.enabled=false"  # nothing trims the start's setpoints meanwhile
    with TwinProcess("mls", still, state_dir=tmp_path / "a") as first:
        start = journal(first)[0]
    with TwinProcess("mls", still, state_dir=tmp_path / "a") as again:
        pva = again.pva_context()
        for name, value in start["setpoints"].items():
            assert get(pva, f"{name}:setCur") == pytest.approx(value, abs=1e-9), name
        pva.close()
        assert [e["source"] for e in journal(again)].count("start") == 1  # not corrected again
    with TwinProcess("mls", state_dir=tmp_path / "b") as other:
        assert journal(other)[0]["setpoints"] == start["setpoints"]


def test_a_twin_in_commissioning_starts_with_the_orbit_its_errors_make(tmp_path):
    # the feedback off too: it would start correcting within a second, before the readings are read
    with TwinProcess("bessy2", "--set=start.state=commissioning", "--set=orbit_feedback.enabled=false",
                     state_dir=tmp_path) as twin:
        pva = twin.pva_context()
        assert min(readings_rms(pva)) > 0.5  # mm: BESSY II's errors leave 1.3 mm rms
        pva.close()
        assert not [e for e in journal(twin) if e["source"] == "start"]


def test_the_optics_table_selector_and_the_optics_mode_agree_both_ways(mls_ioc):
    states = ["injection", "user", "ssmb", "low_emittance", "low_alpha"]  # the selector's index order
    env = mls_ioc.client_env
    mode = f"{MLS_PREFIX}OPTICS:MODE"
    try:
        ca_puts(env, [("MLSOPCCP:actOptRmpTblSet", 2)])
        pva = mls_ioc.pva_context()
        wait_for(lambda: enum(pva, mode), lambda v: v == "ssmb")
        ca_puts(env, [(mode, "low_emittance")])
        wait_for(lambda: enum(pva, "MLSOPCCP:actOptRmpTblSet"), lambda v: v == "low_emittance")
        assert int(pva.get("MLSOPCCP:actOptRmpTblSet").raw.value.index) == states.index("low_emittance")
        pva.close()
    finally:
        ca_puts(env, [(mode, "user")])


def enum(pva, name: str) -> str:
    value = pva.get(name, timeout=5).raw.value
    return value.choices[value.index]
