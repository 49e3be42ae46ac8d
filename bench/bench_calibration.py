"""How well and how fast the LOCO-style fit finds known errors in an orbit response, per machine.

    python bench/bench_calibration.py [--machines bessy2 mls] [--seeds 3] [--noise 1e-3]

For each machine and seed: the design lattice's orbit response with random errors (0.5 % rms
gradient errors on every quadrupole converter, 5 % rms BPM gains and steerer scales) and noise
(mm/A), fitted from the design lattice by ``model.calibration.fit_response``. Printed: the fit's time,
its steps, the misfit before and after (mm/A rms), and the gradient errors left (rms, and as a share
of the errors put in). Medians over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from twinioc.model import Engine
from twinioc.model.calibration import fit_response, response_with_errors
from twinioc.model.tables import MachineTables

DB = Path(__file__).resolve().parents[1] / "db"


def one(machine: str, seed: int, noise: float) -> dict:
    engine = Engine.from_folder(DB / machine)
    known = response_with_errors(engine, np.random.default_rng(seed), noise_mm_per_A=noise)
    result = {"steerers": known.steerers, "bpms": list(MachineTables(DB / machine).bpm_names),
              "mm_per_A": known.mm_per_A}
    start = time.perf_counter()
    calibration = fit_response(engine, machine, result)
    seconds = time.perf_counter() - start
    left = np.array([calibration.converter_scale[q] for q in known.quadrupoles]) - known.gradient
    put_in = known.gradient - 1
    misfit = calibration.provenance["orm"]["misfit_rms_mm_per_A"]
    return {"seconds": seconds, "steps": len(misfit) - 1, "misfit_before": misfit[0], "misfit_after": misfit[-1],
            "left_rms": float(np.sqrt(np.mean(left ** 2))),
            "left_share": float(np.sqrt(np.mean(left ** 2)) / np.sqrt(np.mean(put_in ** 2)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", nargs="+", default=["bessy2", "mls"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=1e-3, help="noise on the response, mm/A (default 1e-3)")
    args = parser.parse_args()
    print(f"{'machine':8} {'fit s':>6} {'steps':>5} {'misfit before':>13} {'after':>9} {'gradient left':>13} "
          f"{'of errors':>9}", flush=True)
    for machine in args.machines:
        runs = [one(machine, seed, args.noise) for seed in range(args.seeds)]
        m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"{machine:8} {m['seconds']:6.1f} {m['steps']:5.0f} {m['misfit_before']:13.4f} {m['misfit_after']:9.5f} "
              f"{m['left_rms'] * 100:12.3f}% {m['left_share'] * 100:8.1f}%", flush=True)


if __name__ == "__main__":
    main()
