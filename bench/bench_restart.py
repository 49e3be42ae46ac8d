"""What a dead physics worker costs a client: kill -9 of the worker, seen over PVA.

    python bench/bench_restart.py [--kills 5]

For each machine, a twin with its startup file's imperfections (as ``make run`` starts it) runs while
a PVA client monitors the orbit waveform. The worker is killed (SIGKILL) *kills* times, each once the
readings are valid again; for each kill: the time until the first orbit update marked INVALID, and
until the first valid one after it (a new worker built, every converter output sent, the state
computed). Medians and the worst of the runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from twinioc.ioc.testing import TwinProcess

INVALID = 3


def first_after(seen: list[tuple[float, int]], since: float, valid: bool, timeout: float = 60.0) -> float:
    """When the first update after *since* came that is valid (or INVALID)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for when, severity in list(seen):
            if when > since and (severity == INVALID) != valid:
                return when
        time.sleep(0.005)
    raise TimeoutError("no such update")


def kills(machine: str, count: int) -> tuple[list[float], list[float]]:
    """(seconds until INVALID, seconds until valid again) for each of *count* kills."""
    marked, back = [], []
    with tempfile.TemporaryDirectory() as folder, TwinProcess(machine, state_dir=Path(folder)) as twin:
        context = twin.pva_context()
        orbit = "TWIN:ORBIT:X"
        seen: list[tuple[float, int]] = []
        subscription = context.monitor(orbit, lambda value: seen.append((time.monotonic(), value.severity)))
        time.sleep(1.0)
        for _ in range(count):
            killed = time.monotonic()
            os.kill(twin.worker_pid(), signal.SIGKILL)
            invalid = first_after(seen, killed, valid=False)
            valid = first_after(seen, invalid, valid=True)
            marked.append(invalid - killed)
            back.append(valid - killed)
            time.sleep(0.5)
        subscription.close()
        context.close()
    return marked, back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    print("| twin | kill -9 -> readings INVALID, median (max) | kill -9 -> valid again, median (max) | kills |")
    print("|---|---|---|---|")
    for machine in ("bessy2", "mls"):
        marked, back = kills(machine, args.kills)
        print(f"| {machine} | {statistics.median(marked) * 1e3:.0f} ms ({max(marked) * 1e3:.0f}) | "
              f"{statistics.median(back):.2f} s ({max(back):.2f}) | {args.kills} |")


if __name__ == "__main__":
    main()
