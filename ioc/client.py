"""``twinioc get|put|monitor``: read and write PVs from a shell, over CA (pyepics) or PVA (p4p).

    twinioc get Q1P1K1RP:setCur TWIN:TUNE:X        CA, like caget
    twinioc get --pva ORBITCC:rdBpm                PVA, like pvget
    twinioc put Q1P1K1RP:setCur 21.5               waits for completion; says old and new value
    twinioc put TWIN:FAULT:ADD 'trip HS1*'         a long string, as one argument
    twinioc put TWIN:ORBIT:X 1 2 3                 several values: an array
    twinioc monitor TWIN:TUNE:X -n 10              each update, until Ctrl-C or -n updates

The container of the twin has no EPICS base tools (caget, pvget); these stand in for them, with the
clients twinioc already carries. They find servers through the usual EPICS_CA_* / EPICS_PVA_*
environment. Exit status 1 when a name does not connect or a put is refused; an enum PV takes its
state's name or its number.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np


def parse_value(words: list[str]) -> object:
    """One word: a number if it reads as one, else the string. Several: an array (or strings)."""
    def one(word: str) -> object:
        for kind in (int, float):
            try:
                return kind(word)
            except ValueError:
                pass
        return word

    values = [one(word) for word in words]
    if len(values) == 1:
        return values[0]
    return values if any(isinstance(v, str) for v in values) else np.array(values, dtype=float)


def show(value: object) -> str:
    """A value as caget prints it: an array as its length, then its elements."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, list | tuple):
        return f"[{len(value)}] " + " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


class ChannelAccess:
    def __init__(self, timeout: float):
        import epics

        self.epics, self.timeout = epics, timeout
        self.pvs: dict[str, object] = {}

    def pv(self, name: str):
        if name not in self.pvs:
            pv = self.epics.PV(name, connection_timeout=self.timeout)
            if not pv.wait_for_connection(self.timeout):
                raise LookupError(f"{name}: not connected after {self.timeout} s")
            self.pvs[name] = pv
        return self.pvs[name]

    def get(self, name: str) -> object:
        pv = self.pv(name)
        # a text's whole buffer: pyepics would otherwise ask for as many elements as it last received
        value = pv.get(as_string=_is_enum(pv), count=pv.nelm if _is_text(pv) else None, timeout=self.timeout,
                       use_monitor=False)
        if value is None:
            raise LookupError(f"{name}: no value within {self.timeout} s")
        return _text(value) if _is_text(pv) else value

    def put(self, name: str, value: object) -> None:
        pv = self.pv(name)
        if _is_enum(pv) and isinstance(value, str):
            states = pv.get_ctrlvars(timeout=self.timeout).get("enum_strs", ())
            if value not in states:
                raise ValueError(f"{name}: {value!r} is not one of {', '.join(states)}")
            value = states.index(value)
        done = pv.put(value, wait=True, timeout=self.timeout)
        if done != 1:
            raise RuntimeError(f"{name}: put not completed within {self.timeout} s")

    def monitor(self, name: str, report) -> None:
        pv = self.pv(name)
        pv.add_callback(lambda pvname=None, value=None, char_value=None, **_: report(
            pvname, char_value if _is_enum(pv) else _text(value) if _is_text(pv) else value))

    def close(self) -> None:
        for pv in self.pvs.values():
            pv.disconnect()


def _is_enum(pv) -> bool:
    return pv.type.endswith("enum")


def _is_text(pv) -> bool:
    """A long string: a CHAR waveform, which pyepics hands over as numbers (decoded by ``_text``)."""
    return pv.type.endswith("char") and pv.nelm > 1


def _text(value: object) -> str:
    """The characters up to the first NUL (one character comes as a plain number)."""
    return np.atleast_1d(value).astype(np.uint8).tobytes().split(b"\0")[0].decode(errors="replace")


class PVAccess:
    def __init__(self, timeout: float):
        from p4p.client.thread import Context

        self.context, self.timeout = Context("pva"), timeout
        self.subscriptions: list = []

    def get(self, name: str) -> object:
        try:
            return _plain(self.context.get(name, timeout=self.timeout))
        except TimeoutError:
            raise LookupError(f"{name}: no answer within {self.timeout} s") from None

    def put(self, name: str, value: object) -> None:
        self.context.put(name, value.tolist() if isinstance(value, np.ndarray) else value, timeout=self.timeout,
                         wait=True)

    def monitor(self, name: str, report) -> None:
        self.subscriptions.append(self.context.monitor(name, lambda value: report(name, _plain(value))))

    def close(self) -> None:
        for subscription in self.subscriptions:
            subscription.close()
        self.context.close()


def _plain(value: object) -> object:
    """p4p's wrapped value as a plain one (without the time p4p prints); an enum as its state's name."""
    raw = value if hasattr(value, "getID") else getattr(value, "raw", None)  # a Value, or a wrapped one
    if raw is None or "value" not in raw:
        return value
    inner = raw["value"]
    if hasattr(inner, "choices"):
        return inner.choices[inner.index] if 0 <= inner.index < len(inner.choices) else inner.index
    if "labels" in raw:  # an NTTable: its rows under its labels, tab-separated
        columns = [inner[key] for key in inner.keys()]
        rows = ["\t".join(str(cell) for cell in row) for row in zip(*columns, strict=True)]
        return "\n" + "\n".join(["\t".join(raw["labels"]), *rows])
    return inner


def add_commands(commands) -> None:
    """``get``, ``put`` and ``monitor`` among the subcommands *commands* of ``twinioc``."""
    helps = {"get": "read PVs, like caget (or pvget with --pva)", "put": "write a PV and wait, like caput",
             "monitor": "print each update of PVs, like camonitor"}
    for verb, text in helps.items():
        sub = commands.add_parser(verb, help=text, description=__doc__.splitlines()[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="\n".join(__doc__.splitlines()[2:]))
        sub.add_argument("names", nargs="+", metavar="NAME", help="PV names (put: NAME VALUE [VALUE ...])")
        sub.add_argument("--pva", action="store_true", help="PV Access (p4p) instead of Channel Access (pyepics)")
        sub.add_argument("-w", "--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
        if verb == "monitor":
            sub.add_argument("-n", "--count", type=int, help="stop after this many updates")
        sub.set_defaults(handler=run, verb=verb)


def run(args) -> int:
    client = (PVAccess if args.pva else ChannelAccess)(args.timeout)
    try:
        if args.verb == "get":
            return _get(client, args.names)
        if args.verb == "put":
            return _put(client, args.names[0], args.names[1:])
        return _monitor(client, args.names, args.count)
    finally:
        client.close()


def _get(client, names: list[str]) -> int:
    status = 0
    for name in names:
        try:
            print(f"{name:<32} {show(client.get(name))}")
        except Exception as err:  # noqa: BLE001 - a name that fails is reported, the others still read
            print(f"{name:<32} *** {err}", file=sys.stderr)
            status = 1
    return status


def _put(client, name: str, words: list[str]) -> int:
    if not words:
        print(f"twinioc put: no value for {name}", file=sys.stderr)
        return 2
    value = parse_value(words)
    try:
        old = client.get(name)
        client.put(name, value)
        new = client.get(name)
    except Exception as err:  # noqa: BLE001
        print(f"{name:<32} *** {err}", file=sys.stderr)
        return 1
    print(f"Old : {name:<32} {show(old)}")
    print(f"New : {name:<32} {show(new)}")
    if _differs(value, new):  # clipped to a limit, or refused (NaN, a bad command) with the old value kept
        print(f"*** {name}: asked for {show(value)}, the IOC holds {show(new)}", file=sys.stderr)
        return 1
    return 0


def _differs(asked: object, held: object) -> bool:
    """Whether the IOC holds another value than was put. Only numbers against numbers and text
    against text are compared: an enum put by number reads back as its state's name."""
    for kind in (int | float, str):
        if isinstance(asked, kind) and isinstance(held, kind):
            return not asked == held
    return False


def _monitor(client, names: list[str], count: int | None) -> int:
    seen, printing = threading.Semaphore(0), threading.Lock()

    def report(name: str, value: object) -> None:
        with printing:  # callbacks of several names come from several threads
            sys.stdout.write(f"{name:<32} {time.strftime('%H:%M:%S')} {show(value)}\n")
            sys.stdout.flush()
        seen.release()

    try:
        for name in names:
            client.monitor(name, report)
        for _ in range(count) if count else iter(int, 1):
            seen.acquire()
    except KeyboardInterrupt:
        pass
    except LookupError as err:
        print(f"*** {err}", file=sys.stderr)
        return 1
    return 0
