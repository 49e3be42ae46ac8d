"""``twinioc shadow``: follow a machine read-only; replay a file through the model; calibrate it.

    twinioc shadow --machine mls --source-ca-addr HOST:PORT [--prefix SHADOW:] [--calibration FILE]
    twinioc shadow replay --machine mls FILE [--out FILE] [--calibration FILE]
    twinioc shadow calibrate --machine mls --source-ca-addr HOST:PORT --orm FILE [--bba FILE ...] --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

from . import serve


def _replay_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinioc shadow replay",
                                     description="a journal (.jsonl) or a CSV of time,PV,value through the model")
    parser.add_argument("--machine", required=True)
    parser.add_argument("file", type=Path)
    parser.add_argument("--out", type=Path, help="where the predictions go, as JSON lines (default stdout)")
    parser.add_argument("--calibration", type=Path, metavar="FILE")
    return parser


def _calibrate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinioc shadow calibrate",
        description="a calibration file from measurements of the machine: BPM gains, steerer and quadrupole "
                    "scales from an orbit response matrix (ORM), BPM offsets from BBA results")
    parser.add_argument("--machine", required=True)
    parser.add_argument("--source-ca-addr", required=True, metavar="HOST:PORT",
                        help="the machine, read (never written) for its converter values now: those the ORM "
                             "was measured at")
    parser.add_argument("--orm", type=Path, required=True, help="an ORM measurement (its JSON, as the service gives)")
    parser.add_argument("--bba", type=Path, action="append", default=[], help="a BBA measurement (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def _record(path: Path) -> dict:
    """A measurement's record (as the service or ``twinioc measure`` gives it), or its result alone."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"twinioc shadow: {path}: {err}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"twinioc shadow: {path}: not a measurement record")
    return data


def replay(argv: list[str]) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # pyAT greets on stdout as it loads: stdout is for data
        import at  # noqa: F401
    from twinioc.studies.machine import LayoutError, MachineLayout

    from .replay import ReplayError, replay_file

    args = _replay_parser().parse_args(argv)
    try:
        layout = MachineLayout.load(args.machine)
    except LayoutError as err:
        raise SystemExit(f"twinioc shadow: {err}") from None
    if not args.file.is_file():
        raise SystemExit(f"twinioc shadow: no file {args.file}")
    model = serve.make_model(args, layout)
    out = args.out.open("w") if args.out else sys.stdout
    try:
        read, lines, seconds, unknown = replay_file(layout, model, args.file, out)
    except ReplayError as err:
        raise SystemExit(f"twinioc shadow: {err}") from None
    finally:
        if args.out:
            out.close()
    print(f"replayed {read} values into {lines} predictions in {seconds:.2f} s"
          + (f"; names not of {layout.name}: {', '.join(sorted(unknown)[:8])}" if unknown else ""), file=sys.stderr)
    return 0


def calibrate(argv: list[str]) -> int:
    from twinioc.model.calibration import Calibration, CalibrationError, fit_response, with_bba
    from twinioc.studies.machine import MachineLayout

    from .model import ShadowModel
    from .source import read_converters

    args = _calibrate_parser().parse_args(argv)
    args.bind = None
    serve.network(args)
    layout = MachineLayout.load(args.machine)
    values = asyncio.run(read_converters(layout))
    if not values:
        raise SystemExit(f"twinioc shadow: the source at {args.source_ca_addr} answers no setpoint of {layout.name}")
    model = ShadowModel(layout.tables)
    model.set(values)
    try:
        orm = _record(args.orm)
        calibration = fit_response(model.engine, layout.name, orm.get("result", orm), Calibration(layout.name))
        calibration = with_bba(calibration, [_record(path) for path in args.bba])
    except CalibrationError as err:
        raise SystemExit(f"twinioc shadow: {err}") from None
    calibration.provenance["orm_file"] = str(args.orm)
    calibration.save(args.out)
    misfit = calibration.provenance["orm"]["misfit_rms_mm_per_A"]
    print(f"calibration of {layout.name} in {args.out}: ORM misfit {misfit[0]:.4g} -> {misfit[-1]:.4g} mm/A rms",
          file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["replay"]:
        return replay(argv[1:])
    if argv[:1] == ["calibrate"]:
        return calibrate(argv[1:])
    parser = argparse.ArgumentParser(prog="twinioc shadow", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    serve.add_arguments(parser)
    return serve.serve(parser.parse_args(argv))
