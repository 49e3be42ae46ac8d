"""Beam-based alignment of one quadrupole, over Channel Access only: a thin user of twinioc's BBA plan.

    python examples/bba.py --machine mls --quad Q2P1K3RP --plane x
    python examples/bba.py --machine mls --quad Q2M1K3RP --steerer VS2P1L4RP --plane y

A quadrupole kicks the beam by ΔK·L·(x̄ − x₀) when its strength changes by ΔK, x̄ the beam's mean
position in it and x₀ its magnetic centre. The plan (``twinioc.studies.plans.bba``) moves the beam
through the quadrupole in steps, changes the quadrupole at each, and fits the size of the orbit's
answer against the reading of the nearest BPM: the zero crossing is where the beam passes the
centre. It picks two steerers that move the beam in parallel through the quadrupole (or uses
``--steerer``), and takes out what the beam's slope there does to the BPM's reading from the
readings of the BPMs on both sides. It waits for readbacks and fresh readings, switches the orbit
feedback off meanwhile, and puts every setpoint back.

``EPICS_CA_ADDR_LIST`` and friends choose the machine (or twin). The last line printed is
``<quad> centre in <bpm> <plane>: <value> um``.
"""

from __future__ import annotations

import argparse
import sys

from twinioc.studies.runner import PlanRunner


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="mls", help="bessy2 or mls")
    parser.add_argument("--prefix", default=None, help="the twin's prefix (default the startup file's)")
    parser.add_argument("--quad", required=True, help="the quadrupole: its magnet or its converter, e.g. Q2P1K3RP")
    parser.add_argument("--steerer", help="a steerer of the plane (default: the plan picks a pair)")
    parser.add_argument("--plane", choices=("x", "y"), default="x")
    parser.add_argument("--bpm", help="accepted for compatibility: the plan reads the BPM nearest the quadrupole")
    parser.add_argument("--steps", type=int, default=5, help="beam positions")
    parser.add_argument("--span-mm", type=float, default=0.5, help="beam displacement in the quadrupole, ± mm")
    args = parser.parse_args(argv)
    runner = PlanRunner(args.machine, args.prefix)
    layout = runner.layout
    magnet = args.quad if args.quad not in layout.converters else layout.converter(args.quad).magnets[0]
    params = {"quadrupole": magnet, "planes": [args.plane], "steps": args.steps, "span_mm": args.span_mm}
    if args.steerer:
        params["steerer"] = args.steerer
    result = runner.run("bba", params).result
    print(f"steerers {', '.join(result['steerers'][args.plane])}; zero crossing at {result['crossing_um'][0]:.1f} um "
          f"(sigma {result['sigma_um'][0]:.1f} um), BPMs {result['bpm']} and {result['bpm_across']}")
    print(f"{args.quad} centre in {result['bpm']} {args.plane}: {result['offset_um'][0]:.1f} um")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
