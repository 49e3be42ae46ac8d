"""``twinioc``: start a machine's twin, or talk to one.

    twinioc [run] [--machine mls] ...    start a twin (the default command; twinioc run -h)
    twinioc get|put|monitor [--pva] NAME ...
                                         read and write PVs over CA or PVA (twinioc get -h)
    twinioc journal show|replay          read the journal of puts, replay it (twinioc journal -h)
    twinioc snapshot save|restore|list NAME
                                         the twin's whole state, by name (twinioc snapshot -h)
    twinioc web --machine mls [--port 8080]
                                         the measurement service: REST API over EPICS (twinioc web -h)
    twinioc measure KIND --machine mls ...
                                         one measurement (bba, orm, ...), its result as JSON
    twinioc shadow --machine mls --source-ca-addr HOST:PORT
                                         a model following a machine read-only (twinioc shadow -h)
"""

from __future__ import annotations

import argparse
import sys

from twinioc.studies import cli as studies

from . import client, commands, serve

SUBCOMMANDS = ("run", "get", "put", "monitor", "journal", "snapshot", "web", "measure", "shadow")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="twinioc", description=__doc__.splitlines()[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="\n".join(__doc__.splitlines()[2:]))
    subcommands = top.add_subparsers(title="commands", metavar="COMMAND")
    run = subcommands.add_parser("run", help="start a machine's twin (the default)",
                                 description=serve.__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(serve.__doc__.splitlines()[2:]))
    serve.add_arguments(run)
    client.add_commands(subcommands)
    commands.add_commands(subcommands)
    studies.add_commands(subcommands)
    return top


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["shadow"]:  # its own commands and options (live, replay, calibrate)
        from twinioc.shadow import cli as shadow

        raise SystemExit(shadow.main(argv[1:]))
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # no command: start a twin, as twinioc always has
    args = parser().parse_args(argv)
    raise SystemExit(args.handler(args))


if __name__ == "__main__":
    main()
