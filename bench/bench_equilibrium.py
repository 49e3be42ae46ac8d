"""The orbit refresh while the equilibrium is recomputed after every magnet change.

    python bench/bench_equilibrium.py [--seconds 20]

For each machine, a twin with its startup file's imperfections (as ``make run`` starts it) runs for
*seconds* with nothing changing, then as long again with a driver stepping a quadrupole up and down
by 0.5 A four times a second over PVA. Printed per phase: the orbit refresh (``$(P)UPDATES`` per
second, from a PVA monitor's timestamps), the equilibria published per second, and the median and
worst of ``$(P)EMITTANCE:COMPUTE:TIME``; and the lag of the equilibrium behind the orbit (how many
lattice versions it trails, at the driver's steps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from twinioc.ioc.testing import TwinProcess

QUADRUPOLES = {"bessy2": "Q1PDR:set", "mls": "Q1P1K1RP:setCur"}
STEP_A, DRIVE_HZ = 0.5, 4.0


def phase(context, prefix: str, seconds: float, drive: str | None) -> dict:
    """Watch for *seconds*, stepping *drive* (a setpoint PV) at DRIVE_HZ when given."""
    updates, versions, compute, lag = [], [], [], []
    latest = {"lattice": 0, "equilibrium": None, "compute_ms": float("nan")}

    def on_lattice(value):
        latest["lattice"] = int(value)

    def on_compute(value):
        latest["compute_ms"] = float(value)

    def on_equilibrium(value):
        # the records are set every tick; a new equilibrium is a new version (its compute time, set
        # just before the version in each tick, is the latest seen)
        if int(value) != latest["equilibrium"]:
            latest["equilibrium"] = int(value)
            versions.append(time.monotonic())
            compute.append(latest["compute_ms"])
            if latest["lattice"]:
                lag.append(latest["lattice"] - int(value))

    subscriptions = [context.monitor(prefix + "UPDATES", lambda v: updates.append(time.monotonic())),
                     context.monitor(prefix + "LATTICE:VERSION", on_lattice),
                     context.monitor(prefix + "EMITTANCE:COMPUTE:TIME", on_compute),
                     context.monitor(prefix + "EMITTANCE:VERSION", on_equilibrium)]
    stop = threading.Event()
    driver = None
    if drive:
        nominal = float(context.get(drive))

        def step():
            sign = 1.0
            while not stop.wait(1.0 / DRIVE_HZ):
                context.put(drive, nominal + sign * STEP_A, wait=False)
                sign = -sign
            context.put(drive, nominal)

        driver = threading.Thread(target=step)
        driver.start()
    time.sleep(1.0)
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    stop.set()
    if driver:
        driver.join()
    for s in subscriptions:
        s.close()
    within = [t for t in updates if start <= t <= end]
    compute = [c for t, c in zip(versions, compute, strict=True) if start <= t <= end]
    return {"refresh_hz": (len(within) - 1) / (within[-1] - within[0]) if len(within) > 1 else 0.0,
            "equilibria_per_s": sum(start <= t <= end for t in versions) / (end - start),
            "compute_ms_median": statistics.median(compute) if compute else float("nan"),
            "compute_ms_max": max(compute) if compute else float("nan"),
            "lag_versions_median": statistics.median(lag) if lag else float("nan")}


def run(machine: str, seconds: float) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as folder, TwinProcess(machine, state_dir=Path(folder)) as twin:
        context = twin.pva_context()
        time.sleep(2.0)  # the first equilibrium
        results = {"quiet": phase(context, "TWIN:", seconds, None),
                   "quadrupole at 4 Hz": phase(context, "TWIN:", seconds, QUADRUPOLES[machine])}
        context.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--machine", choices=sorted(QUADRUPOLES), action="append")
    args = parser.parse_args()
    for machine in args.machine or sorted(QUADRUPOLES):
        for name, r in run(machine, args.seconds).items():
            print(f"{machine:7s} {name:19s} orbit refresh {r['refresh_hz']:5.1f} Hz   equilibria "
                  f"{r['equilibria_per_s']:4.1f}/s   compute {r['compute_ms_median']:6.1f} ms median, "
                  f"{r['compute_ms_max']:6.1f} ms max   trailing {r['lag_versions_median']:.0f} versions (median)")


if __name__ == "__main__":
    main()
