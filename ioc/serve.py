"""``twinioc [run]``: start a machine's twin.

    twinioc                      the BESSY II twin on loopback
    twinioc --machine mls        another startup file from startup/
    twinioc --machine mls --optics low_alpha
                                 start in one of the machine's optics modes
    twinioc --config FILE        a startup file of your own
    twinioc --faults FILE        with the faults of a scenario file
    twinioc --list-pvs           print the PV table and exit

The start order is written once, in ``serve``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from twinioc.model.tables import MachineTables, TableError

from .config import IDEAL, Config, SettingsError
from .physics import WorkerFailure

STARTED = time.monotonic()
log = logging.getLogger("twinioc")
# Journal entries this much older than the autosave file are replayed over it too: autosave reads
# the values a moment before it writes the file.
AUTOSAVE_OVERLAP_S = 10.0
FATAL_STATUS = 3  # the exit status when the physics cannot go on


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
                        help="override a startup-file value, e.g. --set beam.lifetime_h=2 (repeatable; the keys "
                             "are those of startup/defaults.toml)")
    parser.add_argument("--rate", type=float, help="publications per second (overrides the startup file)")
    parser.add_argument("--prefix", help="prefix of the twin-only PVs (default TWIN:)")
    parser.add_argument("--bind", help="interface for CA and PVA (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--state-dir", type=Path,
                        help="where setpoints are autosaved (default $TWINIOC_STATE or ./var/<machine>)")
    parser.add_argument("--faults", type=Path, metavar="FILE",
                        help="scenario file of faults ([[fault]] tables: kind, pattern, parameters, at_s)")
    parser.add_argument("--calibration", type=Path, metavar="FILE",
                        help="model the calibrated machine: BPM gains and offsets, converter scales from a calibration "
                             "file (twinioc shadow calibrate), instead of the seed's BPM errors")
    parser.add_argument("--ignore-other-servers", action="store_true",
                        help="start even when another server (the real machine, another twin) already answers "
                             "this machine's sentinel PV names on the addresses the twin serves: clients would "
                             "then get two answers for the same names")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(handler=serve)


def load_config(args: argparse.Namespace) -> Config:
    """The startup file with the command line's overrides; a bad setting ends the program, saying why."""
    overrides = (IDEAL if args.ideal else []) + args.set
    for option, key in ((args.seed, "seed"), (args.rate, "rate_hz"), (args.prefix, "prefix"),
                        (args.bind, "network.bind")):
        if option is not None:
            overrides.append(f"{key}={option!r}" if isinstance(option, str) else f"{key}={option}")
    try:
        return Config.load(args.config, overrides) if args.config else Config.for_machine(args.machine, overrides)
    except (SettingsError, ValueError, OSError) as err:
        raise SystemExit(f"twinioc: bad setting: {err}") from None


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


def list_pvs(config: Config, tables: MachineTables) -> None:
    print("pv\trecord\tunit\tlow\thigh\tdescription")
    for row in tables.pvs(config.prefix):
        print("\t".join([row.pv, row.record, row.unit, row.low, row.high, row.description]))


class OtherServers:
    """A search, in threads of its own, for other servers of the machine's sentinel names (over CA
    on the addresses the twin's CA settings reach, and over PVA on its broadcast port)."""

    def __init__(self, config: Config):
        from .sentinel import answered, pva_answered, search_addresses

        self.found: dict[str, str] = {}  # sentinel name -> who answers it (a CA address, a PVA port)
        names, seconds = config.sentinels, config.sentinel_search_s
        self._threads = [
            threading.Thread(target=lambda: self.found.update(answered(names, search_addresses(), seconds)),
                             name="twinioc-sentinels-ca"),
            threading.Thread(target=lambda: self.found.update(pva_answered(names, seconds)),
                             name="twinioc-sentinels-pva")]
        for thread in self._threads:
            thread.start()

    def refusal(self, ignore: bool) -> str | None:
        """Why the twin must not serve (None: it may); waits for the search to end."""
        for thread in self._threads:
            thread.join()
        if not self.found:
            return None
        found = ", ".join(f"{name} at {address}" for name, address in self.found.items())
        if ignore:
            log.warning("another server already answers %s; starting anyway (--ignore-other-servers)", found)
            return None
        return (f"refusing to start: another server already answers {found}. The twin carries the real "
                f"machine's names and must not shadow it; point EPICS_CA_ADDR_LIST and the ports elsewhere, or "
                f"pass --ignore-other-servers")


def restore_setpoints(twin, state_dir: Path, autosave_file: Path) -> None:
    """Setpoints as they were: softioc's autosave file, then every setpoint journaled since shortly
    before it was written, so that a put that completed before a crash (even ``kill -9``) is back."""
    from softioc import builder

    from .journal import setpoints_since

    saved_at = datetime.fromtimestamp(autosave_file.stat().st_mtime, UTC) if autosave_file.exists() else None
    if saved_at is None:
        autosave_file.write_text("{}\n")  # nothing saved yet: autosave then has nothing to complain about
    builder.LoadDatabase()  # loads the autosaved setpoints into the records
    since = saved_at - timedelta(seconds=AUTOSAVE_OVERLAP_S) if saved_at else None
    values, count = setpoints_since(state_dir, since)
    unknown = twin.restore_setpoints(values)
    if saved_at is None and not values:
        log.info("no saved setpoints: starting from the defaults")
    else:
        autosaved = f"autosave of {saved_at.isoformat(timespec='seconds')}" if saved_at else "no autosave file"
        log.info("setpoints restored: %s, then %d journaled change%s since, of %d setpoint%s%s", autosaved, count,
                 "s" if count != 1 else "", len(values), "s" if len(values) != 1 else "",
                 f" ({', '.join(sorted(values)[:8])}{', ...' if len(values) > 8 else ''})" if values else "")
    if unknown:
        log.warning("the journal names setpoints this twin does not have: %s", ", ".join(unknown))


def serve(args: argparse.Namespace) -> int:
    """Start the twin, serve until SIGINT or SIGTERM, and return the exit status.

    The order: the physics worker starts loading pyAT and the lattice in its own process while this
    one imports softioc and builds the records, and threads look for other servers of the machine's
    names; then the setpoints as they were; then, with the model ready and nobody else serving these
    names, the IOC and the tick.
    """
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s twinioc %(levelname)s %(message)s")
    config = load_config(args)
    try:
        tables = MachineTables(config.tables)
    except TableError as err:
        raise SystemExit(f"twinioc: {err}") from None
    if args.optics and args.optics not in tables.optics:
        raise SystemExit(f"twinioc: {config.machine} has no optics mode {args.optics!r} "
                         f"(known: {', '.join(tables.optics) or 'none'})")
    if args.list_pvs:
        list_pvs(config, tables)
        return 0
    network_defaults(config.bind, explicit=args.bind is not None)
    state_dir = args.state_dir or Path(os.environ.get("TWINIOC_STATE", Path("var") / config.name))
    workers = start_physics(config, tables, in_operation=config.start_state == "operation" and fresh(state_dir))
    others = OtherServers(config)
    try:
        twin = build_twin(config, tables, args, state_dir, *workers)
        twin.start()  # waits for the physics worker
    except WorkerFailure as err:
        close_workers(*workers)
        raise SystemExit(f"twinioc: physics: {err}") from None
    except BaseException:
        close_workers(*workers)
        raise
    refusal = others.refusal(args.ignore_other_servers)
    if refusal:
        close_workers(*workers)
        raise SystemExit(f"twinioc: {refusal}")
    return run_ioc(twin, config, state_dir, args.optics)


def fresh(state_dir: Path) -> bool:
    """Whether the state folder holds nothing of an earlier run: no journal entry, no autosave."""
    from .journal import PUTS

    journal = state_dir / PUTS
    return not (journal.exists() and journal.stat().st_size) and not any(state_dir.glob("*.softsav*"))


def start_physics(config: Config, tables: MachineTables, in_operation: bool = False):
    """The physics worker and the equilibrium's, loading in their own processes from now on (before
    softioc is imported); *in_operation*: the first worker corrects orbit and tunes before it is ready."""
    from twinioc.model.correction import CorrectionSettings, StartRequest

    from .equilibrium import EquilibriumSetup, EquilibriumWorker
    from .physics import MagnetErrors, Supervisor
    from .signals import SIGNALS

    def report(text: str) -> None:
        log.warning("%s", text)

    import numpy as np

    start = None
    if in_operation:
        start = StartRequest(np.zeros(2 * len(tables.bpms)), config.tune_families,
                             config.realism.bpm_errors(tables.bpm_names),
                             CorrectionSettings(config.feedback.correction.cut))  # all of it, at once
    magnet_errors = MagnetErrors(config.realism.magnet_error_settings)
    supervisor = Supervisor(magnet_errors.setup(config.tables, config.realism.aperture, start), config.step_timeout_s,
                            config.max_restarts, report)
    points = tuple(dict.fromkeys(row.device for row in tables.pvs(config.prefix)
                                 if row.signal in SIGNALS and SIGNALS[row.signal].by_point))
    equilibria = None
    if config.equilibrium is not None:
        equilibria = EquilibriumWorker(EquilibriumSetup(config.tables, points, config.equilibrium),
                                       config.equilibrium_timeout_s, report, config.equilibrium_interval_s)
    return supervisor, magnet_errors, equilibria


def close_workers(supervisor, magnet_errors, equilibria) -> None:
    supervisor.close()
    if equilibria is not None:
        equilibria.close()


def build_twin(config: Config, tables: MachineTables, args: argparse.Namespace, state_dir: Path, supervisor,
               magnet_errors, equilibria):
    """The twin's records, a scenario's faults, and the setpoints as they were."""
    from softioc import autosave

    from .faults import FaultError, scenario
    from .twin import Twin

    state_dir.mkdir(parents=True, exist_ok=True)
    autosave.configure(directory=state_dir, name=config.name, save_period=config.autosave_period_s)
    try:
        twin = Twin(config, tables, state_dir, supervisor, magnet_errors, equilibria=equilibria)
    except TableError as err:
        raise SystemExit(f"twinioc: {err}") from None
    served = twin.build()
    if args.calibration:
        from twinioc.model.calibration import Calibration, CalibrationError

        try:
            found = Calibration.load(args.calibration, config.name, tables.bpm_names, list(tables.converters))
        except CalibrationError as err:
            raise SystemExit(f"twinioc: {err}") from None
        twin.calibrate(found)
        log.info("calibration %s: %d BPM gains, %d BPM offsets, %d converter scales", args.calibration,
                 len(found.gain_x) + len(found.gain_y), len(found.offset_x_mm) + len(found.offset_y_mm),
                 len(twin.converter_scale))
    if args.faults:
        try:
            twin.faults.schedule(scenario(args.faults))
        except FaultError as err:
            raise SystemExit(f"twinioc: {args.faults}: {err}") from None
    restore_setpoints(twin, state_dir, state_dir / f"{config.name}.{autosave.SAV_SUFFIX}")
    log.debug("%d records built after %.2f s", len(served), time.monotonic() - STARTED)
    return twin


def run_ioc(twin, config: Config, state_dir: Path, optics: str | None) -> int:
    """Serve until SIGINT or SIGTERM, or until the physics cannot go on; return the exit status."""
    from softioc import asyncio_dispatcher, softioc

    if optics:
        twin.setpoints.select_optics(optics)
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    ticker = threading.Thread(target=twin.run, name="twinioc-tick", daemon=True)
    ticker.start()
    r = config.realism
    log.info("seed %d; BPM noise %.3g um, offsets %.3g um; magnet offsets %.3g/%.3g um (quad/sext), %d set by "
             "name; converter ramps %s; lifetime %s, top-up %s", r.seed, r.bpm_noise * 1e6, r.bpm_offset * 1e6,
             r.quadrupole_offset * 1e6, r.sextupole_offset * 1e6, len(r.magnet_offsets), "on" if r.ramp else "off",
             "from physics" if math.isnan(config.lifetime_h) else f"{config.lifetime_h:g} h",
             "on" if config.topup else "off")
    log.info("%s twin serving %d PVs on %s (CA port %s, PVA port %s); autosave in %s; ready after %.2f s",
             config.machine, len(twin.rows), config.bind, os.environ.get("EPICS_CA_SERVER_PORT", "5064"),
             os.environ.get("EPICS_PVAS_SERVER_PORT", os.environ.get("EPICS_PVA_SERVER_PORT", "5075")),
             state_dir, time.monotonic() - STARTED)
    until_signalled(ticker.is_alive)
    twin.stop()
    ticker.join(timeout=5)
    close_workers(twin.supervisor, twin.magnet_errors, twin.equilibria)
    status = 0
    if twin.fatal:
        log.error("stopping the twin: %s", twin.fatal)
        status = FATAL_STATUS
    else:
        log.info("stopped")
    sys.stdout.flush()
    softioc.safeEpicsExit(status)
    return status


def until_signalled(alive: Callable[[], bool]) -> bool:
    """Block until SIGINT or SIGTERM (True), or until *alive()* is false (False: the server's own
    worker ended)."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5) and alive():
        pass
    return done.is_set()
