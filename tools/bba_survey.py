"""How well the BBA plan finds every quadrupole of a machine: a survey against configured offsets.

    python tools/bba_survey.py --machine mls [--seed 7] [--offset-um 100]

Starts a twin with its startup file's imperfections (seeded errors, BPM noise, gains and rolls, the
orbit feedback on) but the BPMs' electrical offsets, each quadrupole on a converter of its own
shifted by a drawn (x, y) offset (uniform within ±*offset-um*), and ``twinioc web`` beside it; then
runs a BBA of each of those quadrupoles through the API and prints, per quadrupole and plane, the
result against the configured offset, and the largest and the rms error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from twinioc.ioc.testing import TwinProcess  # noqa: E402
from twinioc.studies.machine import MachineLayout  # noqa: E402
from web import WebProcess, measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="mls")
    parser.add_argument("--seed", type=int, default=7, help="draws the offsets")
    parser.add_argument("--offset-um", type=float, default=100.0)
    args = parser.parse_args()
    layout = MachineLayout.load(args.machine)
    quads = [c.magnets[0] for c in layout.of_kind("quadrupole") if len(c.magnets) == 1]
    rng = np.random.default_rng(args.seed)
    offsets = {q: rng.uniform(-args.offset_um, args.offset_um, 2).round(1) for q in quads}
    settings = ["--set", "bpm.offset_um=0"]
    settings += [a for q, (x, y) in offsets.items() for a in ("--set", f"errors.offsets_um.{q}=[{x}, {y}]")]
    errors = []
    with tempfile.TemporaryDirectory(prefix="bba-survey-") as folder:
        with TwinProcess(args.machine, *settings, state_dir=Path(folder) / "twin") as twin, \
                WebProcess(args.machine, twin.client_env, Path(folder) / "web") as web, web.client() as client:
            print(f"{'quadrupole':12} {'BPM':11} {'d (m)':>6} {'set x':>7} {'found x':>8} {'set y':>7} "
                  f"{'found y':>8} {'error x':>8} {'error y':>8}  (um)")
            for q in quads:
                result = measure(client, {"kind": "bba", "quadrupole": q}, timeout=600)["result"]
                error = np.array(result["offset_um"]) - offsets[q]
                errors.append(error)
                print(f"{q:12} {result['bpm']:11} {result['bpm_distance_m']:6.3f} {offsets[q][0]:7.1f} "
                      f"{result['offset_um'][0]:8.1f} {offsets[q][1]:7.1f} {result['offset_um'][1]:8.1f} "
                      f"{error[0]:8.1f} {error[1]:8.1f}")
    errors = np.array(errors)
    rms = np.sqrt(np.mean(errors**2, axis=0))
    print(f"{len(quads)} quadrupoles: largest error {np.abs(errors).max():.1f} um, rms x {rms[0]:.1f} um, "
          f"y {rms[1]:.1f} um")


if __name__ == "__main__":
    main()
