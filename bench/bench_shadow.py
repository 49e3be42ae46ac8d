"""The shadow behind its source: how late it is, what a put costs it, and its CPU share.

    python bench/bench_shadow.py [--machines bessy2 mls] [--puts 20] [--window 20]

Per machine: an ideal twin publishing at 25 Hz with 1 µm of BPM noise (every publication moves the
orbit) stands in for the machine, and ``twinioc shadow`` follows it; fresh state folders, free
loopback ports. Figures:

- lag: for each comparison the shadow publishes (``SHADOW:ORBIT:RESIDUAL:X:RMS``), its time stamp
  minus that of the newest source orbit before it (one host clock): median and 90th percentile;
  and the shadow's own ``SOURCE:LAG`` as it reports it;
- put → model: from a ``caput`` of a steerer on the source to the first change of the shadow's
  model orbit (``SHADOW:ORBIT:X``), against the same put to the source's orbit: medians;
- the shadow's CPU share (of one core) over *window* s, and its resident memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_twin import cpu_seconds, rss_mb  # noqa: E402
from twinioc.ioc.testing import ShadowProcess, TwinProcess, client_env  # noqa: E402

STEERER = {"bessy2": "HS4P2D1R", "mls": "HS1P2K1RP"}
STEP_A = 0.2


def orbit_pv(machine: str) -> str:
    from twinioc.studies.machine import MachineLayout

    orbit = MachineLayout.load(machine).orbit
    return orbit.waveform or orbit.x[0]


def bench(machine: str, puts: int, window: float) -> dict:
    import epics

    source = TwinProcess(machine, "--ideal", "--rate", "25", "--set", "bpm.noise_um=1").start()
    shadow = ShadowProcess(source).start()
    try:
        os.environ.update(client_env(source, shadow))
        source_stamps: list[float] = []
        lags: list[float] = []
        lock = threading.Lock()

        def on_source(timestamp=None, **_):
            with lock:
                source_stamps.append(timestamp)

        def on_shadow(timestamp=None, **_):
            with lock:
                before = [s for s in source_stamps[-50:] if s <= timestamp]
                if before:
                    lags.append(timestamp - before[-1])

        src = epics.PV(orbit_pv(machine), callback=on_source, auto_monitor=True)
        residual = epics.PV("SHADOW:ORBIT:RESIDUAL:X:RMS", callback=on_shadow, auto_monitor=True)
        src.wait_for_connection(5)
        residual.wait_for_connection(5)
        cpu0, t0 = cpu_seconds(shadow.process.pid), time.monotonic()
        reported = []
        while time.monotonic() - t0 < window:
            reported.append(epics.caget("SHADOW:SOURCE:LAG", use_monitor=False))
            time.sleep(0.5)
        cpu = (cpu_seconds(shadow.process.pid) - cpu0) / (time.monotonic() - t0)
        to_model, to_source = put_latency(machine, puts)
        return {"lag_median_ms": statistics.median(lags) * 1e3, "lag_p90_ms": float(np.percentile(lags, 90)) * 1e3,
                "reported_lag_ms": statistics.median(reported) * 1e3, "comparisons_hz": len(lags) / window,
                "model_median_ms": statistics.median(to_model) * 1e3,
                "source_median_ms": statistics.median(to_source) * 1e3,
                "cpu_percent": cpu * 100, "rss_mb": rss_mb(shadow.process.pid)}
    finally:
        shadow.stop()
        source.stop()


def first_change(pv, before, start: float, timeout: float = 5.0) -> float:
    while time.monotonic() - start < timeout:
        value = pv.get(use_monitor=True)
        if value is not None and not np.allclose(value, before, atol=1e-4):
            return time.monotonic() - start
        time.sleep(0.002)
    return float("nan")


def put_latency(machine: str, puts: int) -> tuple[list[float], list[float]]:
    import epics
    from twinioc.studies.machine import MachineLayout

    steerer = MachineLayout.load(machine).converter(STEERER[machine])
    model = epics.PV("SHADOW:ORBIT:X", auto_monitor=True)
    orbit = epics.PV(orbit_pv(machine), auto_monitor=True)
    model.wait_for_connection(5)
    orbit.wait_for_connection(5)
    origin = epics.caget(steerer.setpoint)
    to_model, to_source = [], []
    for i in range(puts):
        time.sleep(0.3)
        before_model, before_orbit = model.get(), orbit.get()
        start = time.monotonic()
        epics.caput(steerer.setpoint, origin + (STEP_A if i % 2 == 0 else 0.0), wait=True)
        to_model.append(first_change(model, before_model, start))
        # the source's orbit: 1 um of noise; a move of 0.1 mm at the steered BPMs stands out
        to_source.append(first_change(orbit, before_orbit, start) if machine == "bessy2" else float("nan"))
    epics.caput(steerer.setpoint, origin, wait=True)
    return [t for t in to_model if t == t], [t for t in to_source if t == t] or [float("nan")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", nargs="+", default=["bessy2", "mls"])
    parser.add_argument("--puts", type=int, default=20)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--no-header", action="store_true", help="(internal)")
    args = parser.parse_args()
    if not args.no_header:
        print(f"{'machine':8} {'lag med ms':>10} {'p90 ms':>7} {'reported ms':>11} {'compares/s':>10} "
              f"{'put→model ms':>12} {'put→source ms':>13} {'CPU %':>6} {'RSS MB':>7}", flush=True)
    if len(args.machines) > 1:  # pyepics keeps its first context: each machine in a process of its own
        for machine in args.machines:
            subprocess.run([sys.executable, __file__, "--machines", machine, "--puts", str(args.puts),
                            "--window", str(args.window), "--no-header"], check=True)
        return
    r = bench(args.machines[0], args.puts, args.window)
    print(f"{args.machines[0]:8} {r['lag_median_ms']:10.1f} {r['lag_p90_ms']:7.1f} {r['reported_lag_ms']:11.1f} "
          f"{r['comparisons_hz']:10.1f} {r['model_median_ms']:12.1f} {r['source_median_ms']:13.1f} "
          f"{r['cpu_percent']:6.1f} {r['rss_mb']:7.0f}", flush=True)


if __name__ == "__main__":
    main()
