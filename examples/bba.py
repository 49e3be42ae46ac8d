"""Beam-based alignment of one quadrupole, over Channel Access only — as one would do it on the machine.

    python examples/bba.py --quad Q2P1K3RP --bpm BPMZ3K3RP --steerer HS3P2L2RP --plane x
    python examples/bba.py --quad Q2P1K3RP --bpm BPMZ3K3RP --steerer VS2P1L4RP --plane y

The idea: a quadrupole kicks the beam by ΔK·L·(x − x0) when its strength changes by ΔK, where x0 is
its magnetic centre. The orbit therefore stops responding to a change of the quadrupole when the
beam passes through the centre. Steer the beam through the quadrupole at several positions (one
steerer), change the quadrupole's current at each, and fit the size of the orbit's response
against the reading of the BPM beside the quadrupole: the zero crossing is the quadrupole's centre
in that BPM's coordinates.

The BPM is not at the quadrupole's centre (here 0.11 m upstream), so what is found is the centre
as that BPM sees it: the beam's slope at the zero crossing times that distance is a systematic
error. Choose a steerer that crosses the quadrupole with little slope; for the MLS twin's
Q2M1K3RP the two above keep it under 3 µm (a steerer picked at random can cost 10–30 µm).

Everything goes through pyepics: ``EPICS_CA_ADDR_LIST`` and friends choose the machine (or twin).
The script waits the way a control-room script does: for the readback to reach the setpoint, then
for fresh BPM readings, which it averages.
"""

from __future__ import annotations

import argparse
import sys
import time

import epics
import numpy as np


def wait_readback(converter: str, value: float, tolerance: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while abs(epics.caget(f"{converter}:rdCur", timeout=5) - value) > tolerance:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{converter} did not reach {value} A")
        time.sleep(0.05)


def set_current(converter: str, value: float, tolerance: float) -> None:
    if epics.caput(f"{converter}:setCur", value, wait=True, timeout=5) != 1:
        raise RuntimeError(f"put to {converter}:setCur failed")
    wait_readback(converter, value, tolerance)


def read_orbit(bpms: list[str], plane: str, samples: int) -> np.ndarray:
    """The mean of *samples* fresh readings of every BPM, in mm."""
    first = f"{bpms[0]}:rd{plane.upper()}"
    readings = []
    last, since = epics.caget(first, timeout=5), time.monotonic()
    while len(readings) < samples:
        time.sleep(0.02)
        value = epics.caget(first, timeout=5, use_monitor=False)
        if value == last and time.monotonic() - since < 1.0:  # not a new reading yet (a noiseless
            continue                                           # machine repeats itself: take it)
        last, since = value, time.monotonic()
        readings.append(epics.caget_many([f"{b}:rd{plane.upper()}" for b in bpms], timeout=5))
    return np.mean(np.array(readings, dtype=float), axis=0)


def align(quad: str, bpm: str, steerer: str, plane: str, bpms: list[str], steps: int, span: float,
          delta_quad: float, samples: int, settle: float) -> float:
    """The reading of *bpm* (mm) at which the orbit does not respond to *quad*."""
    quad0 = epics.caget(f"{quad}:setCur", timeout=5)
    steer0 = epics.caget(f"{steerer}:setCur", timeout=5)
    here = bpms.index(bpm)
    positions, responses = [], []
    try:
        for current in steer0 + np.linspace(-span, span, steps):
            set_current(steerer, current, 1e-3)
            time.sleep(settle)
            before = read_orbit(bpms, plane, samples)
            set_current(quad, quad0 + delta_quad, 1e-3)
            time.sleep(settle)
            after = read_orbit(bpms, plane, samples)
            set_current(quad, quad0, 1e-3)
            positions.append(before[here])
            responses.append(after - before)
    finally:
        set_current(quad, quad0, 1e-3)
        set_current(steerer, steer0, 1e-3)
    # All responses share one shape (the orbit of a kick at the quadrupole); its signed size is
    # the projection on the first singular vector, which is linear in the beam's offset there.
    responses = np.array(responses)
    _, _, vt = np.linalg.svd(responses, full_matrices=False)
    size = responses @ vt[0]
    slope, intercept = np.polyfit(positions, size, 1)
    return -intercept / slope


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quad", required=True, help="the quadrupole's converter, e.g. Q2P1K3RP")
    parser.add_argument("--bpm", required=True, help="the BPM beside it, e.g. BPMZ3K3RP")
    parser.add_argument("--steerer", required=True, help="a steerer of the plane, e.g. HS3P2L2RP")
    parser.add_argument("--plane", choices=("x", "y"), default="x")
    parser.add_argument("--bpms", nargs="+", help="the BPMs to read (default: the MLS ring's 28)")
    parser.add_argument("--steps", type=int, default=5, help="steerer settings")
    parser.add_argument("--span", type=float, default=0.4, help="steerer excursion, ± A")
    parser.add_argument("--delta-quad", type=float, default=2.0, help="quadrupole change, A")
    parser.add_argument("--samples", type=int, default=5, help="BPM readings averaged per orbit")
    parser.add_argument("--settle", type=float, default=0.3, help="s to wait after a readback arrived")
    args = parser.parse_args(argv)
    bpms = args.bpms or [f"BPMZ{i}{section}RP" for section in ("K1", "L2", "K3", "L4") for i in range(1, 8)]
    centre = align(args.quad, args.bpm, args.steerer, args.plane, bpms, args.steps, args.span,
                   args.delta_quad, args.samples, args.settle)
    print(f"{args.quad} centre in {args.bpm} {args.plane}: {centre * 1e3:.1f} um")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
