"""Small Channel Access helpers the IOC tests share: wait for a condition, put and wait for the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import epics


def wait_for(read, condition, timeout=10.0):
    """Poll *read()* until *condition(value)* holds and return that value; fail the test, showing the
    last value, if it does not hold within *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value is not None and condition(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not so within {timeout} s; the last value read: {value!r}")
        time.sleep(0.05)


def caget(pv, **kw):
    return epics.caget(pv, timeout=5, **kw)


class TwinClient:
    """Puts that wait until the twin (its twin-only PVs under *prefix*) has published their effect."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, suffix: str) -> str:
        """The full name of a twin-only PV."""
        return self.prefix + suffix

    def settle(self) -> int:
        """Wait until the twin has published a state computed after every put so far."""
        version = caget(self("LATTICE:VERSION"))
        updates = caget(self("UPDATES"))
        wait_for(lambda: caget(self("UPDATES")), lambda u: u >= updates + 2)
        return version

    def put(self, pv: str, value, timeout: float = 10.0) -> None:
        """Put, wait until the model has a new lattice version, then until it is published."""
        before = caget(self("LATTICE:VERSION"))
        assert epics.caput(pv, value, wait=True, timeout=5) == 1
        after = wait_for(lambda: caget(self("LATTICE:VERSION")), lambda v: v > before, timeout)
        assert after > before, f"{pv} put did not reach the model"
        updates = caget(self("UPDATES"))
        wait_for(lambda: caget(self("UPDATES")), lambda u: u > updates)


def ca_process(env: dict, code: str) -> str:
    """Run *code* with pyepics in a fresh process that sees only the twin of *env*; return what it
    prints. (This process's pyepics context belongs to the session's twins.)"""
    done = subprocess.run([sys.executable, "-c", "import epics\n" + code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ca_puts(env: dict, puts: list[tuple[str, object]]) -> None:
    """Put each (pv, value) in turn over CA, each waiting for completion, from a fresh process."""
    ca_process(env, f"""
import json
for pv, value in json.loads({json.dumps(json.dumps(puts))}):
    assert epics.caput(pv, value, wait=True, timeout=5) == 1, pv
""")


def ca_gets(env: dict, names: list[str]) -> dict[str, object]:
    """Read *names* over CA from a fresh process (long strings as text)."""
    out = ca_process(env, f"""
import json
names = json.loads({json.dumps(json.dumps(names))})
values = {{}}
for name in names:
    pv = epics.PV(name)
    pv.wait_for_connection(5)
    # a long string is a CHAR waveform: ask for its whole buffer (pyepics would ask for as many
    # elements as the connection reported, one for an empty text, and hand back [0])
    text = "char" in pv.type and pv.nelm > 1
    value = pv.get(timeout=5, as_string=text, count=pv.nelm if text else None)
    values[name] = value.tolist() if hasattr(value, "tolist") else value
print(json.dumps(values))
""")
    return json.loads(out.strip().splitlines()[-1])
