"""``twinioc``: start a machine's twin, or list its PVs.

    twinioc                      the BESSY II twin on loopback
    twinioc --machine mls        another startup file from startup/
    twinioc --machine mls --optics low_alpha
                                 start in one of the machine's optics modes
    twinioc --config FILE        a startup file of your own
    twinioc --faults FILE        with the faults of a scenario file
    twinioc --list-pvs           print the PV table and exit
    twinioc journal show|replay  read the journal of puts, replay it (twinioc journal -h)
    twinioc snapshot save|restore|list NAME
                                 the twin's whole state, by name (twinioc snapshot -h)
    twinioc get|put|monitor [--pva] NAME ...
                                 read and write PVs over CA or PVA (twinioc get -h)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from twinioc.model.devices import read_optics

from .config import IDEAL, Config

STARTED = time.monotonic()
log = logging.getLogger("twinioc")
# Journal entries this much older than the autosave file are replayed over it too: autosave reads
# the values a moment before it writes the file.
AUTOSAVE_OVERLAP_S = 10.0


def network_defaults(bind: str, explicit: bool) -> None:
    """Make the servers answer on *bind* only, and send beacons nowhere else.

    The standard EPICS variables win over the startup file; ``--bind`` wins over both.
    """
    put = os.environ.__setitem__ if explicit else os.environ.setdefault
    for name in ("EPICS_CAS_INTF_ADDR_LIST", "EPICS_PVAS_INTF_ADDR_LIST"):
        put(name, bind)
    if bind != "0.0.0.0":
        for name in ("EPICS_CAS_BEACON_ADDR_LIST", "EPICS_PVAS_BEACON_ADDR_LIST", "EPICS_CA_ADDR_LIST"):
            put(name, bind)
        for name in ("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "EPICS_PVAS_AUTO_BEACON_ADDR_LIST",
                     "EPICS_CA_AUTO_ADDR_LIST"):
            put(name, "NO")
    # Real-time thread priorities make EPICS lock all memory (mlockall) when it may, e.g. as root:
    # ~140 MB of thread stacks and malloc arenas held resident, for nothing a simulator needs.
    os.environ.setdefault("EPICS_ALLOW_POSIX_THREAD_PRIORITY_SCHEDULING", "NO")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="twinioc", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--machine", default="bessy2", help="startup file name in startup/ (default bessy2)")
    which.add_argument("--config", type=Path, help="path of a startup file")
    parser.add_argument("--list-pvs", action="store_true", help="print the PV table and exit")
    parser.add_argument("--optics", metavar="MODE",
                        help="load this optics mode of the machine at start (overrides restored setpoints)")
    parser.add_argument("--seed", type=int, help="seed of every random number (overrides the startup file)")
    parser.add_argument("--ideal", action="store_true",
                        help="no imperfections: no noise, no errors, no ramps, no decay, instant refill")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a startup-file value, e.g. --set beam.lifetime_h=2 (repeatable)")
    parser.add_argument("--rate", type=float, help="publications per second (overrides the startup file)")
    parser.add_argument("--prefix", help="prefix of the twin-only PVs (default TWIN:)")
    parser.add_argument("--bind", help="interface for CA and PVA (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--state-dir", type=Path,
                        help="where setpoints are autosaved (default $TWINIOC_STATE or ./var/<machine>)")
    parser.add_argument("--faults", type=Path, metavar="FILE",
                        help="scenario file of faults ([[fault]] tables: kind, pattern, parameters, at_s)")
    parser.add_argument("--ignore-other-servers", action="store_true",
                        help="start even when another server (the real machine, another twin) already answers "
                             "this machine's sentinel PV names on the addresses the twin serves: clients would "
                             "then get two answers for the same names")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> Config:
    overrides = (IDEAL if args.ideal else []) + args.set
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    try:
        config = Config.load(args.config, overrides) if args.config else Config.for_machine(args.machine, overrides)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise SystemExit(f"twinioc: bad setting: {err}") from None
    if args.rate is not None:
        if not args.rate > 0:
            raise SystemExit("twinioc: --rate must be positive")
        config.rate_hz = args.rate
    if args.prefix is not None:
        config.prefix = args.prefix
    if args.bind is not None:
        config.bind = args.bind
    return config


def list_pvs(config: Config) -> None:
    from twinioc.model.tables import read_csv

    print("pv\trecord\tunit\tlow\thigh\tdescription")
    for row in read_csv(config.tables / "pvs.csv"):
        pv = row["pv"].replace("$(P)", config.prefix)
        print("\t".join([pv, row["record"], row["unit"], row["low"], row["high"], row["description"]]))


def restore_journaled(twin, state_dir: Path, saved_at: datetime | None) -> None:
    """Setpoints journaled since the last autosave go over the autosaved ones: a put that completed
    before a crash (even ``kill -9``) is back. Says what was restored."""
    from .journal import setpoints_since

    since = saved_at - timedelta(seconds=AUTOSAVE_OVERLAP_S) if saved_at else None
    values, count = setpoints_since(state_dir, since)
    unknown = twin.restore_setpoints(values)
    autosaved = f"autosave of {saved_at.isoformat(timespec='seconds')}" if saved_at else "no autosave file"
    log.info("setpoints restored: %s, then %d journaled change%s since, of %d setpoint%s%s", autosaved, count,
             "s" if count != 1 else "", len(values), "s" if len(values) != 1 else "",
             f" ({', '.join(sorted(values)[:8])}{', ...' if len(values) > 8 else ''})" if values else "")
    if unknown:
        log.warning("the journal names setpoints this twin does not have: %s", ", ".join(unknown))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("journal", "snapshot"):
        from .commands import main as command

        raise SystemExit(command(argv))
    if argv and argv[0] in ("get", "put", "monitor"):
        from .client import main as client

        raise SystemExit(client(argv))
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s twinioc %(levelname)s %(message)s")
    config = load_config(args)
    modes = read_optics(config.tables)
    if args.optics and args.optics not in modes:
        raise SystemExit(f"twinioc: {config.machine} has no optics mode {args.optics!r} "
                         f"(known: {', '.join(modes) or 'none'})")
    if args.list_pvs:
        list_pvs(config)
        return
    network_defaults(config.bind, explicit=args.bind is not None)

    from .physics import PhysicsProcess
    from .sentinel import answered, pva_answered, search_addresses

    # The physics process imports pyAT and loads the lattice while this one imports softioc and
    # builds the records, and a thread looks for other servers of the machine's names: the three
    # overlap.
    physics = PhysicsProcess(config.tables, config.realism)
    others: dict[str, str] = {}  # sentinel name -> who answers it (a CA address, a PVA port)
    searches = [threading.Thread(target=lambda: others.update(answered(
                    config.sentinels, search_addresses(), config.sentinel_search_s)), name="twinioc-sentinels-ca"),
                threading.Thread(target=lambda: others.update(pva_answered(
                    config.sentinels, config.sentinel_search_s)), name="twinioc-sentinels-pva")]
    for search in searches:
        search.start()

    from softioc import asyncio_dispatcher, autosave, builder, softioc

    from .faults import FaultError, scenario
    from .twin import Twin

    state_dir = args.state_dir or Path(os.environ.get("TWINIOC_STATE", Path("var") / config.name))
    state_dir.mkdir(parents=True, exist_ok=True)
    autosave.configure(directory=state_dir, name=config.name, save_period=config.autosave_period_s)

    saved = state_dir / f"{config.name}.{autosave.SAV_SUFFIX}"
    saved_at = datetime.fromtimestamp(saved.stat().st_mtime, UTC) if saved.exists() else None
    twin = Twin(config, physics, state_dir)
    log.debug("softioc imported after %.2f s", time.monotonic() - STARTED)
    served = twin.build()
    if args.faults:
        try:
            twin.schedule_faults(scenario(args.faults))
        except FaultError as err:
            physics.close()
            raise SystemExit(f"twinioc: {args.faults}: {err}") from None
    builder.LoadDatabase()  # restores autosaved setpoints into the records
    restore_journaled(twin, state_dir, saved_at)
    log.debug("%d records built after %.2f s", len(served), time.monotonic() - STARTED)
    try:
        physics.wait_ready()  # before serving, so that every put has a model to go to
    except EOFError:
        raise SystemExit("twinioc: the physics process could not start (its error is above)") from None
    for search in searches:
        search.join()
    if others:
        found = ", ".join(f"{name} at {address}" for name, address in others.items())
        if not args.ignore_other_servers:
            physics.close()
            raise SystemExit(f"twinioc: refusing to start: another server already answers {found}. The twin "
                             f"carries the real machine's names and must not shadow it; point EPICS_CA_ADDR_LIST "
                             f"and the ports elsewhere, or pass --ignore-other-servers")
        log.warning("another server already answers %s; starting anyway (--ignore-other-servers)", found)
    twin.initial_batch()
    if args.optics:
        twin.select_optics(args.optics)
    log.debug("physics ready after %.2f s", time.monotonic() - STARTED)
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    ticker = threading.Thread(target=twin.run, name="twinioc-tick", daemon=True)
    ticker.start()
    r = config.realism
    log.info("seed %d; BPM noise %.3g um, offsets %.3g um; magnet offsets %.3g/%.3g um (quad/sext), %d set by "
             "name; converter ramps %s; lifetime %s h, top-up %s", r.seed, r.bpm_noise * 1e6, r.bpm_offset * 1e6,
             r.quadrupole_offset * 1e6, r.sextupole_offset * 1e6, len(r.magnet_offsets), "on" if r.ramp else "off",
             config.lifetime_h, "on" if config.topup else "off")
    log.info("%s twin serving %d PVs on %s (CA port %s, PVA port %s); autosave in %s; ready after %.2f s",
             config.machine, len(served), config.bind, os.environ.get("EPICS_CA_SERVER_PORT", "5064"),
             os.environ.get("EPICS_PVAS_SERVER_PORT", os.environ.get("EPICS_PVA_SERVER_PORT", "5075")),
             state_dir, time.monotonic() - STARTED)

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5) and ticker.is_alive():
        pass
    twin.stop()
    physics.close()
    log.info("stopped")
    sys.stdout.flush()
    softioc.safeEpicsExit(0)


if __name__ == "__main__":
    main()
