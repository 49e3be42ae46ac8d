"""What a downstream project's CI looks like: its control-room code, tested against a twin.

Nothing here imports twinioc. With twinioc installed (``pip install twinioc``), pytest finds its
plugin and gives the fixtures ``twin`` (a fresh twin per test) and ``twin_session`` (one for the
session). While a twin runs, the EPICS client environment points at it alone, on loopback ports of
its own: pyepics and p4p reach it as they would reach the machine.

    pytest examples/ci/test_control_room.py                       the session twin is BESSY II
    pytest examples/ci/test_control_room.py --twin-machine mls    ... or the MLS
"""

import time

import epics
import numpy as np
import pytest
from p4p.client.thread import Context

# -- the control-room code under test (in a real project it lives in the project's package) -----

def bump(steerer: str, delta: float) -> None:
    """Change a steerer's current by *delta* amperes and wait until its readback follows."""
    target = epics.caget(f"{steerer}:setCur") + delta
    if epics.caput(f"{steerer}:setCur", target, wait=True) != 1:
        raise RuntimeError(f"{steerer}: put not completed")
    deadline = time.monotonic() + 10
    while abs(epics.caget(f"{steerer}:rdCur", use_monitor=False) - target) > 1e-3:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{steerer} did not reach {target} A")
        time.sleep(0.05)


def orbit_after(orbit_pv: str, updates_pv: str, updates: int = 3) -> np.ndarray:
    """The orbit once the publication counter has moved on by *updates* (the state is new then)."""
    start = epics.caget(updates_pv, use_monitor=False)
    while epics.caget(updates_pv, use_monitor=False) < start + updates:
        time.sleep(0.02)
    return np.asarray(epics.caget(orbit_pv, use_monitor=False))


# -- the tests ---------------------------------------------------------------------------------

def test_the_session_twin_answers_the_machine_names(twin_session):
    assert epics.caget(twin_session.pv("SEED"), timeout=5) is not None
    assert epics.caget(twin_session.pv("TUNE:X"), timeout=5) > 0


@pytest.mark.twin(machine="mls", seed=5, set={"bpm.noise_um": 0})
def test_a_horizontal_bump_moves_the_horizontal_orbit_only(twin):
    # the ring's slow orbit feedback would take the bump out again: off, as a control-room script does
    assert epics.caput("ORBITCCP:selRunMode", 0, wait=True, timeout=5) == 1
    orbit_x, orbit_y, updates = twin.pv("ORBIT:TRUE:X"), twin.pv("ORBIT:TRUE:Y"), twin.pv("UPDATES")
    before_x, before_y = orbit_after(orbit_x, updates), orbit_after(orbit_y, updates)
    bump("HS1P1K1RP", 0.5)
    after_x, after_y = orbit_after(orbit_x, updates), orbit_after(orbit_y, updates)
    assert np.abs(after_x - before_x).max() > 0.05  # mm: half an ampere of a steerer moves the beam
    assert np.abs(after_y - before_y).max() < 0.01 * np.abs(after_x - before_x).max()


@pytest.mark.parametrize("twin", [{"machine": "bessy2", "ideal": True}, {"machine": "mls", "ideal": True}],
                         indirect=True)
def test_tunes_over_pva_agree_with_ca(twin):
    context = Context("pva")  # made inside the test: it reads the environment the fixture set
    try:
        over_pva = context.get(twin.pv("TUNE:X"), timeout=5)
    finally:
        context.close()
    assert 0 < over_pva < 1
    assert over_pva == pytest.approx(epics.caget(twin.pv("TUNE:X")), abs=1e-9)


@pytest.mark.twin(machine="mls", ideal=True)
def test_a_bad_value_is_refused_and_the_old_one_stays(twin):
    old = epics.caget("Q1P1K1RP:setCur")
    epics.caput("Q1P1K1RP:setCur", float("nan"), wait=True)
    assert epics.caget("Q1P1K1RP:setCur", use_monitor=False) == old
