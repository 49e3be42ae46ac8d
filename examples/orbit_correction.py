"""Orbit correction over Channel Access only: measure the orbit response matrix, correct with SVD.
A thin user of twinioc's plans (``twinioc.studies.plans``: ``orm``, then ``orbit_correction``).

    twinioc --machine mls                                   # one shell: the twin, on 127.0.0.1
    export EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO   # another shell, the twin's env
    python examples/orbit_correction.py --machine mls
    python examples/orbit_correction.py --machine bessy2 --save-response bessy2.npz

1. The response matrix: one steerer at a time gets a step (by default each steerer's own, moving
   the orbit by about 0.5 mm at most, from the model's response), the plan waits for the readback, then averages
   fresh BPM readings and subtracts the reference orbit, read before and after the scan and
   interpolated in time. The next steerer's step and the previous one's restore go out together.
2. The correction: the steerer change is −gain · R⁺ · reading, R⁺ the pseudo-inverse of the measured
   matrix (both planes at once), keeping ``--singular-values`` of them (default all), each steerer
   clipped to its limits (the tables' and the IOC's DRVL/DRVH). The target is zero readings.

The orbit feedback is off while the plans run and back on after. The last line printed is JSON
(machine, rms before and after, per iteration, seconds) for scripts and tests to read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from twinioc.studies.runner import PlanRunner


def save_response(path: Path, machine: str, runner: PlanRunner, orm: dict) -> None:
    """The measured matrix as response[plane (0: x, 1: y), bpm, steerer] in mm/A, with its steps."""
    result = orm.result
    n = len(result["bpms"])
    matrix = np.asarray(result["mm_per_A"], float)
    horizontal = np.array([runner.layout.converter(s).plane == "x" for s in result["steerers"]])
    np.savez(path, response=np.stack([matrix[:n], matrix[n:]]), steps=np.array(orm.raw["steps_A"]),
             setpoints=np.array(orm.raw["setpoints_A"]), steerers=np.array(result["steerers"]),
             horizontal=horizontal, bpms=np.array(result["bpms"]), machine=machine,
             units="mm/A; response[plane (0: x, 1: y), bpm, steerer]")


def load_response(path: Path) -> dict:
    saved = np.load(path)
    response = saved["response"]
    return {"steerers": [str(s) for s in saved["steerers"]], "bpms": [str(b) for b in saved["bpms"]],
            "mm_per_A": np.concatenate([response[0], response[1]]).tolist()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--machine", default="bessy2", help="bessy2 or mls")
    parser.add_argument("--prefix", default=None, help="the twin's prefix (default the startup file's)")
    parser.add_argument("--steerers", nargs="+", help="the steerers (default all)")
    parser.add_argument("--step", type=float, help="one steerer step for all, A (default per steerer, from the model)")
    parser.add_argument("--samples", type=int, default=3, help="BPM readings averaged per orbit")
    parser.add_argument("--iterations", type=int, default=3, help="correction steps")
    parser.add_argument("--gain", type=float, default=0.8, help="fraction of the computed correction applied per step")
    parser.add_argument("--singular-values", type=int, help="singular values kept (default all)")
    parser.add_argument("--save-response", type=Path, help="write the measured response matrix to this .npz")
    parser.add_argument("--response", type=Path, help="use this saved response matrix instead of measuring")
    parser.add_argument("--measure-only", action="store_true", help="measure (and save) the response, correct nothing")
    args = parser.parse_args(argv)

    started = time.monotonic()
    runner = PlanRunner(args.machine, args.prefix)
    seconds = {}
    if args.response:
        measured = load_response(args.response)
    else:
        orm = runner.run("orm", {"steerers": args.steerers, "step_A": args.step, "samples": args.samples})
        measured = orm.result
        seconds["measure"] = time.monotonic() - started
        print(f"response of {len(measured['steerers'])} steerers measured in {seconds['measure']:.1f} s")
        if args.save_response:
            save_response(args.save_response, args.machine, runner, orm)
            print(f"response saved to {args.save_response}")
    if args.measure_only:
        print(json.dumps({"machine": args.machine, "seconds": seconds}))
        return {}
    t0 = time.monotonic()
    correction = runner.run("orbit_correction", {"response": "measured", "iterations": args.iterations,
                                                 "gain": args.gain, "singular_values": args.singular_values,
                                                 "samples": args.samples}, measured=measured).result
    seconds["correct"], seconds["total"] = time.monotonic() - t0, time.monotonic() - started
    rms = correction["rms_um"]
    history = [{"x": x, "y": y} for x, y in zip(rms["x"], rms["y"], strict=True)]
    for k, step in enumerate(history):
        print(f"iteration {k}: rms x = {step['x']:8.1f} um, y = {step['y']:8.1f} um")
    if correction["clipped"]:
        print(f"at their limits: {', '.join(correction['clipped'])}")
    result = {"machine": args.machine, "rms_before_um": history[0], "rms_after_um": history[-1],
              "iterations": history, "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
