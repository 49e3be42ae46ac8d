"""``twinioc journal`` and ``twinioc snapshot``: the twin's journal and snapshots from a shell.

    twinioc journal show [PATH] [--since 10m] [--device 'HS*']
                                 the puts, one line each (PATH: a journal file or a state folder)
    twinioc journal replay PATH --dry-run
                                 what a replay onto the twin would send, and the confirmation code
    twinioc journal replay PATH  send it to the twin the CA environment reaches
    twinioc journal replay PATH --any-target --dry-run        then
    twinioc journal replay PATH --any-target --confirm CODE   onto a target that is not a twin,
                                 inside the safety envelope (startup file [envelope], --envelope FILE)
    twinioc snapshot save|restore NAME, twinioc snapshot list
                                 through the twin's $(P)SNAPSHOT:* PVs, over CA

The CA clients find the twin through the usual EPICS_CA_* environment, like caget.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

from twinioc.model.tables import MachineTables

from . import journal
from .config import Config
from .replay import Envelope, commands, confirmation, load_envelope, plan, schedule, send

TIMEOUT = 5.0


def add_commands(commands) -> None:
    """``journal`` and ``snapshot`` among the subcommands *commands* of ``twinioc``."""
    journal_ = commands.add_parser("journal", help="show or replay the journal of puts",
                                   description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:])).add_subparsers(dest="action",
                                                                                              required=True)
    for action in ("show", "replay"):
        sub = journal_.add_parser(action)
        sub.add_argument("path", nargs="?", type=Path,
                         help="journal file, or state folder (default $TWINIOC_STATE or ./var/<machine>)")
        sub.add_argument("--machine", default="bessy2", help="startup file name (default bessy2)")
        sub.add_argument("--config", type=Path, help="path of a startup file")
        sub.add_argument("--since", help="from this time: ISO 8601 (UTC unless a zone is given) or 10m, 2h ago")
        sub.add_argument("--until", help="up to this time (same forms)")
        sub.add_argument("--device", help="only devices or PVs matching this pattern, e.g. 'HS*'")
        sub.set_defaults(handler=_guarded(show if action == "show" else replay))
    show_ = journal_.choices["show"]
    show_.add_argument("--json", action="store_true", help="the journal's own lines")
    replay_ = journal_.choices["replay"]
    replay_.add_argument("--dry-run", action="store_true", help="show what would be sent and why not; send nothing")
    replay_.add_argument("--any-target", action="store_true",
                         help="send to whatever the CA environment reaches, not only to a twin; needs --confirm "
                              "from a dry-run, and the envelope always applies")
    replay_.add_argument("--confirm", metavar="CODE", help="the code the dry-run printed for this plan and target")
    replay_.add_argument("--envelope", type=Path, metavar="FILE",
                         help="TOML that narrows the envelope: max_rate_hz, [limits], [max_step]")
    replay_.add_argument("--check-envelope", action="store_true",
                         help="apply the envelope onto a twin too (it always applies with --any-target)")
    replay_.add_argument("--speed", type=float, default=0.0,
                         help="keep the journal's spacing, this many times faster (default 0: no waiting)")
    replay_.add_argument("--prefix", default="TWIN:", help="prefix of the twin's own PVs (default TWIN:)")

    snapshot_ = commands.add_parser("snapshot", help="save, restore or list the twin's snapshots (over CA)")
    snapshot_.add_argument("action", choices=("save", "restore", "list"))
    snapshot_.add_argument("name", nargs="?")
    snapshot_.add_argument("--prefix", default="TWIN:", help="prefix of the twin's own PVs (default TWIN:)")
    snapshot_.set_defaults(handler=_guarded(snapshot))


def _guarded(command):
    """*command*, with a bad path, time or file reported as the message and exit status 2."""
    def run(args) -> int:
        try:
            return command(args)
        except (ValueError, OSError) as err:
            print(f"twinioc: {err}", file=sys.stderr)
            return 2

    return run


def _config(args) -> Config:
    return Config.load(args.config) if args.config else Config.for_machine(args.machine)


def _entries(args, versions: bool = True) -> list[dict]:
    path = args.path or Path(os.environ.get("TWINIOC_STATE", Path("var") / _config(args).name))
    if not path.exists():
        raise FileNotFoundError(f"no journal at {path}")
    since = journal.parse_time(args.since) if args.since else None
    until = journal.parse_time(args.until) if args.until else None
    found = journal.entries(path, since, until, versions)
    if args.device:
        found = (e for e in found if fnmatch.fnmatchcase(e.get("device", ""), args.device)
                 or fnmatch.fnmatchcase(e.get("pv", ""), args.device)
                 or any(fnmatch.fnmatchcase(d, args.device) for d in e.get("setpoints", {})))
    return list(found)


def show(args) -> int:
    for entry in _entries(args):
        if args.json:
            print(json.dumps(entry))
            continue
        if "outcome" not in entry:  # a line of lattice.jsonl
            print(f"{entry['time']}  {entry['seq']:>7}  v{entry.get('version')}  "
                  + (f"outputs of {', '.join(entry['outputs'])}" if "outputs" in entry else json.dumps(entry))[:200])
            continue
        many = f" [{len(entry['setpoints'])} setpoints]" if entry.get("setpoints") else ""
        detail = f"  ({entry['detail']})" if entry.get("detail") else ""
        version = entry.get("lattice_version")
        version = version if version is not None else "-"
        print(f"{entry['time']}  {entry['seq']:>7}  {entry['outcome']:<8}  {entry.get('source', 'client'):<14}  "
              f"{entry['pv']}  {entry['old']} -> {entry['new']}{many}  v{version}{detail}")
    return 0


def replay(args) -> int:
    import epics

    config = _config(args)
    setpoint_pvs = {r.device: r.pv for r in MachineTables(config.tables).pvs(config.prefix) if r.signal == "setpoint"}
    journal_commands = commands(_entries(args, versions=False), setpoint_pvs)  # no lattice journal needed
    if not journal_commands:
        print("nothing to replay: no accepted setpoints in that part of the journal")
        return 0
    channels = {pv: epics.PV(pv, connection_timeout=TIMEOUT) for pv in {c.pv for c in journal_commands}}
    marker = epics.PV(args.prefix + "SEED", connection_timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT  # one wait for all: absent names must not add up
    for channel in [*channels.values(), marker]:
        channel.wait_for_connection(max(0.1, deadline - time.monotonic()))
    twin_host = marker.host if marker.connected else None
    if not args.any_target:
        if twin_host is None:
            print(f"refusing: no twin answers {marker.pvname}; the target may be the real machine. Check the CA "
                  f"environment, or pass --any-target (dry-run first)", file=sys.stderr)
            return 2
        elsewhere = sorted(pv for pv, c in channels.items() if c.connected and c.host != twin_host)
        if elsewhere:
            print(f"refusing: {', '.join(elsewhere[:5])} answer from another server than the twin at {twin_host}",
                  file=sys.stderr)
            return 2
    present = {}  # each device's value on the target now
    for device, pv in {(c.device, c.pv) for c in journal_commands}:
        value = channels[pv].get(timeout=TIMEOUT) if channels[pv].connected else None
        if value is not None:
            present[device] = float(value)
    envelope = None
    if args.any_target or args.check_envelope or args.envelope:
        envelope = Envelope.for_machine(config, load_envelope(args.envelope))
    verdicts = plan(journal_commands, envelope, present)
    times = schedule(journal_commands, args.speed, envelope.max_rate_hz if envelope else 0.0)
    hosts = sorted({c.host for c in channels.values() if c.connected})
    target = f"{'twin' if twin_host else 'not a twin'} at {', '.join(hosts) or 'no server'}"
    code = confirmation(verdicts, target)
    refused = [v for v in verdicts if v.refusal]
    print(f"{len(verdicts)} setpoint commands from {journal_commands[0].time} to {journal_commands[-1].time}, onto "
          f"{target}; envelope: {envelope.describe() if envelope else 'not applied'}; takes {times[-1]:.1f} s; "
          f"{len(refused)} refused")
    if args.dry_run:
        for verdict in verdicts:
            c = verdict.command
            print(f"  {c.seq:>7}  {c.pv}  {verdict.before} -> {c.value!r}  "
                  f"{'REFUSED: ' + verdict.refusal if verdict.refusal else 'ok'}")
        print(f"confirmation code: {code}")
        return 1 if refused else 0
    if args.any_target and args.confirm != code:
        print("refusing: a replay onto a target that is not known to be a twin needs --confirm with the code a "
              "dry-run prints for this plan and target (run it with --dry-run first)", file=sys.stderr)
        return 2
    replaying = epics.PV(args.prefix + "REPLAY:ACTIVE", connection_timeout=TIMEOUT) if twin_host else None
    if replaying is not None and replaying.wait_for_connection(TIMEOUT):
        replaying.put(1, wait=True, timeout=TIMEOUT)  # the twin journals these puts as the replay's
    try:
        sent, stop = send(verdicts, times, lambda pv, value: channels[pv].put(value, wait=True, timeout=TIMEOUT) == 1)
    finally:
        if replaying is not None and replaying.connected:
            replaying.put(0, wait=True, timeout=TIMEOUT)
    print(f"sent {sent} of {len(verdicts)}")
    if stop is not None:
        print(f"stopped at {stop.command.seq} {stop.command.pv} = {stop.command.value!r}: {stop.refusal}",
              file=sys.stderr)
        return 1
    return 0


def snapshot(args) -> int:
    import epics

    if args.action != "list" and not args.name:
        print("twinioc: snapshot save and restore take a NAME", file=sys.stderr)
        return 2
    result = epics.PV(args.prefix + "COMMAND:RESULT", connection_timeout=TIMEOUT)
    if args.action == "list":
        names = epics.caget(args.prefix + "SNAPSHOT:LIST", as_string=True, timeout=TIMEOUT)
        if names is None:
            print(f"twinioc: no twin answers {args.prefix}SNAPSHOT:LIST", file=sys.stderr)
            return 2
        print(names)
        return 0
    command = epics.PV(f"{args.prefix}SNAPSHOT:{args.action.upper()}", connection_timeout=TIMEOUT)
    if not command.wait_for_connection(TIMEOUT):
        print(f"twinioc: no twin answers {command.pvname}", file=sys.stderr)
        return 2
    result.wait_for_connection(TIMEOUT)
    before = result.get(as_string=True, use_monitor=False)
    command.put(args.name, wait=True, timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    text = before
    while text == before and time.monotonic() < deadline:
        time.sleep(0.05)
        text = result.get(as_string=True, use_monitor=False)
    print(text)
    return 1 if text.startswith(("refused", "failed")) or text == before else 0
