"""Wall time of the measurement service's plans against the waits alone.

    python bench/bench_measurements.py [--repeat 3]

For each machine, a twin with its startup file's imperfections (as ``make run`` starts it: the orbit
feedback on, which the plans switch off) and ``twinioc web`` beside it, both on free loopback ports
with fresh state folders. Over HTTP: a BBA of one quadrupole (both planes) and an ORM of every
steerer, *repeat* times each. For each: the wall time from the POST to "done"; the plan's own time;
what it spent waiting for readbacks (converters ramp) and for fresh readings (the first publication
stamped after the readback, then samples − 1 more); the floor those readings impose at the twin's
rate, samples − 1 publication periods each (the first can be there at once); and what is left, the
plan's own work. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from twinioc.ioc.testing import TwinProcess  # noqa: E402
from web import WebProcess, measure  # noqa: E402

RATE_HZ = 25.0
CASES = {"bessy2": [("bba Q5M1T1R", {"kind": "bba", "quadrupole": "Q5M1T1R"}), ("orm all", {"kind": "orm"})],
         "mls": [("bba Q2M1K3RP", {"kind": "bba", "quadrupole": "Q2M1K3RP"}), ("orm all", {"kind": "orm"})]}


def run_case(client, body: dict) -> dict:
    started = time.monotonic()
    record = measure(client, body, timeout=900)
    wall = time.monotonic() - started
    timing = record["provenance"]["timing"]
    samples = record["params"]["samples"]
    floor = timing["readings"] * (samples - 1) / RATE_HZ
    return {"wall_s": wall, "plan_s": timing["wall_s"], "readback_s": timing["readback_s"],
            "readings_s": timing["readings_s"], "floor_s": floor,
            "overhead_s": timing["wall_s"] - timing["readback_s"] - timing["readings_s"],
            "moves": timing["moves"], "readings": timing["readings"]}


def bench(machine: str, repeat: int) -> list[tuple[str, dict]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench-measure-{machine}-") as folder:
        with TwinProcess(machine, state_dir=Path(folder) / "twin") as twin, \
                WebProcess(machine, twin.client_env, Path(folder) / "web") as web, web.client() as client:
            for label, body in CASES[machine]:
                runs = [run_case(client, body) for _ in range(repeat)]
                rows.append((label, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--machines", nargs="+", default=list(CASES))
    args = parser.parse_args()
    print(f"medians of {args.repeat} runs; floor: samples - 1 publication periods per reading at {RATE_HZ:g} Hz")
    print(f"{'machine':8} {'plan':14} {'wall s':>7} {'plan s':>7} {'readback s':>10} {'readings s':>10} "
          f"{'floor s':>8} {'own work s':>10} {'moves':>6} {'readings':>8} {'waits/wall':>10}")
    for machine in args.machines:
        for label, r in bench(machine, args.repeat):
            print(f"{machine:8} {label:14} {r['wall_s']:7.1f} {r['plan_s']:7.1f} {r['readback_s']:10.1f} "
                  f"{r['readings_s']:10.1f} {r['floor_s']:8.1f} {r['overhead_s']:10.2f} {r['moves']:6.0f} "
                  f"{r['readings']:8.0f} {(r['readback_s'] + r['readings_s']) / r['wall_s']:10.2f}")


if __name__ == "__main__":
    main()
