"""Median time of Engine.compute() for a machine, against the naive full recomputation.

    python bench/bench_engine.py [--machine bessy2] [--repeat 30]

"naive" is what existing virtual accelerators do on every change: 6D closed orbit and optics at
every element with chromaticity, plus emittance and radiation integrals.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import at
import numpy as np
from twinioc.model import Change, Engine

DB = Path(__file__).resolve().parents[1] / "db"


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def naive_recompute(ring6: at.Lattice) -> None:
    ring6.get_optics(refpts=range(len(ring6) + 1), get_chrom=True)
    ring6.envelope_parameters()
    ring6.radiation_parameters()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="bessy2")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    engine = Engine.from_folder(DB / args.machine)
    steerer = engine.devices.of_kind("hsteerer")[0].name
    rng = np.random.default_rng(1)

    def step_and_compute(chromaticity: bool) -> None:
        engine.apply([Change(steerer, "current", float(rng.uniform(-0.1, 0.1)))])
        engine.compute(chromaticity=chromaticity)

    orbit_tunes = median_seconds(lambda: step_and_compute(False), args.repeat)
    with_chrom = median_seconds(lambda: step_and_compute(True), args.repeat)
    ring6 = engine.ring.enable_6d(copy=True)
    naive = median_seconds(lambda: naive_recompute(ring6), max(5, args.repeat // 5))

    print(f"machine {args.machine}: {len(engine.ring)} elements, {len(engine.devices.bpms)} BPMs; "
          f"{platform.processor() or platform.machine()}, pyAT {at.__version__}")
    print(f"{'what':52s} {'median ms':>10s} {'rate /s':>8s} {'ratio':>7s}")
    for label, t in [("compute(): orbit at BPMs + tunes", orbit_tunes),
                     ("compute(): + chromaticity, alpha_c, Qs", with_chrom),
                     ("naive: 6D optics everywhere + chrom + emittance", naive)]:
        print(f"{label:52s} {t * 1e3:10.1f} {1 / t:8.1f} {naive / t:6.1f}x")


if __name__ == "__main__":
    main()
