"""``twinioc shadow``: a model that follows a machine read-only, served under its own prefix.

    twinioc shadow --machine mls --source-ca-addr 10.0.0.5:5064
    twinioc shadow --machine bessy2 --source-ca-addr HOST:PORT --prefix SHADOW: --calibration cal.json

It monitors every converter of the machine's tables at the source (never writing), feeds the values
into its model as they change, and serves, on its own server (``EPICS_CAS_*``, ``EPICS_PVAS_*``;
loopback unless told otherwise), only names under its prefix: the model's BPM readings and tunes,
the source's, their differences, the model's chromaticity and emittance, and the link's health.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("twinioc.shadow")
STALE_S = 3.0  # no value from the source this long: not connected
STATUS_PERIOD_S = 0.2
EMITTANCE_PERIOD_S = 5.0
SEARCH_S = 1.0


@dataclass(frozen=True)
class Served:
    """One PV of the shadow: its name after the prefix, its record kind, unit and description."""

    suffix: str
    kind: str  # ai, waveform, bi, longin, text
    unit: str = ""
    description: str = ""
    reading: bool = False  # a model or source reading: INVALID while the source is gone


# What the shadow serves, after its prefix. The model's readings go INVALID while the source is gone.
SERVED = [
    Served("ORBIT:X", "waveform", "mm", "model orbit at the BPMs, x", reading=True),
    Served("ORBIT:Y", "waveform", "mm", "model orbit at the BPMs, y", reading=True),
    Served("ORBIT:MEASURED:X", "waveform", "mm", "source BPM readings, x", reading=True),
    Served("ORBIT:MEASURED:Y", "waveform", "mm", "source BPM readings, y", reading=True),
    Served("ORBIT:RESIDUAL:X", "waveform", "mm", "measured - model, x", reading=True),
    Served("ORBIT:RESIDUAL:Y", "waveform", "mm", "measured - model, y", reading=True),
    Served("ORBIT:RESIDUAL:X:RMS", "ai", "mm", "rms of measured - model, x", reading=True),
    Served("ORBIT:RESIDUAL:Y:RMS", "ai", "mm", "rms of measured - model, y", reading=True),
    Served("ORBIT:NAMES", "names", "", "the BPMs, in the order of the orbit"),
    Served("TUNE:X", "ai", "", "model fractional tune, x", reading=True),
    Served("TUNE:Y", "ai", "", "model fractional tune, y", reading=True),
    Served("TUNE:MEASURED:X", "ai", "", "source fractional tune, x", reading=True),
    Served("TUNE:MEASURED:Y", "ai", "", "source fractional tune, y", reading=True),
    Served("TUNE:RESIDUAL:X", "ai", "", "measured - model tune, x", reading=True),
    Served("TUNE:RESIDUAL:Y", "ai", "", "measured - model tune, y", reading=True),
    Served("CHROM:X", "ai", "", "model chromaticity, x", reading=True),
    Served("CHROM:Y", "ai", "", "model chromaticity, y", reading=True),
    Served("EMITTANCE:X", "ai", "nm", "model emittance, mode I", reading=True),
    Served("EMITTANCE:Y", "ai", "nm", "model emittance, mode II", reading=True),
    Served("MODEL:VERSION", "longin", "", "model lattice version"),
    Served("MODEL:COMPUTE:TIME", "ai", "ms", "time of the last model computation"),
    Served("MODEL:REFUSED", "text", "", "source values the model refused, and why"),
    Served("MODEL:STATUS", "text", "", "empty, or why the model has no valid prediction"),
    Served("CALIBRATION", "text", "", "the calibration file the model uses"),
    Served("SOURCE:CONNECTED", "bi", "", "the source answers and sends values"),
    Served("SOURCE:LAG", "ai", "s", "age of the newest source value"),
    Served("SOURCE:UNANSWERED", "text", "", "setpoints the source does not answer"),
    Served("SOURCE:UNANSWERED:COUNT", "longin", "", "how many setpoints the source does not answer"),
]
MODEL_READINGS = tuple(s.suffix for s in SERVED if s.reading)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machine", required=True, help="the machine followed: a startup file name (bessy2, mls)")
    parser.add_argument("--source-ca-addr", required=True, metavar="HOST:PORT",
                        help="where the machine's CA server answers (searched there only)")
    parser.add_argument("--source-pva-addr", metavar="HOST:PORT",
                        help="where its PVA server answers: checked, too, for the shadow's own names")
    parser.add_argument("--prefix", default="SHADOW:", help="prefix of every name the shadow serves (SHADOW:)")
    parser.add_argument("--calibration", type=Path, metavar="FILE", help="calibration file (shadow calibrate)")
    parser.add_argument("--state-dir", type=Path, help="where the shadow logs the source's comings and goings")
    parser.add_argument("--bind", default=None, help="interface the shadow serves on (default 127.0.0.1)")
    parser.add_argument("-v", "--verbose", action="store_true")


def address(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    try:
        return host, int(port)
    except ValueError:
        raise SystemExit(f"twinioc shadow: {text!r} is not HOST:PORT") from None


def network(args: argparse.Namespace) -> None:
    """The client searches the source only; the server answers on *bind* (loopback by default)."""
    host, port = address(args.source_ca_addr, 5064)
    os.environ["EPICS_CA_ADDR_LIST"] = f"{host}:{port}"
    os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
    bind = args.bind or os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "127.0.0.1")
    for name in ("EPICS_CAS_INTF_ADDR_LIST", "EPICS_PVAS_INTF_ADDR_LIST"):
        os.environ[name] = bind if args.bind else os.environ.get(name, bind)
    if bind != "0.0.0.0":
        for name in ("EPICS_CAS_BEACON_ADDR_LIST", "EPICS_PVAS_BEACON_ADDR_LIST"):
            os.environ.setdefault(name, bind)
        for name in ("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "EPICS_PVAS_AUTO_BEACON_ADDR_LIST"):
            os.environ.setdefault(name, "NO")
    os.environ.setdefault("EPICS_ALLOW_POSIX_THREAD_PRIORITY_SCHEDULING", "NO")


def own_names_at_source(args: argparse.Namespace, names: list[str]) -> dict[str, str]:
    """The shadow's names that the source already answers (over CA, and PVA if given), and where."""
    from twinioc.ioc.sentinel import answered, pva_answered

    found = answered(names, [address(args.source_ca_addr, 5064)], SEARCH_S)
    if args.source_pva_addr:
        host, port = address(args.source_pva_addr, 5076)
        found |= pva_answered(names, SEARCH_S, {"EPICS_PVA_ADDR_LIST": host, "EPICS_PVA_AUTO_ADDR_LIST": "NO",
                                                "EPICS_PVA_BROADCAST_PORT": str(port)})
    return found


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s twinioc-shadow %(levelname)s %(message)s")
    started = time.monotonic()
    network(args)
    from twinioc.studies.machine import LayoutError, MachineLayout

    try:
        layout = MachineLayout.load(args.machine)
    except LayoutError as err:
        raise SystemExit(f"twinioc shadow: {err}") from None
    names = [args.prefix + s.suffix for s in SERVED]
    clash = own_names_at_source(args, names)
    if clash:
        raise SystemExit("twinioc shadow: refusing to serve: the source already answers "
                         + ", ".join(f"{n} ({a})" for n, a in sorted(clash.items())) + "; choose another --prefix")
    model = make_model(args, layout)
    from .follower import Follower

    follower = Follower(layout, model, args.prefix, args.state_dir, calibration_name=str(args.calibration or ""))
    follower.build()
    follower.start()
    log.info("shadow of %s at %s serving %d PVs under %s (CA port %s); ready after %.1f s", layout.name,
             args.source_ca_addr, len(SERVED), args.prefix,
             os.environ.get("EPICS_CAS_SERVER_PORT", os.environ.get("EPICS_CA_SERVER_PORT", "5064")),
             time.monotonic() - started)
    from twinioc.ioc.serve import until_signalled

    signalled = until_signalled(follower.alive)
    follower.stop()
    from softioc import softioc

    if not signalled:  # the following thread ended: exit non-zero, so that a supervisor restarts us
        log.error("the shadow stopped following %s; exiting", args.source_ca_addr)
        softioc.safeEpicsExit(1)
    softioc.safeEpicsExit(0)
    return 0


def make_model(args: argparse.Namespace, layout):
    from twinioc.ioc.config import Config
    from twinioc.model.calibration import Calibration, CalibrationError

    from .model import ShadowModel

    calibration = None
    if args.calibration:
        try:
            calibration = Calibration.load(args.calibration, layout.name, list(layout.orbit.bpms),
                                           list(layout.converters))
        except CalibrationError as err:
            raise SystemExit(f"twinioc shadow: {err}") from None
    return ShadowModel(layout.tables, calibration, Config.for_machine(layout.name).equilibrium)

