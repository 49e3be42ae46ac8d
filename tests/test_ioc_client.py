"""``twinioc get|put|monitor``, the command-line client of the container, against the session's MLS twin."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import epics
import pytest
from ca import caget
from conftest import MLS_PREFIX

STEERER = "HS1P1K1RP:setCur"


def twinioc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twinioc.ioc.cli", *args], capture_output=True, text=True,
                          timeout=60)


def printed(out: str, name: str) -> str:
    """What a get printed for *name*."""
    found = re.search(rf"^{re.escape(name)}\s+(.*)$", out, re.M)
    assert found, out
    return found.group(1)


@pytest.fixture
def steerer(mls_ioc):
    """The steerer's setpoint, put back afterwards. Read fresh, not from pyepics's monitor: the last
    test's restore may not have reached the monitor yet, and the session twin's MLS tests expect
    the steerer where it was."""
    old = caget(STEERER, use_monitor=False)
    yield old
    epics.caput(STEERER, old, wait=True)


@pytest.mark.parametrize("protocol", [[], ["--pva"]], ids=["ca", "pva"])
def test_get_prints_numbers_enums_text_and_arrays_and_fails_on_an_unknown_name(mls_ioc, protocol):
    names = [f"{MLS_PREFIX}TUNE:X", f"{MLS_PREFIX}RAMP:ENABLE", f"{MLS_PREFIX}BEAM:LOST:REASON",
             f"{MLS_PREFIX}ORBIT:NAMES"]
    done = twinioc("get", *protocol, "-w", "2", *names, f"{MLS_PREFIX}NO:SUCH:PV")
    assert done.returncode == 1
    assert float(printed(done.stdout, names[0])) == pytest.approx(caget(names[0]), abs=1e-9)
    assert printed(done.stdout, names[1]) == caget(names[1], as_string=True)
    assert names[2] in done.stdout
    assert printed(done.stdout, names[3]).split() == ["[28]", *caget(names[3])]
    assert f"{MLS_PREFIX}NO:SUCH:PV" in done.stderr


@pytest.mark.parametrize("protocol", [[], ["--pva"]], ids=["ca", "pva"])
def test_put_says_old_and_new_and_fails_when_the_ioc_keeps_another_value(steerer, protocol):
    done = twinioc("put", *protocol, STEERER, str(steerer + 0.25))
    assert done.returncode == 0, done.stderr
    assert re.search(rf"^Old : {STEERER}\s+{steerer:g}", done.stdout, re.M), done.stdout
    assert caget(STEERER, use_monitor=False) == pytest.approx(steerer + 0.25)

    refused = twinioc("put", *protocol, STEERER, "nan")
    assert refused.returncode == 1
    assert "asked for nan" in refused.stderr
    assert caget(STEERER, use_monitor=False) == pytest.approx(steerer + 0.25)

    high = epics.PV(STEERER).get_ctrlvars()["upper_ctrl_limit"]
    clipped = twinioc("put", *protocol, STEERER, str(high + 100))
    assert clipped.returncode == 1 and f"the IOC holds {high:g}" in clipped.stderr


def test_put_of_an_enum_by_name_and_of_a_command_string(mls_ioc):
    ramp = f"{MLS_PREFIX}RAMP:ENABLE"
    old = caget(ramp, as_string=True, use_monitor=False)
    try:
        done = twinioc("put", ramp, "ON")
        assert done.returncode == 0 and caget(ramp, as_string=True, use_monitor=False) == "ON"
        assert twinioc("put", ramp, "SIDEWAYS").returncode == 1
    finally:
        epics.caput(ramp, old, wait=True)
    snapshot = twinioc("put", f"{MLS_PREFIX}SNAPSHOT:SAVE", "from_the_shell")
    assert snapshot.returncode == 0, snapshot.stderr
    assert "from_the_shell" in caget(f"{MLS_PREFIX}SNAPSHOT:LIST", as_string=True, use_monitor=False)


@pytest.mark.parametrize("protocol", [[], ["--pva"]], ids=["ca", "pva"])
def test_monitor_prints_each_update(mls_ioc, protocol):
    done = twinioc("monitor", *protocol, f"{MLS_PREFIX}UPDATES", "-n", "4")
    assert done.returncode == 0, done.stderr
    counts = [int(line.split()[-1]) for line in done.stdout.splitlines()]
    assert len(counts) == 4 and counts == sorted(counts) and len(set(counts)) == 4
    assert not any(math.isnan(c) for c in counts)


def test_get_prints_a_pva_table_row_by_row(bessy2_ioc):
    done = twinioc("get", "--pva", "ORBITCC:rdBpm")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()[1:]
    assert header.split("\t") == ["BPM", "X", "Y"]
    assert [row.split("\t")[0] for row in rows] == list(caget("ORBITCC:rdBpmNames"))
