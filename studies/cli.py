"""``twinioc web`` (the measurement service) and ``twinioc measure KIND`` (one measurement, no service).

    twinioc web --machine mls [--port 8080] [--bind 127.0.0.1] [--state-dir DIR] [--token T]
    twinioc measure bba --machine mls --quadrupole Q2M1K3RP [--state-dir DIR]

Both reach the machine through the standard EPICS client variables (``EPICS_CA_ADDR_LIST``, ...).
A target that does not serve ``<prefix>SEED`` is not a twin: plans are refused there unless
``--allow-machine`` is given, and then every put passes the machine's safety envelope.
Heavy imports (bluesky, tiled, FastAPI) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
import types
import typing
from pathlib import Path

TOKEN_VARIABLE = "TWINIOC_WEB_TOKEN"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machine", default="bessy2", help="a startup file's name: bessy2, mls")
    parser.add_argument("--prefix", default=None, help="the twin's prefix (default: the startup file's)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="records and the tiled catalog (default var/<machine>-measurements)")
    parser.add_argument("--tiled-url", default=None, help="a tiled server for the runs (default: SQLite here)")
    parser.add_argument("--allow-machine", action="store_true",
                        help="measure on a target that is not a twin (within the safety envelope)")


def add_commands(subcommands) -> None:
    web = subcommands.add_parser("web", help="the measurement service: REST API over EPICS",
                                 description=__doc__.splitlines()[0])
    _common(web)
    web.add_argument("--port", type=int, default=8080)
    web.add_argument("--bind", default="127.0.0.1", help="address to serve on (default loopback)")
    web.add_argument("--token", default=None, help=f"token for requests that change anything (or ${TOKEN_VARIABLE})")
    web.add_argument("--shadow", metavar="PREFIX",
                     help="the dashboard compares the machine with the model of the shadow serving PREFIX "
                          "(twinioc shadow; e.g. SHADOW:), instead of a twin's own model")
    web.set_defaults(handler=run_web)
    measure = subcommands.add_parser("measure", help="run one measurement and print its result as JSON")
    kinds = measure.add_subparsers(title="kinds", metavar="KIND", required=True)
    from .requests import KINDS  # pydantic only: light

    for kind, model in KINDS.items():
        sub = kinds.add_parser(kind, help=(model.__doc__ or kind).splitlines()[0])
        _common(sub)
        _parameter_options(sub, model)
        sub.set_defaults(handler=run_measure, kind=kind, model=model)


def _parameter_options(parser: argparse.ArgumentParser, model) -> None:
    """One option per parameter of *model*: ``--span-mm 0.5``; lists take several values."""
    for name, info in model.model_fields.items():
        inner = info.annotation
        if isinstance(inner, types.UnionType) or typing.get_origin(inner) is typing.Union:  # X | None
            inner = next(a for a in typing.get_args(inner) if a is not type(None))
        many = typing.get_origin(inner) is list
        element = typing.get_args(inner)[0] if many else inner
        convert = element if element in (int, float, str) else str
        default = None if info.is_required() else info.default
        shown = f" (default {default})" if default is not None else ""
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"param_{name}", type=convert, metavar=name.upper(),
                            nargs="+" if many else None, required=info.is_required(),
                            help=f"{info.description or ''}{shown}".replace("%", "%%"))


def _state_dir(args) -> Path:
    return args.state_dir or Path("var") / f"{args.machine}-measurements"


def _service(args):
    from .machine import MachineLayout
    from .service import MeasurementService

    layout = MachineLayout.load(args.machine, args.prefix)
    return MeasurementService(layout, _state_dir(args), tiled_url=args.tiled_url,
                              allow_machine=args.allow_machine).start()


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def run_web(args) -> int:
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    if not _is_loopback(args.bind) and not token:
        print(f"twinioc web: serving on {args.bind} (not loopback) needs a token: --token or ${TOKEN_VARIABLE}",
              file=sys.stderr)
        return 2
    import uvicorn
    from twinioc.dashboard.app import mount

    from .web import create_app

    service = _service(args)
    feed = None
    try:
        app = create_app(service, token)
        feed = mount(app, service, token, args.shadow)
        uvicorn.run(app, host=args.bind, port=args.port, log_level="warning")
    finally:
        if feed is not None:
            feed.stop()
        service.stop()
    return 0


def run_measure(args) -> int:
    from .requests import RequestError

    body = {"kind": args.kind} | {name: getattr(args, f"param_{name}") for name in args.model.model_fields
                                  if getattr(args, f"param_{name}") is not None}
    service = _service(args)
    try:
        record = service.submit(body)
        while record["status"] in ("queued", "running"):
            try:
                time.sleep(0.2)
            except KeyboardInterrupt:
                service.cancel(record["id"])
            record = service.records.get(record["id"])
    except RequestError as err:
        print(f"twinioc measure: {err}", file=sys.stderr)
        return 2
    finally:
        service.stop()
    shown = {k: record[k] for k in ("id", "kind", "status", "params", "result", "error", "provenance")}
    print(json.dumps(shown))  # one line, the last: what a script reads
    return 0 if record["status"] == "done" else 1
