"""What the journal costs: one append (inside every setpoint put) and the start-up scan that puts
journaled setpoints back over the autosaved ones.

    python bench/bench_journal.py [--entries 20000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from twinioc.ioc.journal import Journal, setpoints_since


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        journal = Journal(Path(folder) / "journal.jsonl")
        seconds = []
        for i in range(args.entries):
            entry = {"command": "set", "pv": f"HS{i % 48}P1D1R:set", "device": f"HS{i % 48}P1D1R", "old": 0.1,
                     "new": i * 1e-5, "outcome": "accepted", "detail": "", "lattice_version": i}
            start = time.perf_counter()
            journal.append(entry)
            seconds.append(time.perf_counter() - start)
        seconds.sort()
        size = (Path(folder) / "journal.jsonl").stat().st_size
        start = time.perf_counter()
        _, count = setpoints_since(Path(folder), None)
        scan = time.perf_counter() - start
    p99 = seconds[int(0.99 * len(seconds))]
    print(f"append (write + flush): median {statistics.median(seconds) * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us, "
          f"{args.entries} entries, {size / args.entries:.0f} B each")
    print(f"start-up scan: {count} entries in {scan:.3f} s ({count / scan:.0f} entries/s)")


if __name__ == "__main__":
    main()
