"""What the pytest plugin's fixture costs a downstream test: start until the twin serves, and stop.

    python bench/bench_fixture.py [--runs 5]

Each run is what ``twin`` does around one test: ``running_twin`` starts a twin on free loopback ports,
waits until a CA read of its publication counter answers, points the client environment at it,
and stops it (SIGTERM) when the block ends. Medians and spread per machine, ideal and with the
startup file's imperfections.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from twinioc.ioc.pytest_plugin import running_twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("| twin | start until it serves, median (min-max) | stop, median | runs |")
    print("|---|---|---|---|")
    for machine in ("bessy2", "mls"):
        for ideal in (True, False):
            starts, stops = [], []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as folder:
                    began = time.monotonic()
                    with running_twin(machine=machine, ideal=ideal, state_dir=Path(folder)):
                        started = time.monotonic()
                    stops.append(time.monotonic() - started)
                    starts.append(started - began)
            print(f"| {machine}{' --ideal' if ideal else ''} | {statistics.median(starts):.2f} s "
                  f"({min(starts):.2f}-{max(starts):.2f}) | {statistics.median(stops):.2f} s | {args.runs} |")


if __name__ == "__main__":
    main()
